"""A small, learnable, deterministic image-classification dataset written as real JPEGs.

Each class is a texture (stripes of one orientation, a checkerboard, dots) painted in a patch
of random position and size over a noisy background, in random colours, so that no single
pixel and no colour tells the class: a network has to see structure. Horizontal flips keep
every class what it is (there are no left/right-handed classes). Image sizes vary like photos.

    write_dataset(Path("data/sample"), train_per_class=150, val_per_class=50, seed=0)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("stripes-horizontal", "stripes-vertical", "checkerboard", "dots")
SIZE_RANGE_PX = (80, 160)  # each side drawn independently: varied sizes and aspect ratios


def _texture(kind: str, h: int, w: int, period: float, phase: float) -> np.ndarray:
    """A 0/1 float mask of shape (h, w) with the class's pattern."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    wave = lambda t: (np.sin(2 * np.pi * (t / period) + phase) > 0).astype(np.float32)  # noqa: E731
    if kind == "stripes-horizontal":
        return wave(y)
    if kind == "stripes-vertical":
        return wave(x)
    if kind == "checkerboard":
        return np.abs(wave(x) - wave(y))
    if kind == "dots":
        cy = (y + phase * period) % period - period / 2
        cx = (x + phase * period) % period - period / 2
        return ((cx**2 + cy**2) < (period * 0.3) ** 2).astype(np.float32)
    raise ValueError(f"unknown class {kind!r}")


def render(kind: str, rng: np.random.Generator) -> np.ndarray:
    """One HxWx3 uint8 image of class `kind`."""
    h, w = (int(rng.integers(*SIZE_RANGE_PX)) for _ in range(2))
    background = rng.uniform(0, 255, 3)
    image = np.empty((h, w, 3), np.float32)
    image[:] = background
    image += rng.normal(0, 20, (h, w, 3))
    # the textured patch covers 50-100 % of each side, anywhere in the image
    ph, pw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    top, left = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    period = rng.uniform(6, 16)  # pixels per cycle, so a 64 px crop still holds several cycles
    mask = _texture(kind, ph, pw, period, rng.uniform(0, 2 * np.pi))[..., None]
    fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    while np.abs(fg - bg).sum() < 150:  # keep the pattern visible
        fg = rng.uniform(0, 255, 3)
    image[top : top + ph, left : left + pw] = mask * fg + (1 - mask) * bg
    return np.clip(image, 0, 255).astype(np.uint8)


def write_dataset(root: Path, train_per_class: int = 150, val_per_class: int = 50, seed: int = 0) -> int:
    """Writes `root/{train,val}/<class>/*.JPEG`; the same seed gives the same bytes.

    Returns:
        The number of files written.
    """
    count = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label, kind in enumerate(CLASSES):
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            # one stream per (split, class): adding classes or images never changes the others
            rng = np.random.default_rng([seed, split == "val", label])
            for i in range(per_class):
                image = Image.fromarray(render(kind, rng))
                image.save(folder / f"{kind}_{i:05d}.JPEG", quality=int(rng.integers(75, 96)))
                count += 1
    return count
