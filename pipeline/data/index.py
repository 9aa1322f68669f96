"""A prepared dataset's index (ROOT/index/, written by `pipeline.data.prepare`), as training,
evaluation, shards and the registry read it.

    index = load_index("data/sample")     # or "s3://bucket/imagenet", uploaded by `data upload`
    index.classes, index.files("train"), index.labels("val"), index.dataset_hash
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.layouts import SPLITS
from pipeline.storage import Location, StorageError

INDEX = "index"  # the folder under ROOT


class DatasetError(ValueError):
    """A dataset folder that cannot be used, with what to do about it."""


@dataclass(frozen=True)
class Index:
    """A prepared dataset: class ids and names, and per split (relative path, label) pairs."""

    root: Location
    classes: list[str]
    names: list[str]
    splits: dict[str, list[tuple[str, int]]]
    dataset_hash: str
    layout: str = ""  # as `data prepare` found it: "folders", ..., "cifar-10-python"

    @property
    def arrays_only(self) -> bool:
        """CIFAR's python release: its images are arrays (`pixels-*.npy`), with no image files."""
        return self.layout.endswith("-python")

    def files(self, split: str) -> list[str]:
        return [path for path, _ in self.splits[split]]

    def labels(self, split: str) -> list[int]:
        return [label for _, label in self.splits[split]]


def load_index(root: str | Path | Location) -> Index:
    """Reads `root/index/`, from this machine's disk or an object store.

    Raises:
        DatasetError: the folder is missing, cannot be reached, or was never prepared.
    """
    root = Location(root)
    try:
        if not root.is_dir():
            what = "has nothing under it" if root.remote else "does not exist"
            raise DatasetError(f"dataset folder {root} {what} (set data.root, or --set data.root=DIR)")
        out = root / INDEX
        if not (out / "dataset.json").is_file():
            advice = (
                "`resnet-pipe data upload` it" if root.remote else f"run `resnet-pipe data prepare {root}`"
            )
            raise DatasetError(f"{root} is not prepared: {advice} first")
        rows = [line.split("\t") for line in (out / "classes.tsv").read_text().splitlines()]
        splits = {}
        for split in SPLITS:
            lines = (out / f"{split}.tsv").read_text().splitlines()
            splits[split] = [(rel, int(label)) for rel, label in (line.rsplit("\t", 1) for line in lines)]
        summary = json.loads((out / "dataset.json").read_text())
    except StorageError as e:
        raise DatasetError(str(e)) from e
    classes, names = [r[1] for r in rows], [r[2] for r in rows]
    return Index(root, classes, names, splits, summary["hash"], summary["layout"])
