"""The dataset layouts ImageNet and CIFAR users have, read into one form: class ids and (path,
class) lists.

Four layouts, found by what ROOT holds:

- CIFAR-10 or CIFAR-100's python release (`pipeline.data.cifar`): the archive or its folder; the
  images come as arrays, so their "paths" name a split and a row of it (`train/00042`);
- folders: `ROOT/train/<class>/*` and `ROOT/val/<class>/*` (torchvision's ImageFolder layout), or
  `ROOT/test/<class>/*` in place of val/ (CIFAR as image files);
- Kaggle's ILSVRC: `ROOT/ILSVRC/Data/CLS-LOC/train/<wnid>/*`, a flat `.../CLS-LOC/val/`, with
  `ROOT/LOC_val_solution.csv` (ImageId, PredictionString: the first word is the wnid) and
  `ROOT/LOC_synset_mapping.txt` (wnid, then its words);
- devkit: `ROOT/train/<wnid>/*`, a flat `ROOT/val/ILSVRC2012_val_*.JPEG`, with the ILSVRC-2012
  devkit's `data/ILSVRC2012_validation_ground_truth.txt` (one ILSVRC2012_ID per validation image,
  in file-number order) and `data/meta.mat` (ILSVRC2012_ID -> wnid) anywhere under ROOT.

Class indices follow sorted class ids (wnids), the convention of torchvision's ImageFolder and
timm's pretrained weights. Human-readable names come from timm's ImageNet info for wnids it
knows, else from the layout's own mapping, else the folder name.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.cifar import CifarError, Release, find_release

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
SPLITS = ("train", "val")
KAGGLE_DATA = Path("ILSVRC/Data/CLS-LOC")


class LayoutError(ValueError):
    """A dataset folder in none of the known layouts, or with inconsistent labels."""


@dataclass(frozen=True)
class Layout:
    kind: str  # "folders", "kaggle", "devkit", "cifar-10-python" or "cifar-100-python"
    classes: list[str]  # class ids (wnids or folder names), sorted: list position = class index
    names: dict[str, str]  # class id -> human-readable name
    files: dict[str, list[tuple[str, str]]]  # split -> (path relative to ROOT, class id)
    sources: tuple[Path, ...] = ()  # the files the images were read from, when not one per image
    pixels: dict[str, np.ndarray] | None = None  # split -> N x H x W x 3 uint8, in `files` order


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _class_folders(root: Path, train: Path) -> tuple[list[str], list[tuple[str, str]]]:
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise LayoutError(f"{train} holds no class folders")
    files = [(str(path.relative_to(root)), c) for c in classes for path in _images(train / c)]
    return classes, files


def _named(classes: list[str], own: dict[str, str]) -> dict[str, str]:
    from timm.data import ImageNetInfo

    descriptions = ImageNetInfo().label_descriptions(as_dict=True)  # wnid -> "tench, Tinca tinca"
    return {c: descriptions.get(c) or own.get(c, c) for c in classes}


def _check_val(classes: list[str], files: list[tuple[str, str]], where: Path) -> None:
    known = set(classes)
    for path, class_id in files:
        if class_id not in known:
            raise LayoutError(f"validation file {path} has class {class_id}, which {where} does not have")


def read_layout(root: Path) -> Layout:
    """Finds the layout of `root` and lists its classes and files.

    Raises:
        LayoutError: `root` is in no known layout, or a validation label names an unknown class.
    """
    if release := find_release(root):
        return _cifar(release)
    if (root / KAGGLE_DATA / "train").is_dir():
        return _kaggle(root)
    if not (root / "train").is_dir():
        raise LayoutError(
            f"{root} has no train/ folder; expected ImageNet's layout ROOT/train/<class>/*.JPEG with "
            f"ROOT/val/<class>/*.JPEG (or Kaggle's ILSVRC/Data/CLS-LOC, or a flat val/ with the devkit), "
            f"or CIFAR's cifar-10-python.tar.gz or cifar-100-python.tar.gz; make a sample with "
            f"`resnet-pipe data synth DIR`"
        )
    if (root / "test").is_dir() and not (root / "val").is_dir():
        return _folders(root, "test")
    if not (root / "val").is_dir():
        raise LayoutError(f"{root} has no val/ folder (nor test/, as CIFAR's image folders have)")
    if any(p.is_dir() for p in (root / "val").iterdir()):
        return _folders(root, "val")
    return _devkit(root)


def _cifar(release: Release) -> Layout:
    try:
        classes, splits = release.read()
    except CifarError as e:
        raise LayoutError(str(e)) from None
    files = {
        split: [(f"{split}/{row:05d}", classes[label]) for row, label in enumerate(labels)]
        for split, (_, labels, _) in splits.items()
    }
    pixels = {split: images for split, (images, _, _) in splits.items()}
    kind = release.flavour.archive.removesuffix(".tar.gz")
    return Layout(kind, classes, {c: c for c in classes}, files, tuple(release.sources), pixels)


def _folders(root: Path, val_name: str) -> Layout:
    classes, train = _class_folders(root, root / "train")
    val = []
    for folder in sorted(p for p in (root / val_name).iterdir() if p.is_dir()):
        if folder.name not in classes:
            raise LayoutError(f"{folder} is a class that train/ does not have")
        val += [(str(path.relative_to(root)), folder.name) for path in _images(folder)]
    return Layout("folders", classes, _named(classes, {}), {"train": train, "val": val})


def _kaggle(root: Path) -> Layout:
    data = root / KAGGLE_DATA
    classes, train = _class_folders(root, data / "train")
    solution, mapping = root / "LOC_val_solution.csv", root / "LOC_synset_mapping.txt"
    for needed in (solution, mapping):
        if not needed.is_file():
            raise LayoutError(f"Kaggle layout without {needed.name}: put it in {root}")
    own = {}
    for line in mapping.read_text().splitlines():
        wnid, _, words = line.partition(" ")
        own[wnid] = words
    with solution.open(newline="") as f:
        labels = {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
    val = []
    for path in _images(data / "val"):
        if path.stem not in labels:
            raise LayoutError(f"{path.name} has no row in {solution.name}")
        val.append((str(path.relative_to(root)), labels[path.stem]))
    _check_val(classes, val, data / "train")
    return Layout("kaggle", classes, _named(classes, own), {"train": train, "val": val})


def _find_one(root: Path, name: str) -> Path:
    found = sorted(root.rglob(name))
    if not found:
        raise LayoutError(
            f"{root}/val/ is flat, so it needs the ILSVRC-2012 devkit's {name} somewhere under {root}"
        )
    return found[0]


def _devkit(root: Path) -> Layout:
    from scipy.io import loadmat

    classes, train = _class_folders(root, root / "train")
    truth = _find_one(root, "ILSVRC2012_validation_ground_truth.txt")
    synsets = loadmat(str(_find_one(root, "meta.mat")), squeeze_me=True)["synsets"]
    wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    own = {str(s["WNID"]): str(s["words"]) for s in synsets}
    ids = [int(line) for line in truth.read_text().split()]
    val = []
    for path in _images(root / "val"):
        number = int(path.stem.rsplit("_", 1)[-1])  # ILSVRC2012_val_00000001 -> 1
        if not 1 <= number <= len(ids):
            raise LayoutError(f"{path.name} has no line in {truth.name} ({len(ids)} lines)")
        val.append((str(path.relative_to(root)), wnid_of[ids[number - 1]]))
    _check_val(classes, val, root / "train")
    return Layout("devkit", classes, _named(classes, own), {"train": train, "val": val})
