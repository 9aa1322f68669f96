"""DALI pipelines for training and validation, and the iterator the training loop reads.

One pipeline function per split serves both machines: with a GPU the decoder runs in "mixed"
mode (nvJPEG) and every later operator on that GPU; without one (`device_id=None`) the same
graph runs on DALI's CPU operators. Readers shard by Ray Train world rank.

The reader's labels are row ids into the split's file list, not class labels: the loader maps
them to classes with a lookup table, so every batch also carries the ids of its samples (what
tests and exact resume compare).

    loader = build_loader(job, index, "train", shard_id=rank, num_shards=world, device=device)
    for images, labels, ids in loader:   # images: N x 3 x crop x crop float32, normalized
        ...
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import do_not_convert
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from torch.utils.dlpack import from_dlpack, to_dlpack

from pipeline import system
from pipeline.config import Data, Job
from pipeline.data import augment
from pipeline.data.decode import ENCODED_INPUT
from pipeline.data.index import Index
from pipeline.data.memory import Order, load_pixels, memory_pipeline, split_rows, subtract_mean, training_mean
from pipeline.data.shards import read_shards

READER = "reader"


Shards = tuple[list[str], list[str] | None]  # tar paths and their DALI index paths (`read_shards`)


def _read(
    data: Data,
    files: list[str],
    file_root: str,
    shards: Shards | None,
    shard_id: int,
    num_shards: int,
    train: bool,
    seed: int,
):
    """The encoded images of this shard and their row ids, from files or from tar shards."""
    common = dict(
        shard_id=shard_id,
        num_shards=num_shards,
        shuffle_after_epoch=train,  # a global permutation per epoch: every sample once per epoch
        pad_last_batch=True,  # every shard yields the same number of batches (DDP needs it)
        stick_to_shard=not train,  # validation: each rank scores the same files every epoch
        seed=seed,
        name=READER,
    )
    if shards is not None:
        paths, index_paths = shards
        encoded, ids = fn.readers.webdataset(
            paths=paths,
            index_paths=index_paths,
            ext=["img", "id"],
            dtypes=[types.UINT8, types.INT32],
            **common,
        )
        return encoded, ids
    ids = list(range(len(files)))
    if train:
        # the reader reshuffles after each epoch; shuffle the first epoch here, from the same seed
        random.Random(seed).shuffle(ids)
        files = [files[i] for i in ids]
    return fn.readers.file(file_root=file_root, files=files, labels=ids, **common)


def antialiased_resize(images, gpu: bool, threads: int, size: int | None = None, shorter: int | None = None):
    """Bilinear antialiased resize to `size` x `size`, or of the shorter side to `shorter`.

    On the GPU, DALI's resize. On the CPU, DALI's resize costs about as much as the JPEG decode
    (docs/benchmarks.md), so the same filter runs as torch's vectorized uint8 kernel, one image
    per call on `threads` threads (torch releases the GIL inside the kernel): 1.3x the images/s
    of the whole CPU pipeline.
    """
    if gpu:
        if size:
            return fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
        return fn.resize(images, resize_shorter=shorter, interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.dl_tensor_python_function(
        images,
        function=functools.partial(_torch_resize_batch, threads=threads, size=size, shorter=shorter),
        batch_processing=True,
        synchronize_stream=False,
        output_layouts="HWC",
    )


@do_not_convert  # plain Python, not a graph for DALI's conditionals to rewrite
def _torch_resize_batch(batch: list, threads: int, size: int | None, shorter: int | None) -> list:
    resize = functools.partial(_torch_resize, size=size, shorter=shorter)
    return list(_thread_pool(threads).map(resize, batch))


def _torch_resize(image, size: int | None, shorter: int | None):
    """One HWC uint8 image (DLPack) resized; channels-last strides pick torch's AVX2 kernel."""
    image = from_dlpack(image).permute(2, 0, 1).unsqueeze(0)
    height, width = image.shape[-2:]
    if size:
        out = (size, size)
    else:
        scale = shorter / min(height, width)
        out = (shorter, round(width * scale)) if height <= width else (round(height * scale), shorter)
    resized = F.interpolate(image, size=out, mode="bilinear", antialias=True, align_corners=False)
    return to_dlpack(resized[0].permute(1, 2, 0).contiguous())


@functools.cache
def _thread_pool(threads: int) -> ThreadPoolExecutor:
    # one image per thread, no intra-op threads: an OpenMP team of each pool thread would put the
    # training step's own threads to sleep between its ops (pipeline.system.single_threaded_torch)
    return ThreadPoolExecutor(
        threads, thread_name_prefix="resnet-pipe-resize", initializer=system.single_threaded_torch
    )


