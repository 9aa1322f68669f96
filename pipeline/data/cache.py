"""Each node's copy of a dataset that lives on an object store.

A worker calls `stage(root, cache_dir)` before it builds its loaders; the first worker of a node
copies the index and every shard into CACHE_DIR/<dataset hash>/ in parallel, each shard checked
against the SHA-256 in the dataset's shards.json, while the node's other workers wait on a file
lock and then use the same copy. A copy is complete when its dataset.json is there (written
last); an interrupted copy continues where it stopped (only verified files are kept), and later
runs of the same dataset on the node use it as it is.

Why a copy rather than DALI's own s3:// reading: the reader fetches each sample's members with
requests of their own, which on this machine's object store ran at a fraction of local-disk
speed, while a copy is read at local-disk speed once it is there (docs/benchmarks.md).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.data.index import INDEX, DatasetError
from pipeline.data.shards import FOLDER
from pipeline.storage import Location

log = logging.getLogger(__name__)
PARALLEL = 8  # downloads at once
LISTS = ("classes.tsv", "train.tsv", "val.tsv")


def stage(root: Location, cache_dir: Path) -> Path:
    """The local copy of the dataset at `root`, made if it is not there; returns its root folder.

    Raises:
        DatasetError: the shards have no checksums, or a shard arrived different twice.
    """
    digest = json.loads((root / INDEX / "dataset.json").read_text())["hash"]
    local = cache_dir / digest
    complete = local / INDEX / "dataset.json"
    if complete.is_file():
        return local
    (local / INDEX / FOLDER).mkdir(parents=True, exist_ok=True)
    with (local / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other workers wait for the first
        if complete.is_file():
            return local
        manifest = (root / INDEX / FOLDER / "shards.json").read_text()
        sums = json.loads(manifest).get("sha256")
        if not sums:
            raise DatasetError(
                f"the shards of {root} have no checksums: run `resnet-pipe data prepare ROOT --shards` "
                f"and `data upload ROOT {root}` again"
            )
        todo = [name for name in sorted(sums) if not (local / INDEX / FOLDER / name).is_file()]
        log.info(f"staging {len(todo)} of {len(sums)} shard files of {root} into {local}")
        with ThreadPoolExecutor(PARALLEL) as pool:
            list(pool.map(lambda name: _fetch(root, local, name, sums[name]), todo))
        (local / INDEX / FOLDER / "shards.json").write_text(manifest)
        for name in LISTS:
            (local / INDEX / name).write_bytes((root / INDEX / name).read_bytes())
        complete.write_bytes((root / INDEX / "dataset.json").read_bytes())  # last: the copy is whole
    return local


def _fetch(root: Location, local: Path, name: str, expected: str, tries: int = 2) -> None:
    """Copies one shard file, keeping it only when its SHA-256 is the manifest's."""
    source, target = root / INDEX / FOLDER / name, local / INDEX / FOLDER / name
    partial = target.with_name(f"{name}.part")
    for _ in range(tries):
        digest = hashlib.sha256()
        with source.open() as stream, partial.open("wb") as out:
            while chunk := stream.read(1 << 22):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() == expected:
            partial.replace(target)
            return
        log.warning(f"{source} arrived with another checksum than shards.json holds; fetching it again")
    partial.unlink(missing_ok=True)
    raise DatasetError(
        f"{source} differs from the checksum in its shards.json: upload the dataset again (`data upload`)"
    )
