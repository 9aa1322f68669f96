from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from conftest import KEPT_ODD
from PIL import Image

from pipeline import system
from pipeline.config import Job, load_job
from pipeline.data import loader
from pipeline.data.index import Index, load_index
from pipeline.data.loader import build_loader
from pipeline.data.prepare import prepare

BATCH = 8


def _job(root: Path, *overrides: str) -> Job:
    return load_job(
        "quickstart",
        [
            f"data.root='{root}'",
            f"scaling.batch_size_per_worker={BATCH}",
            "data.crop_px=48",
            "data.val_resize_px=40",
            "data.val_crop_px=32",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def job(prepared_dataset: Path) -> Job:
    return _job(prepared_dataset)


@pytest.fixture(scope="module")
def index(prepared_dataset: Path) -> Index:
    return load_index(prepared_dataset)


def _bounds(job: Job) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = torch.tensor(job.data.mean)[:, None, None], torch.tensor(job.data.std)[:, None, None]
    return (0 - mean) / std, (1 - mean) / std


def _unnormalize(job: Job, images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(job.data.mean)[:, None, None], torch.tensor(job.data.std)[:, None, None]
    return images * std + mean


def test_train_batches_are_normalized_nchw_float_with_their_labels(job: Job, index: Index) -> None:
    low, high = _bounds(job)
    loader = build_loader(job, index, "train")
    assert len(loader) == len(index.files("train")) // BATCH
    for images, labels, ids in loader:
        assert images.shape == (BATCH, 3, 48, 48) and images.dtype == torch.float32
        assert (images >= low - 1e-4).all() and (images <= high + 1e-4).all()
        assert images.std() > 0.1  # real pixels, not a constant
        assert labels.dtype == torch.long
        assert labels.tolist() == [index.labels("train")[i] for i in ids.tolist()]


@pytest.fixture(scope="module")
def smooth_index(tmp_path_factory: pytest.TempPathFactory) -> Index:
    """Low-frequency photos-like images, where resize kernels agree to a few levels of 255."""
    root = tmp_path_factory.mktemp("smooth")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(5):
                coarse = rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)
                size = (int(rng.integers(60, 200)), int(rng.integers(60, 200)))
                Image.fromarray(coarse).resize(size, Image.BICUBIC).save(
                    root / split / name / f"{i}.JPEG", quality=95
                )
    prepare(root, workers=1)
    return load_index(root)


def test_val_is_resize_center_crop_normalize_like_torchvision(job: Job, smooth_index: Index) -> None:
    index, size, crop = smooth_index, job.data.val_resize_px, job.data.val_crop_px
    mean, std = torch.tensor(job.data.mean)[:, None, None], torch.tensor(job.data.std)[:, None, None]
    images, _, ids = next(iter(build_loader(job, index, "val")))
    assert images.shape == (BATCH, 3, crop, crop)
    errors, shifted_errors = [], []
    for image, i in zip(images, ids.tolist()):
        with Image.open(index.root.local_path() / index.files("val")[i]) as pil:
            resized = TF.resize(TF.pil_to_tensor(pil.convert("RGB")), size, antialias=True).float() / 255
        top, left = round((resized.shape[1] - crop) / 2), round((resized.shape[2] - crop) / 2)
        shift = 4 if left >= 4 else -4
        for out, dx in ((errors, 0), (shifted_errors, shift)):
            window = resized[:, top : top + crop, left + dx : left + dx + crop]
            out.append((image - (window - mean) / std).abs().mean())
    # the two libraries round the resized size and the crop corner differently (up to a pixel);
    # a crop 4 px off, or a wrong normalization, is far outside that
    assert torch.stack(errors).mean() < 0.1
    assert torch.stack(shifted_errors).mean() > 0.2


def test_odd_images_decode_to_rgb(job: Job, index: Index) -> None:
    grayscale = index.files("train").index(KEPT_ODD["grayscale"])
    loader = build_loader(job, index, "train")
    seen = []
    # each epoch drops its last partial batch, another one each epoch: within a few epochs the
    # grayscale file comes (the whole epoch decodes, CMYK included)
    for _epoch in range(4):
        for images, _, ids in loader:
            if grayscale in ids.tolist():
                seen.append(_unnormalize(job, images[ids.tolist().index(grayscale)]))
        if seen:
            break
    assert seen, "the grayscale file never came in 4 epochs"
    rgb = seen[0]
    assert torch.allclose(rgb[0], rgb[1], atol=1e-3) and torch.allclose(rgb[1], rgb[2], atol=1e-3)
    assert rgb.std() > 0.05  # a real image, not an empty one
    png = index.files("val").index(KEPT_ODD["png"])
    assert png in [i for _, _, ids in build_loader(job, index, "val") for i in ids.tolist()]


def test_two_val_shards_cover_the_set_exactly_once(job: Job, index: Index) -> None:
    shards = []
    for shard_id in range(2):
        loader = build_loader(job, index, "val", shard_id=shard_id, num_shards=2)
        for _epoch in range(2):  # the same shard every epoch: nothing padded, nothing repeated
            ids = [i for _, _, batch_ids in loader for i in batch_ids.tolist()]
            assert len(ids) == len(set(ids))
        shards.append(ids)
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(len(index.files("val"))))


def test_train_shards_are_disjoint_equal_length_and_reshuffled_each_epoch(job: Job, index: Index) -> None:
    loaders = [build_loader(job, index, "train", shard_id=s, num_shards=2) for s in range(2)]
    assert len(loaders[0]) == len(loaders[1])  # DDP needs every rank to take the same number of steps
    epochs = []
    for _epoch in range(2):
        per_shard = [[i for _, _, ids in loader for i in ids.tolist()] for loader in loaders]
        assert len(per_shard[0]) == len(per_shard[1]) == len(loaders[0]) * BATCH
        assert not set(per_shard[0]) & set(per_shard[1])
        epochs.append(per_shard[0] + per_shard[1])
    assert epochs[0] != epochs[1]
    assert all(len(set(ids)) == len(ids) for ids in epochs)


def test_the_sample_order_follows_the_seed(job: Job, index: Index) -> None:
    def first_ids(seed: int) -> list[int]:
        return next(iter(build_loader(job, index, "train", seed=seed)))[2].tolist()

    assert first_ids(3) == first_ids(3)
    assert first_ids(3) != first_ids(4)


def test_a_restored_loader_continues_exactly_mid_epoch(job: Job, index: Index) -> None:
    """Interrupted 3 batches into epoch 2 and rebuilt from its state, the loader yields the same
    ids and the same augmented pixels as one that never stopped."""
    per_epoch = len(build_loader(job, index, "train"))
    never_stopped = build_loader(job, index, "train")
    expected = [(ids.tolist(), images.clone()) for _ in range(2) for images, _, ids in never_stopped]

    first = build_loader(job, index, "train")
    seen = [(ids.tolist(), images.clone()) for images, _, ids in first]  # epoch 1 in full
    for images, _, ids in first:  # 3 batches into epoch 2, then "crash"
        seen.append((ids.tolist(), images.clone()))
        if len(seen) == per_epoch + 3:
            break
    resumed = build_loader(job, index, "train", checkpoint=first.state())
    seen += [(ids.tolist(), images.clone()) for images, _, ids in resumed]
    assert [ids for ids, _ in seen] == [ids for ids, _ in expected]
    assert all(torch.equal(got, want) for (_, got), (_, want) in zip(seen, expected))


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.color_jitter=[0.4, 0.4, 0.4, 0.1]"],
        ["data.auto_augment='trivial'"],
        ["data.auto_augment='rand'", "data.rand_augment_n=3", "data.rand_augment_m=15"],
        ["data.random_erasing_prob=1.0"],
    ],
    ids=["color-jitter", "trivial-augment", "rand-augment", "random-erasing"],
)
def test_each_augmentation_changes_the_pixels_but_not_the_samples(
    overrides: list[str], prepared_dataset: Path, index: Index
) -> None:
    plain = next(iter(build_loader(_job(prepared_dataset), index, "train")))
    images, labels, ids = next(iter(build_loader(_job(prepared_dataset, *overrides), index, "train")))
    assert torch.equal(ids, plain[2]) and torch.equal(labels, plain[1])  # same samples, same order
    assert images.shape == plain[0].shape and images.dtype == torch.float32
    assert not torch.allclose(images, plain[0])