def _normalize(images, data: Data, mirror=None, crop_px: int | None = None):
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        crop=(crop_px, crop_px) if crop_px else None,
        mean=[255 * m for m in data.mean],
        std=[255 * s for s in data.std],
        mirror=mirror if mirror is not None else 0,
    )


@pipeline_def(enable_conditionals=True)  # auto_aug picks an operation per sample with DALI's conditionals
def train_pipeline(
    data: Data,
    files: list[str],
    file_root: str,
    shards: Shards | None,
    shard_id: int,
    num_shards: int,
    gpu: bool,
    threads: int,
    order_seed: int,
    crop_px: int,
):
    """Random-resized crop (decoded only inside the crop), resize, the job's augmentations
    (`pipeline.data.augment`), flip, normalize."""
    encoded, ids = _read(data, files, file_root, shards, shard_id, num_shards, train=True, seed=order_seed)
    images = fn.decoders.image_random_crop(
        encoded,
        device="mixed" if gpu else "cpu",
        output_type=types.RGB,  # grayscale and CMYK JPEGs come out as RGB
        random_area=list(data.scale),
        random_aspect_ratio=list(data.ratio),
        num_attempts=10,  # then the whole image, as torchvision's RandomResizedCrop falls back
    )
    images = antialiased_resize(images, gpu, threads, size=crop_px)
    if any(data.color_jitter):
        images = augment.color_jitter(images, data)
    if data.auto_augment != "none":
        images = augment.auto_augment(images, data)
    mirror = fn.random.coin_flip(probability=data.hflip_prob)
    images = _normalize(images, data, mirror=mirror)
    if data.random_erasing_prob > 0:
        images = augment.random_erasing(images, data)
    return images, ids


@pipeline_def
def val_pipeline(
    data: Data,
    files: list[str],
    file_root: str,
    shards: Shards | None,
    shard_id: int,
    num_shards: int,
    gpu: bool,
    threads: int,
    order_seed: int,
):
    """The evaluation transform over this shard's files."""
    encoded, ids = _read(data, files, file_root, shards, shard_id, num_shards, train=False, seed=0)
    return eval_transform(encoded, data, gpu, threads), ids


@pipeline_def
def serve_pipeline(data: Data, gpu: bool, threads: int, mean_image: np.ndarray | None = None):
    """The evaluation transform over encoded images fed in by the caller (`ENCODED_INPUT`): what
    the Serve deployment (deploy/serve_app.py) runs on each batch of requests."""
    encoded = fn.external_source(name=ENCODED_INPUT, dtype=types.UINT8, ndim=1)
    return eval_transform(encoded, data, gpu, threads, mean_image)


def eval_transform(encoded, data: Data, gpu: bool, threads: int, mean_image: np.ndarray | None = None):
    """Decode, resize the shorter side to data.val_resize_px, center crop data.val_crop_px,
    normalize: deterministic. Validation and serving both run this (train/serve parity).

    `mean_image` (H x W x 3, 0..255): with `data.normalize = "pixel_mean"`, the training images'
    mean, subtracted from the crop as the memory pipeline's evaluation does (the same arithmetic:
    a 32 x 32 image comes out as the memory pipeline gives the same pixels)."""
    images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
    images = antialiased_resize(images, gpu, threads, shorter=data.val_resize_px)
    if data.normalize != "pixel_mean":
        return _normalize(images, data, crop_px=data.val_crop_px)
    if mean_image is None or mean_image.shape[:2] != (data.val_crop_px, data.val_crop_px):
        raise ValueError(f"pixel_mean evaluation needs the training images' {data.val_crop_px}-px mean image")
    images = fn.crop(images, crop=(data.val_crop_px, data.val_crop_px))
    images, mean, std = subtract_mean(images, mean_image)
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)


