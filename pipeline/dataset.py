"""Dataset indexing and verification: `resnet-pipe data prepare ROOT`.

Reads ImageNet's folder layout (`ROOT/train/<class>/*`, `ROOT/val/<class>/*`), decodes every
file once, and writes the index that training reads:

    ROOT/index/classes.tsv   index <TAB> folder name, in sorted folder order (ImageFolder's order)
    ROOT/index/train.tsv     relative path <TAB> class index, one decodable image a line
    ROOT/index/val.tsv
    ROOT/index/report.txt    counts, and every file left out with the reason

Grayscale, CMYK and PNG-in-a-.JPEG files decode (to RGB, in the loader) and stay in; truncated,
empty and undecodable files are left out and named in the report, so a bad file never stops
training.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
SPLITS = ("train", "val")


class DatasetError(ValueError):
    """A dataset folder that cannot be used, with what to do about it."""


@dataclass(frozen=True)
class Index:
    """A prepared dataset: the class names and, per split, (relative path, label) pairs."""

    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]

    def files(self, split: str) -> list[str]:
        return [path for path, _ in self.splits[split]]

    def labels(self, split: str) -> list[int]:
        return [label for _, label in self.splits[split]]


@dataclass(frozen=True)
class Report:
    counts: dict[str, int]  # split -> images kept
    rejected: list[tuple[str, str]]  # (relative path, reason)
    num_classes: int


def check_decodes(path: str) -> str | None:
    """Decodes one file fully; returns None when it is a usable image, else the reason."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as image:
            image.load()  # decodes every pixel: truncated data raises here, not at open
            if image.width < 1 or image.height < 1:
                return "zero-size image"
    except Exception as e:  # PIL raises many types for corrupt data; every one means "left out"
        return f"cannot decode: {e}".splitlines()[0]
    return None


def _scan(root: Path) -> tuple[list[str], dict[str, list[tuple[str, str]]]]:
    """Class folders of train/, and per split the (relative path, class folder) of each image."""
    train = root / "train"
    if not train.is_dir():
        raise DatasetError(
            f"{root} has no train/ folder; expected ImageNet's layout ROOT/train/<class>/*.JPEG "
            f"and ROOT/val/<class>/*.JPEG (make one with `resnet-pipe data synth DIR`)"
        )
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{train} holds no class folders")
    files: dict[str, list[tuple[str, str]]] = {}
    for split in SPLITS:
        files[split] = []
        split_dir = root / split
        if not split_dir.is_dir():
            raise DatasetError(f"{root} has no {split}/ folder")
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if class_dir.name not in classes:
                raise DatasetError(f"{class_dir} is a class that train/ does not have")
            for path in sorted(class_dir.rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                    files[split].append((str(path.relative_to(root)), class_dir.name))
    return classes, files


def prepare(root: Path, workers: int | None = None) -> Report:
    """Indexes and verifies the dataset at `root`, writing `root/index/`.

    Raises:
        DatasetError: `root` is missing or not in the expected layout.
    """
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    classes, files = _scan(root)
    class_index = {name: i for i, name in enumerate(classes)}
    every = [rel for split in SPLITS for rel, _ in files[split]]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        reasons = dict(zip(every, pool.map(check_decodes, [str(root / r) for r in every], chunksize=64)))

    out = root / "index"
    out.mkdir(exist_ok=True)
    (out / "classes.tsv").write_text("".join(f"{i}\t{name}\n" for i, name in enumerate(classes)))
    counts = {}
    for split in SPLITS:
        kept = [(rel, class_index[name]) for rel, name in files[split] if reasons[rel] is None]
        counts[split] = len(kept)
        (out / f"{split}.tsv").write_text("".join(f"{rel}\t{label}\n" for rel, label in kept))
    rejected = sorted((rel, why) for rel, why in reasons.items() if why is not None)
    report = Report(counts=counts, rejected=rejected, num_classes=len(classes))
    (out / "report.txt").write_text(format_report(root, report))
    return report


def format_report(root: Path, report: Report) -> str:
    lines = [f"dataset {root}: {report.num_classes} classes"]
    lines += [f"  {split}: {n} images" for split, n in report.counts.items()]
    lines.append(f"  left out: {len(report.rejected)} files")
    lines += [f"    {rel}: {why}" for rel, why in report.rejected]
    return "\n".join(lines) + "\n"


def load_index(root: Path) -> Index:
    """Reads `root/index/`.

    Raises:
        DatasetError: the folder is missing or was never prepared.
    """
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist (set data.root, or --set data.root=DIR)")
    out = root / "index"
    if not (out / "classes.tsv").is_file():
        raise DatasetError(f"{root} is not prepared: run `resnet-pipe data prepare {root}` first")
    classes = [line.split("\t", 1)[1] for line in (out / "classes.tsv").read_text().splitlines()]
    splits = {}
    for split in SPLITS:
        rows = [line.rsplit("\t", 1) for line in (out / f"{split}.tsv").read_text().splitlines()]
        splits[split] = [(rel, int(label)) for rel, label in rows]
    return Index(root=root, classes=classes, splits=splits)