def test_random_erasing_writes_zero_rectangles(prepared_dataset: Path, index: Index) -> None:
    erasing = _job(prepared_dataset, "data.random_erasing_prob=1.0")
    images, _, _ = next(iter(build_loader(erasing, index, "train")))
    zero_share = (images == 0).all(dim=1).float().mean(dim=(1, 2))  # pixels zero in every channel
    assert (zero_share >= 0.01).all() and (zero_share <= 0.34).all()


def test_progressive_resizing_keeps_the_sample_order(job: Job, index: Index) -> None:
    steady = build_loader(job, index, "train")
    expected = [ids.tolist() for _ in range(2) for _, _, ids in steady]
    small = build_loader(job, index, "train", crop_px=32)
    seen = []
    for images, _, ids in small:
        seen.append(ids.tolist())
        assert images.shape[-2:] == (32, 32)
    large = build_loader(job, index, "train", checkpoint=small.state(), crop_px=56)
    for images, _, ids in large:
        seen.append(ids.tolist())
        assert images.shape[-2:] == (56, 56)
    assert seen == expected


def _parallel_copy() -> None:  # an OpenMP op, large enough to run in parallel
    torch.zeros(3, 512, 512).permute(1, 2, 0).contiguous()


def _a_large_op_starts_threads(op: Callable[[], None] = _parallel_copy) -> bool:
    before = len(os.listdir("/proc/self/task"))
    op()
    return len(os.listdir("/proc/self/task")) > before


