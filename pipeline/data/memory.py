"""Datasets held in memory (`data.source = "memory"`): the pixel arrays `data prepare` writes for
small images (CIFAR's 50,000 training images of 32 x 32 are 150 MB), fed to a DALI pipeline that
augments them on the GPU, or on DALI's CPU operators where there is none.

The paper's CIFAR augmentation (He et al. 2015, Section 4.2): "4 pixels are padded on each side,
and a 32x32 crop is randomly sampled from the padded image or its horizontal flip", after "the
per-pixel mean subtracted" (`data.normalize = "pixel_mean"`; padding then adds the mean), or
with per-channel normalisation (`"channel"`; padding adds black, as torchvision's
`RandomCrop(32, padding=4)`). Evaluation takes the whole image.

`Order` chooses the images of each batch: a permutation of the split per epoch from the job's
seed (the same on every shard), each shard a contiguous share of it. DALI asks it for batch k of
epoch e (`BatchInfo`), so a DALI checkpoint restores the exact position, as for the readers.

    pixels = load_pixels(index.root, "train", index.dataset_hash)
    order = Order(rows, batch_size=128, shard_id=rank, num_shards=world, seed=0, train=True)
"""

from __future__ import annotations

import functools
import io

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from pipeline.config import Data
from pipeline.data.index import INDEX, DatasetError, Index
from pipeline.storage import Location, StorageError

PIXELS = "pixels-{split}.npy"  # written by `pipeline.data.prepare`
HOLDOUT_SEED = 0  # which training images `data.holdout` sets aside: the same in every run


def has_pixels(root: Location | str, split: str = "train") -> bool:
    """Whether the prepared dataset at `root` holds `split` as a pixel array."""
    return (Location(root) / INDEX / PIXELS.format(split=split)).is_file()


@functools.cache
def load_pixels(root: Location, split: str, dataset_hash: str) -> np.ndarray:
    """The split's images, N x H x W x 3 uint8, in the order of its index; read once per process
    and dataset (a worker's training and validation loaders share them, read-only; a dataset
    prepared again has another hash, so it is read again).

    Raises:
        DatasetError: the dataset has no pixel arrays.
    """
    location = root / INDEX / PIXELS.format(split=split)
    try:
        if location.remote:
            pixels = np.load(io.BytesIO(location.read_bytes()))
        else:
            pixels = np.load(location.local_path())
        pixels.flags.writeable = False  # shared by the process's loaders
        return pixels
    except (StorageError, FileNotFoundError):
        raise DatasetError(
            f"{root} has no {PIXELS.format(split=split)}: `data prepare` writes it for CIFAR and other "
            f"datasets of small images (at most 64 px a side); prepare it again, or set data.source = 'files'"
        ) from None


def split_rows(data: Data, split: str, train_count: int, val_count: int) -> tuple[str, np.ndarray]:
    """Which split's array, and which of its rows, make `split`: with `data.holdout`, a fixed
    draw of that many training images is the validation set (the paper's 45k/5k split of
    CIFAR-10's training set) and the rest is trained on; `data.train_images` and
    `data.val_images` then keep a fixed draw of that many of each."""
    source, rows = split, np.arange(train_count if split == "train" else val_count)
    if data.holdout:
        if data.holdout >= train_count:
            raise DatasetError(
                f"data.holdout ({data.holdout}) leaves none of the {train_count} training images"
            )
        drawn = np.random.default_rng(HOLDOUT_SEED).permutation(train_count)
        source, rows = "train", np.sort(drawn[data.holdout :] if split == "train" else drawn[: data.holdout])
    keep = data.train_images if split == "train" else data.val_images
    if keep and keep < len(rows):
        rows = np.sort(rows[np.random.default_rng(HOLDOUT_SEED + 1).permutation(len(rows))[:keep]])
    return source, rows


def training_mean(data: Data, index: Index) -> np.ndarray:
    """The mean image (H x W x 3 float32, on the 0..255 scale) of the images `data` trains on:
    what `normalize = "pixel_mean"` subtracts in training, evaluation and serving alike."""
    _, rows = split_rows(data, "train", len(index.splits["train"]), len(index.splits["val"]))
    pixels = load_pixels(index.root, "train", index.dataset_hash)
    return pixels[rows].mean(axis=0, dtype=np.float64).astype(np.float32)


