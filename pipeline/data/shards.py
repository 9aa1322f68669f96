"""Sharded archives: `resnet-pipe data prepare ROOT --shards` writes each split as webdataset tar
files that DALI's webdataset reader reads natively, for object stores and network file systems
where a million small files are slow to open.

    ROOT/index/shards/train-00000.tar  samples "<row id>.img" (the file's bytes, any image format)
                                       and "<row id>.id" (the row id in train.tsv, int32 little-endian)
    ROOT/index/shards/train-00000.idx  DALI's index of the tar (the format of DALI's `wds2idx`), so the
                                       reader starts without scanning every archive
    ROOT/index/shards/shards.json      the dataset hash they were written from, and the file names

Samples are written in an order shuffled once from a fixed seed, so that a shard holds a mix of
classes. The row ids make the labels, the sample-id logs and exact resume the same as with files.
"""

from __future__ import annotations

import io
import json
import random
import struct
import tarfile
from pathlib import Path

from pipeline.data.index import INDEX, Index

FOLDER = "shards"
SHARD_SAMPLES = 1024  # ImageNet's 1.28 M training images: 1,252 shards of about 140 MB
WRITE_SEED = 0
DALI_INDEX_VERSION = "v1.2"


def shard_dir(root: Path) -> Path:
    return root / INDEX / FOLDER


def write_shards(index: Index, samples_per_shard: int = SHARD_SAMPLES) -> dict[str, list[str]]:
    """Writes both splits as tar shards (skipped when they already match the dataset hash).

    Returns:
        split -> the shard file names, in reading order.
    """
    out = shard_dir(index.root)
    manifest = out / "shards.json"
    if manifest.is_file() and json.loads(manifest.read_text())["hash"] == index.dataset_hash:
        return json.loads(manifest.read_text())["splits"]
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
    manifest.write_text(json.dumps({"hash": index.dataset_hash, "splits": splits}, indent=1))
    return splits


def _write_tar(path: Path, index: Index, split: str, rows: list[int]) -> None:
    """Writes the tar and its DALI index: a "v1.2 <samples>" line, then per sample its components
    as "<ext> <data offset> <size> <member name>", space-separated, on one line."""
    tmp = path.with_suffix(".tar.tmp")
    lines = [f"{DALI_INDEX_VERSION} {len(rows)}"]
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for row in rows:
            key = f"{row:09d}"
            image = _add(tar, f"{key}.img", (index.root / index.files(split)[row]).read_bytes())
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


def read_shards(root: Path, split: str) -> tuple[list[str], list[str] | None]:
    """The shard paths of `split`, checked against the current index, and their DALI index paths
    (None for shards written without them: DALI then scans the archives when it starts).

    Raises:
        FileNotFoundError: no shards, or shards of another version of the dataset.
    """
    manifest = shard_dir(root) / "shards.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{root} has no shards: run `resnet-pipe data prepare {root} --shards`")
    written = json.loads(manifest.read_text())
    current = json.loads((root / INDEX / "dataset.json").read_text())["hash"]
    if written["hash"] != current:
        raise FileNotFoundError(
            f"the shards of {root} are from an older index: run `data prepare {root} --shards`"
        )
    tars = [shard_dir(root) / name for name in written["splits"][split]]
    indexes = [tar.with_suffix(".idx") for tar in tars]
    return [str(t) for t in tars], [str(i) for i in indexes] if all(i.is_file() for i in indexes) else None
