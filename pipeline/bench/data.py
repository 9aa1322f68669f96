"""`resnet-pipe bench data`: the DALI training pipeline against torchvision's DataLoader.

Both read the same JPEGs and do the same work per image: decode, random-resized crop to
`crop_px` (area [0.08, 1], aspect [3/4, 4/3]), horizontal flip, normalize, batch as NCHW float.
torchvision decodes with PIL in `workers` DataLoader processes; DALI runs `workers` threads.
A third row is DALI's ceiling: decode and resize alone. On a GPU machine a fourth row decodes
with nvJPEG ("mixed"). Each row runs for `seconds` after a warm-up, one after the other in
the same process, and the ratio is printed.

With a dataset held in memory (CIFAR: `data prepare` wrote its pixel arrays), it compares the
memory pipeline (the paper's pad, crop, flip and normalisation) against torchvision's `CIFAR10`
dataset in a DataLoader with the same transforms (`RandomCrop(32, padding=4)`,
`RandomHorizontalFlip`, `ToTensor`, `Normalize`), and measures the share of a ResNet-20 training
step spent waiting for the pipeline's next batch.

With a dataset on an object store (`--root s3://...`, uploaded by `data upload`), it compares the
two ways a node can train from there against the same pipeline over a plain copy of the shards
on local disk: each node's staged copy (`pipeline.data.cache`, checksummed; its staging time is
reported), and DALI's readers opening the s3:// URLs themselves.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from pipeline.config import Job, load_job
from pipeline.data.cache import stage
from pipeline.data.index import Index, load_index
from pipeline.data.layouts import IMAGE_SUFFIXES
from pipeline.data.loader import antialiased_resize, build_loader
from pipeline.data.memory import load_pixels
from pipeline.data.shards import shard_dir
from pipeline.storage import Location

MIN_FILES = 1024  # a small folder is repeated up to this many entries, so an epoch outlasts the warm-up


@dataclass(frozen=True)
class Result:
    name: str
    images_per_s: float


def bench_index(root: Path) -> Index:
    """The files to read: a prepared dataset's training list, or every image under `root`."""
    if (root / "index" / "dataset.json").is_file():
        files = load_index(root).files("train")
    else:
        files = sorted(
            str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
        )
    if not files:
        raise FileNotFoundError(f"no images under {root}")
    files = (files * (MIN_FILES // len(files) + 1))[: max(MIN_FILES, len(files))]
    return Index(Location(root), ["all"], ["all"], {"train": [(f, 0) for f in files], "val": []}, "")


class _Files(Dataset):
    def __init__(self, index: Index, transform: Callable):
        self.paths = [index.root.local_path() / f for f in index.files("train")]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), 0


def torchvision_loader(index: Index, job: Job, workers: int) -> DataLoader:
    """torchvision's classification reference transforms, PIL decoding, `workers` processes."""
    data = job.data
    transform = T.Compose([
        T.RandomResizedCrop(data.crop_px, scale=data.scale, ratio=data.ratio, antialias=True),
        T.RandomHorizontalFlip(data.hflip_prob),
        T.PILToTensor(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(data.mean, data.std),
    ])  # fmt: skip
    return DataLoader(
        _Files(index, transform),
        batch_size=job.scaling.batch_size_per_worker,
        shuffle=True,
        num_workers=workers,
        persistent_workers=True,
        drop_last=True,
    )


@pipeline_def
def _decode_resize(files: list[str], file_root: str, data, gpu: bool, threads: int):
    encoded, _ = fn.readers.file(file_root=file_root, files=files, name="reader", pad_last_batch=True)
    images = fn.decoders.image_random_crop(
        encoded,
        device="mixed" if gpu else "cpu",
        output_type=types.RGB,
        random_area=list(data.scale),
        random_aspect_ratio=list(data.ratio),
    )
    return antialiased_resize(images, gpu, threads, size=data.crop_px)


def ceiling_loader(index: Index, job: Job, workers: int, gpu: bool) -> DALIGenericIterator:
    pipe = _decode_resize(
        files=index.files("train"),
        file_root=index.root.uri,
        data=job.data,
        gpu=gpu,
        threads=workers,
        batch_size=job.scaling.batch_size_per_worker,
        num_threads=workers,
        device_id=0 if gpu else None,
    )
    return DALIGenericIterator(
        [pipe], ["images"], reader_name="reader", last_batch_policy=LastBatchPolicy.DROP, auto_reset=True
    )


def measure(name: str, loader: Iterable, seconds: float, warmup_batches: int = 3) -> Result:
    """Images per second over `seconds` of batches, after `warmup_batches`."""
    batches = _forever(loader)
    for _ in range(warmup_batches):
        next(batches)
    images, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        images += len(next(batches))
    return Result(name, images / elapsed)


def _forever(loader: Iterable):
    """Endless image batches, from (images, ...) tuples (ours, torch's) or DALI's [{"images": ...}]."""
    while True:
        for batch in loader:
            first = batch[0]
            yield first["images"] if isinstance(first, dict) else first


def bench_data(
    root: Path, seconds: float = 20.0, workers: int | None = None, crop_px: int = 224, batch: int = 128
) -> list[Result]:
    """Runs the comparison on the images under `root`; returns one Result a row. The batch is
    imagenet-r50's per-worker batch by default (DALI's per-batch overheads favour larger ones)."""
    workers = workers or len(os.sched_getaffinity(0))
    job = load_job("imagenet-r50", [f"data.crop_px={crop_px}", f"scaling.batch_size_per_worker={batch}"])
    job = replace(job, data=replace(job.data, threads_per_worker=workers))
    index = bench_index(root)
    rows = [
        ("torchvision DataLoader (PIL)", lambda: torchvision_loader(index, job, workers)),
        ("DALI training pipeline (CPU)", lambda: build_loader(job, index, "train")),
        ("DALI ceiling: decode + resize (CPU)", lambda: ceiling_loader(index, job, workers, gpu=False)),
    ]
    if torch.cuda.is_available():
        gpu = torch.device("cuda", 0)
        rows.append(
            ("DALI training pipeline (GPU decode)", lambda: build_loader(job, index, "train", device=gpu))
        )
    return [measure(name, make(), seconds) for name, make in rows]


@dataclass(frozen=True)
class Staging:
    megabytes: float
    seconds: float


def bench_data_remote(
    root: str, seconds: float = 20.0, workers: int | None = None, crop_px: int = 224, batch: int = 128
) -> tuple[list[Result], Staging]:
    """The training pipeline over the shards of the dataset at `root` (an object store's URI):
    from a plain local copy, from a node's staged copy, and read from the object store; and the
    time the staged copy took."""
    workers = workers or len(os.sched_getaffinity(0))
    settings = [f"data.crop_px={crop_px}", f"scaling.batch_size_per_worker={batch}", "data.source='shards'"]
    job = load_job("imagenet-r50", settings)
    job = replace(job, data=replace(job.data, threads_per_worker=workers))
    remote = load_index(root)
    with tempfile.TemporaryDirectory(prefix="resnet-pipe-bench-") as tmp:
        (remote.root / "index").download(Path(tmp) / "plain" / "index")
        local = load_index(Path(tmp) / "plain")
        started = time.perf_counter()
        staged = load_index(stage(remote.root, Path(tmp) / "cache"))
        took = Staging(_megabytes(shard_dir(staged.root.local_path())), time.perf_counter() - started)
        rows = [
            ("DALI training pipeline, shards on local disk", lambda: build_loader(job, local, "train")),
            ("the same from the node's staged copy", lambda: build_loader(job, staged, "train")),
            (f"the same reading {root} directly", lambda: build_loader(job, remote, "train")),
        ]
        return [measure(name, make(), seconds) for name, make in rows], took


def _megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir()) / 1e6


def bench_data_memory(root: Path, seconds: float = 20.0, workers: int | None = None, batch: int = 128):
    """The memory pipeline against torchvision's CIFAR10 DataLoader on the dataset at `root`,
    then ResNet-20 training steps fed by the pipeline: the rows, and the steps' data wait."""
    from torchvision.datasets import CIFAR10

    workers = workers or len(os.sched_getaffinity(0))
    settings = [f"data.root='{root}'", "scaling.use_gpu=false", f"scaling.batch_size_per_worker={batch}",
                f"data.threads_per_worker={workers}", "data.normalize='channel'"]  # fmt: skip
    job = load_job("cifar10-resnet20", settings)
    index = load_index(root)
    data = job.data
    # torchvision's own CIFAR10 class (its __getitem__: array -> PIL image -> transforms) over our
    # arrays; its constructor would insist on the official archive's checksums
    dataset = CIFAR10.__new__(CIFAR10)
    dataset.data, dataset.targets, dataset.target_transform = (
        load_pixels(index.root, "train", index.dataset_hash),
        index.labels("train"),
        None,
    )
    dataset.transform = T.Compose([
        T.RandomCrop(data.crop_px, padding=data.pad_px),
        T.RandomHorizontalFlip(data.hflip_prob),
        T.PILToTensor(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(data.mean, data.std),
    ])  # fmt: skip
    torchvision = DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=True, drop_last=True
    )
    rows = [
        measure("torchvision CIFAR10 DataLoader (PIL)", torchvision, seconds),
        measure("DALI memory pipeline (CPU)", build_loader(job, index, "train"), seconds),
    ]
    return rows, data_wait(job, index, steps=30)


def data_wait(job: Job, index: Index, steps: int) -> float:
    """The share of `steps` ResNet-20 training steps (after 3 of warm-up) spent waiting for the
    pipeline's next batch, as the training loop measures `train/data_wait`."""
    from pipeline.models import create_model

    model = create_model("cifar_resnet20", num_classes=len(index.classes)).to(
        memory_format=torch.channels_last
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    batches = _forever_batches(build_loader(job, index, "train"))
    waited = 0.0
    for step in range(steps + 3):
        if step == 3:
            waited, start = 0.0, time.perf_counter()
        fetch = time.perf_counter()
        images, labels, _ = next(batches)
        waited += time.perf_counter() - fetch
        loss = torch.nn.functional.cross_entropy(
            model(images.contiguous(memory_format=torch.channels_last)), labels
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return waited / (time.perf_counter() - start)


def _forever_batches(loader: Iterable):
    while True:
        yield from loader