def subtract_mean(images, mean_image: np.ndarray):
    """DALI: HWC uint8 images less `mean_image`, as float; then 0..255 steps become 0..1 (the
    mean and std that `fn.crop_mirror_normalize` is to apply)."""
    return fn.cast(images, dtype=types.FLOAT) - types.Constant(mean_image), [0.0] * 3, [255.0] * 3


class Order:
    """The external source of a memory pipeline: the images and row ids of batch
    `info.iteration` of epoch `info.epoch_idx` on this shard; StopIteration ends the epoch.

    Training: a permutation of `rows` per epoch, the same on every shard, whose shard-th share
    this shard takes; the batches that do not fill up are dropped (every shard runs as many
    steps). Evaluation: the shard-th contiguous share, every image once, the last batch partial.
    """

    def __init__(
        self,
        pixels: np.ndarray,
        rows: np.ndarray,
        batch_size: int,
        shard_id: int,
        num_shards: int,
        seed: int,
        train: bool,
    ):
        self.pixels, self.rows, self.batch_size, self.seed, self.train = pixels, rows, batch_size, seed, train
        self._drawn: tuple[int, np.ndarray] | None = None  # (epoch, its rows): drawn once an epoch
        if train:
            self.share = len(rows) // num_shards
            self.start = shard_id * self.share
            self.batches = self.share // batch_size
        else:
            self.start = shard_id * len(rows) // num_shards
            self.share = (shard_id + 1) * len(rows) // num_shards - self.start
            self.batches = -(-self.share // batch_size)

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """This shard's rows in epoch `epoch`, in order."""
        if self._drawn is None or self._drawn[0] != epoch:
            rows = self.rows
            if self.train:
                rows = rows[np.random.default_rng([self.seed, epoch]).permutation(len(rows))]
            self._drawn = epoch, rows[self.start : self.start + self.share]
        return self._drawn[1]

    def __call__(self, info) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if info.iteration >= self.batches:
            raise StopIteration
        at = info.iteration * self.batch_size
        rows = self.epoch_rows(info.epoch_idx)[at : at + self.batch_size]
        return [self.pixels[r] for r in rows], [np.array([r], dtype=np.int32) for r in rows]


@pipeline_def
def memory_pipeline(data: Data, order: Order, train: bool, gpu: bool, crop_px: int, mean_image: np.ndarray):
    """Pad, random crop and flip (training), and normalisation, over the images `order` gives."""
    images, ids = fn.external_source(
        source=order,
        num_outputs=2,
        batch=True,
        batch_info=True,  # DALI passes the epoch and iteration: a checkpoint restores the position
        dtype=[types.UINT8, types.INT32],
        layout=["HWC", ""],
    )
    if gpu:
        images = images.gpu()
    if data.normalize == "pixel_mean":
        images, mean, std = subtract_mean(images, mean_image)
    else:
        mean, std = [255 * m for m in data.mean], [255 * s for s in data.std]
    mirror = 0
    if train:
        height, width = order.pixels.shape[1:3]
        # the crop's top-left corner, in pixels of the unpadded image: -pad ... size - crop + pad
        corner = lambda size: fn.random.uniform(  # noqa: E731
            values=[float(v) for v in range(-data.pad_px, size - crop_px + data.pad_px + 1)]
        )
        images = fn.slice(
            images,
            fn.stack(corner(height), corner(width)),  # start (y, x)
            types.Constant(np.array([crop_px, crop_px], np.float32)),  # shape (height, width)
            axis_names="HW",
            out_of_bounds_policy="pad",  # the padding: zeros (the mean, after pixel_mean)
            fill_values=0.0,
            normalized_anchor=False,
            normalized_shape=False,
        )
        mirror = fn.random.coin_flip(probability=data.hflip_prob)
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std, mirror=mirror
    )
    return images, ids