class Loader:
    """Iterates (images, labels, ids) batches of one split's shard, on `device`."""

    def __init__(
        self,
        iterator: DALIGenericIterator,
        labels: torch.Tensor,
        device: torch.device,
        batches: int | None = None,
    ):
        self._iterator = iterator
        self._labels = labels
        self._device = device
        self._batches = batches  # per epoch, where no reader tells the iterator (a memory pipeline)

    def __len__(self) -> int:
        return len(self._iterator) if self._batches is None else self._batches

    def state(self) -> bytes:
        """The pipeline's exact position and RNG state (DALI checkpointing), prefetched batches
        accounted for: `build_loader(..., checkpoint=state)` continues with the next batch."""
        return self._iterator.checkpoints()[0]

    def skip(self, batches: int) -> None:
        """Reads past `batches` batches (decoded, not handed out)."""
        for _ in range(batches):
            next(self._iterator)

    def end_epoch(self, left: int) -> None:
        """Reads past the `left` batches this epoch still holds, so that the next iteration
        starts the next epoch (an epoch capped by steps, or a remainder of micro-batches)."""
        self.skip(left)
        try:
            next(self._iterator)
        except StopIteration:
            return  # the epoch boundary: the iterator has reset itself
        raise RuntimeError("the training loader was not where the epoch's step count says")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for (batch,) in self._iterator:
            ids = batch["ids"].reshape(-1).long().cpu()
            images = batch["images"].to(self._device, non_blocking=True)
            yield images, self._labels[ids].to(self._device, non_blocking=True), ids


def build_loader(
    job: Job,
    index: Index,
    split: str,
    shard_id: int = 0,
    num_shards: int = 1,
    device: torch.device | None = None,
    seed: int | None = None,
    checkpoint: bytes | None = None,
    crop_px: int | None = None,
) -> Loader:
    """A loader over `split` of `index`, sharded `shard_id` of `num_shards`, restored from
    `checkpoint` (a `Loader.state()`) when given. `crop_px` overrides the training crop (for
    progressive resizing: a loader rebuilt at another size from the state of the last one
    continues the same sample order).

    Training drops the last partial batch (every shard runs the same number of steps);
    validation yields every sample of its shard exactly once, the last batch partial.
    """
    device = device or torch.device("cpu")
    gpu = device.type == "cuda"
    train = split == "train"
    seed = job.seed if seed is None else seed
    common = dict(
        batch_size=job.scaling.batch_size_per_worker,
        num_threads=job.data.threads_per_worker,
        device_id=device.index or 0 if gpu else None,
        seed=seed + shard_id,  # augmentation randomness: differs between shards
        prefetch_queue_depth=job.data.prefetch_batches,
        enable_checkpointing=True,  # no cost per DALI's docs; makes mid-epoch resume exact
        checkpoint=checkpoint,
    )
    if job.data.source == "memory":
        return _memory_loader(job, index, split, shard_id, num_shards, device, seed, crop_px, common)
    extra = {"crop_px": crop_px or job.data.crop_px} if train else {}
    pipe = (train_pipeline if train else val_pipeline)(
        **extra,
        data=job.data,
        files=index.files(split),
        file_root=index.root.uri,
        shards=read_shards(index.root, split) if job.data.source == "shards" else None,
        shard_id=shard_id,
        num_shards=num_shards,
        gpu=gpu,
        threads=job.data.threads_per_worker,
        order_seed=seed,  # the sample order: the same on every shard
        **common,
    )
    iterator = DALIGenericIterator(
        [pipe],
        ["images", "ids"],
        reader_name=READER,
        last_batch_policy=LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL,
        auto_reset=True,
    )
    return Loader(iterator, torch.tensor(index.labels(split), dtype=torch.long), device)


def _memory_loader(
    job: Job,
    index: Index,
    split: str,
    shard_id: int,
    num_shards: int,
    device: torch.device,
    seed: int,
    crop_px: int | None,
    common: dict,
) -> Loader:
    """`build_loader` for `data.source = "memory"` (`pipeline.data.memory`)."""
    source, rows = split_rows(job.data, split, len(index.splits["train"]), len(index.splits["val"]))
    pixels = load_pixels(index.root, source, index.dataset_hash)
    mean_image = np.zeros(pixels.shape[1:], np.float32)
    if job.data.normalize == "pixel_mean":  # of the images trained on, as the paper
        mean_image = training_mean(job.data, index)
    train = split == "train"
    order = Order(pixels, rows, job.scaling.batch_size_per_worker, shard_id, num_shards, seed, train)
    pipe = memory_pipeline(
        data=job.data,
        order=order,
        train=train,
        gpu=device.type == "cuda",
        crop_px=crop_px or job.data.crop_px,
        mean_image=mean_image,
        **common,
    )
    iterator = DALIGenericIterator([pipe], ["images", "ids"], auto_reset=True)
    labels = torch.tensor(index.labels(source), dtype=torch.long)
    return Loader(iterator, labels, device, batches=order.batches)
