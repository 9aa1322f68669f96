"""Sharded archives: `resnet-pipe data prepare ROOT --shards` writes each split as webdataset tar
files that DALI's webdataset reader reads natively, for object stores and network file systems
where a million small files are slow to open.

    ROOT/index/shards/train-00000.tar  samples "<row id>.img" (the file's bytes, any image format)
                                       and "<row id>.id" (the row id in train.tsv, int32 little-endian)
    ROOT/index/shards/train-00000.idx  DALI's index of the tar (the format of DALI's `wds2idx`), so the
                                       reader starts without scanning every archive
    ROOT/index/shards/shards.json      the dataset hash they were written from, the file names, and
                                       each file's SHA-256 (checked when a node stages them)

Samples are written in an order shuffled once from a fixed seed, so that a shard holds a mix of
classes. The row ids make the labels, the sample-id logs and exact resume the same as with files.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import tarfile
from pathlib import Path

from pipeline.data.index import INDEX, DatasetError, Index
from pipeline.storage import Location

FOLDER = "shards"
SHARD_SAMPLES = 1024  # ImageNet's 1.28 M training images: 1,252 shards of about 140 MB
WRITE_SEED = 0
DALI_INDEX_VERSION = "v1.2"


def shard_dir(root: Path | Location) -> Path | Location:
    return root / INDEX / FOLDER


def write_shards(index: Index, samples_per_shard: int = SHARD_SAMPLES) -> dict[str, list[str]]:
    """Writes both splits as tar shards (skipped when they already match the dataset hash).

    Returns:
        split -> the shard file names, in reading order.
    """
    if index.arrays_only:
        raise DatasetError(
            f"{index.root} is CIFAR's python release: its images are arrays, not files, and train from "
            "memory (data.source = 'memory'); shards hold image files, so none are written. `data upload` "
            "carries the arrays to an object store"
        )
    out = shard_dir(index.root.local_path())  # written on this machine, then uploaded (`data upload`)
    manifest = out / "shards.json"
    if manifest.is_file():
        written = json.loads(manifest.read_text())
        if written["hash"] == index.dataset_hash and "sha256" in written:
            return written["splits"]
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.tar"), *out.glob("*.idx")]:
        old.unlink()
    splits = {}
    for split in ("train", "val"):
        order = list(range(len(index.files(split))))
        random.Random(WRITE_SEED).shuffle(order)
        names = []
        for first in range(0, len(order), samples_per_shard):
            name = f"{split}-{first // samples_per_shard:05d}.tar"
            _write_tar(out / name, index, split, order[first : first + samples_per_shard])
            names.append(name)
        splits[split] = names
    sums = {p.name: sha256(p) for p in sorted([*out.glob("*.tar"), *out.glob("*.idx")])}
    manifest.write_text(json.dumps({"hash": index.dataset_hash, "splits": splits, "sha256": sums}, indent=1))
    return splits


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_tar(path: Path, index: Index, split: str, rows: list[int]) -> None:
    """Writes the tar and its DALI index: a "v1.2 <samples>" line, then per sample its components
    as "<ext> <data offset> <size> <member name>", space-separated, on one line."""
    tmp = path.with_suffix(".tar.tmp")
    lines = [f"{DALI_INDEX_VERSION} {len(rows)}"]
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for row in rows:
            key = f"{row:09d}"
            image = _add(tar, f"{key}.img", (index.root.local_path() / index.files(split)[row]).read_bytes())
            row_id = _add(tar, f"{key}.id", struct.pack("<i", row))
            lines.append(f"{image} {row_id}")
    path.with_suffix(".idx").write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> str:
    """Appends one member; returns its entry in DALI's index."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    data_offset = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))
    tar.addfile(info, io.BytesIO(data))
    return f"{name.rsplit('.', 1)[1]} {data_offset} {len(data)} {name}"


def read_shards(root: str | Path | Location, split: str) -> tuple[list[str], list[str] | None]:
    """The shard paths (or URIs: DALI's readers open s3:// themselves) of `split`, checked against
    the current index, and their DALI index paths (None for shards written without them: DALI
    then scans the archives when it starts).

    Raises:
        FileNotFoundError: no shards, or shards of another version of the dataset.
    """
    root = Location(root)
    folder = shard_dir(root)
    manifest = folder / "shards.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{root} has no shards: run `resnet-pipe data prepare {root} --shards`")
    written = json.loads(manifest.read_text())
    current = json.loads((root / INDEX / "dataset.json").read_text())["hash"]
    if written["hash"] != current:
        raise FileNotFoundError(
            f"the shards of {root} are from an older index: run `data prepare {root} --shards`"
        )
    present = {child.name for child in folder.children()}
    tars = written["splits"][split]
    indexes = [name.removesuffix(".tar") + ".idx" for name in tars]
    found = all(name in present for name in indexes)
    return [(folder / t).uri for t in tars], [(folder / i).uri for i in indexes] if found else None


def first_image(root: str | Path | Location, split: str) -> bytes:
    """The image of the first sample of `split`'s first shard, read through the shard's index."""
    paths, index_paths = read_shards(root, split)
    if index_paths is None:
        raise FileNotFoundError(
            f"the shards of {root} have no index files: run `data prepare --shards` again"
        )
    first_sample = Location(index_paths[0]).read_text().splitlines()[1].split()
    entries = {
        first_sample[i]: (int(first_sample[i + 1]), int(first_sample[i + 2]))
        for i in range(0, len(first_sample), 4)
    }
    offset, size = entries["img"]
    return Location(paths[0]).read_range(offset, size)
