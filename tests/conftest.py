"""Shared fixtures: tiny real-JPEG datasets with the odd files ImageNet has, and one local Ray."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.synth import write_dataset

# Odd files, as ImageNet has them: kept ones decode to RGB, broken ones are left out.
KEPT_ODD = {
    "grayscale": "train/dots/odd_grayscale.JPEG",
    "cmyk": "train/dots/odd_cmyk.JPEG",
    "png": "val/checkerboard/odd_png_named.JPEG",
}
BROKEN = {
    "truncated": "train/checkerboard/odd_truncated.JPEG",
    "empty": "val/dots/odd_empty.JPEG",
    "garbage": "train/stripes-vertical/odd_garbage.JPEG",
}


def add_odd_files(root: Path) -> None:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert("L").save(root / KEPT_ODD["grayscale"], format="JPEG")
    Image.fromarray(pixels).convert("CMYK").save(root / KEPT_ODD["cmyk"], format="JPEG")
    Image.fromarray(pixels).save(root / KEPT_ODD["png"], format="PNG")
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="JPEG")
    (root / BROKEN["truncated"]).write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    (root / BROKEN["empty"]).write_bytes(b"")
    (root / BROKEN["garbage"]).write_bytes(b"this is not an image" * 50)


@pytest.fixture(scope="session")
def odd_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic classes (12 train, 5 val images each) plus every kind of odd file; not prepared."""
    root = tmp_path_factory.mktemp("odd") / "dataset"
    write_dataset(root, train_per_class=12, val_per_class=5, seed=1)
    add_odd_files(root)
    return root


@pytest.fixture(scope="session")
def prepared_dataset(odd_dataset: Path) -> Path:
    from pipeline.dataset import prepare

    prepare(odd_dataset, workers=2)
    return odd_dataset


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (it takes about 10 s to start on 2 cores)."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, log_to_driver=True)
    yield ray
    ray.shutdown()