def _matrix_product() -> None:  # MKL's, with a thread setting of its own beside OpenMP's
    torch.ones(512, 512) @ torch.ones(512, 512)


@pytest.mark.parametrize("op", [_parallel_copy, _matrix_product], ids=["openmp-copy", "mkl-matrix-product"])
def test_single_threaded_torch_keeps_a_helper_threads_ops_on_that_thread(op) -> None:
    """A Serve replica's forward pass ends in a matrix product: MKL started a team of 2 for it
    on a helper thread whose OpenMP setting was already 1."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ThreadPoolExecutor(1) as plain:  # the probe sees a team start on an ordinary thread
            assert plain.submit(_a_large_op_starts_threads, op).result()
        with ThreadPoolExecutor(1, initializer=system.single_threaded_torch) as helper:
            assert not helper.submit(_a_large_op_starts_threads, op).result()
    finally:
        torch.set_num_threads(saved)


def test_the_resize_threads_start_no_openmp_team_beside_the_training_step(job: Job, index: Index) -> None:
    """DALI's CPU resize runs torch on helper threads. An OpenMP team of their own would make
    torch's OpenMP runtime, once its threads outnumber the cores, sleep between every op of the
    training step (docs/benchmarks.md): the helper threads must run their ops alone."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ThreadPoolExecutor(1) as plain:  # the probe sees a team start on an ordinary thread
            assert plain.submit(_a_large_op_starts_threads).result()
        next(iter(build_loader(job, index, "train")))  # resizes a batch on the helper threads
        pool = loader._thread_pool(job.data.threads_per_worker)
        assert pool.submit(torch.get_num_threads).result() == 1
        assert not pool.submit(_a_large_op_starts_threads).result()
        assert torch.get_num_threads() == 2, "the calling thread's own setting changed"
    finally:
        torch.set_num_threads(saved)
