"""A small CIFAR-10 python release, written in the canonical format (Krizhevsky's
`cifar-10-python.tar.gz`): a tar.gz of `cifar-10-batches-py/` holding `data_batch_1..5`,
`test_batch` and `batches.meta`, each a protocol-2 pickle of a dict with bytes keys (as Python 2
wrote them), the images as N x 3072 uint8 rows of red, green and blue planes.

Its images are the synthetic textures of `pipeline.data.synth` at 32 x 32, so that a net learns
them in a few steps; the labels name those textures.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.synth import CLASSES, render

FOLDER = "cifar-10-batches-py"


def images(count: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """`count` 32 x 32 RGB images of the synthetic classes, in turn, and their labels."""
    rng = np.random.default_rng(seed)
    labels = [i % len(CLASSES) for i in range(count)]
    small = [Image.fromarray(render(CLASSES[k], rng)).resize((32, 32), Image.BILINEAR) for k in labels]
    pixels = np.stack([np.asarray(image) for image in small])
    return pixels, labels


def _batch(pixels: np.ndarray, labels: list[int], name: str, offset: int) -> bytes:
    rows = pixels.transpose(0, 3, 1, 2).reshape(len(pixels), 3072)  # HWC -> the R, G, B planes
    batch = {
        b"batch_label": name.encode(),
        b"labels": labels,
        b"data": np.ascontiguousarray(rows),
        b"filenames": [f"texture_{offset + i:05d}.png".encode() for i in range(len(labels))],
    }
    return pickle.dumps(batch, protocol=2)


def write_cifar10(dest: Path, train: int = 100, test: int = 40, seed: int = 0, extract: bool = False) -> Path:
    """Writes `dest/cifar-10-python.tar.gz` (or, with `extract`, `dest/cifar-10-batches-py/`):
    `train` images over the five training batches, `test` in the test batch.

    Returns:
        The archive or the folder.
    """
    pixels, labels = images(train + test, seed)
    members = {}
    per_batch = train // 5
    for b in range(5):
        at = slice(b * per_batch, (b + 1) * per_batch if b < 4 else train)
        members[f"data_batch_{b + 1}"] = _batch(
            pixels[at], labels[at], f"training batch {b + 1} of 5", at.start
        )
    members["test_batch"] = _batch(pixels[train:], labels[train:], "testing batch 1 of 1", train)
    names = [c.encode() for c in CLASSES]
    meta = {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}
    members["batches.meta"] = pickle.dumps(meta, protocol=2)
    members["readme.html"] = b"<html>a test's CIFAR-10</html>"
    dest.mkdir(parents=True, exist_ok=True)
    if extract:
        folder = dest / FOLDER
        folder.mkdir(exist_ok=True)
        for name, data in members.items():
            (folder / name).write_bytes(data)
        return folder
    archive = dest / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive
