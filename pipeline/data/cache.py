"""Each node's copy of a dataset that lives on an object store.

A worker calls `stage(root, cache_dir, source)` before it builds its loaders; the first worker of
a node copies the index and the files of the job's data source (the shards, or the pixel arrays
of `data.source = "memory"`) into CACHE_DIR/<dataset hash>/ in parallel, each file checked
against the SHA-256 in its manifest (`shards.json`, `pixels.json`; `pipeline.data.upload`),
while the node's other workers wait on a file lock and then use the same copy. A source's copy
is complete when its manifest is there (written after its files) and dataset.json (written
last); an interrupted copy continues where it stopped (only verified files are kept), and later
runs of the same dataset on the node use it as it is.

Before it copies, staging compares the bytes it needs with the cache's free space: short of it,
it removes other datasets' copies from the cache (least recently used first, none in use), and
if that is not enough it refuses in one line that names the folder and both sizes. A disk that
fills up during the copy anyway (another process) gives the same refusal; a file is kept only
whole and verified, so training never reads a half-written one.

Why a copy rather than DALI's own s3:// reading: the reader fetches each sample's members with
requests of their own, which on this machine's object store ran at a fraction of local-disk
speed, while a copy is read at local-disk speed once it is there (docs/benchmarks.md).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.data.index import INDEX, DatasetError
from pipeline.data.upload import LISTS, MANIFESTS, under
from pipeline.storage import Location

log = logging.getLogger(__name__)
PARALLEL = 8  # downloads at once


def stage(root: Location, cache_dir: Path, source: str = "shards") -> Path:
    """The local copy of the dataset at `root` with the files of data source `source` ("shards"
    or "memory"), made if it is not there; returns its root folder.

    Raises:
        DatasetError: the store has no such files or no checksums for them, or a file arrived
        different twice.
    """
    digest = json.loads((root / INDEX / "dataset.json").read_text())["hash"]
    local = cache_dir / digest
    folder, manifest_name = MANIFESTS[source]
    manifest_path = under(folder, manifest_name)
    complete = local / INDEX / "dataset.json"
    if complete.is_file() and (local / INDEX / manifest_path).is_file():
        return local
    (local / INDEX / folder).mkdir(parents=True, exist_ok=True)
    with (local / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other workers wait for the first
        if complete.is_file() and (local / INDEX / manifest_path).is_file():
            return local
        what = "shards" if source == "shards" else "pixel arrays"
        if not (root / INDEX / manifest_path).is_file():
            raise DatasetError(
                f"{root} has no {what} (no index/{manifest_path}): upload a dataset prepared with them "
                f"(`resnet-pipe data upload ROOT {root}`)"
            )
        manifest = (root / INDEX / manifest_path).read_text()
        sums = json.loads(manifest).get("sha256")
        if not sums:
            raise DatasetError(
                f"the {what} of {root} have no checksums: run `resnet-pipe data prepare ROOT --shards` "
                f"and `data upload ROOT {root}` again"
            )
        todo = [name for name in sorted(sums) if not (local / INDEX / under(folder, name)).is_file()]
        log.info(f"staging {len(todo)} of {len(sums)} {what} files of {root} into {local}")
        store = root / INDEX / folder if folder else root / INDEX
        _make_room(cache_dir, local, _bytes_of(store, todo) + _bytes_of(root / INDEX, LISTS))
        try:
            with ThreadPoolExecutor(PARALLEL) as pool:
                list(pool.map(lambda name: _fetch(root, local, under(folder, name), sums[name]), todo))
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            free = shutil.disk_usage(cache_dir).free
            raise DatasetError(
                f"the dataset cache {cache_dir} filled up while staging {root} ({free / 1e6:.1f} MB left): "
                "set data.cache_dir to a folder with more room, or free this one"
            ) from None
        (local / INDEX / manifest_path).write_text(manifest)
        for name in LISTS:
            (local / INDEX / name).write_bytes((root / INDEX / name).read_bytes())
        complete.write_bytes((root / INDEX / "dataset.json").read_bytes())  # last: the copy is whole
    return local


def _bytes_of(folder: Location, names) -> int:
    """The bytes of the files `names` directly in `folder` of the store."""
    sizes = {child.name: child.size() or 0 for child in folder.children()}
    return sum(sizes.get(name, 0) for name in names)


def _make_room(cache_dir: Path, keep: Path, needed: int) -> None:
    """Frees `needed` bytes in the cache: other datasets' copies go, least recently used first
    (a copy some worker holds the lock of is in use and stays).

    Raises:
        DatasetError: naming the cache folder, the space needed and the space there is.
    """
    margin = 1 << 20  # for the filesystem's own bookkeeping
    others = sorted(
        (c for c in cache_dir.iterdir() if c.is_dir() and c != keep), key=lambda c: c.stat().st_mtime
    )
    for other in others:
        if shutil.disk_usage(cache_dir).free >= needed + margin:
            break
        with (other / ".lock").open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use by a run on this node
            log.warning(f"the dataset cache {cache_dir} is short of room: removing the copy {other.name}")
            shutil.rmtree(other)
    free = shutil.disk_usage(cache_dir).free
    if free < needed + margin:
        raise DatasetError(
            f"the dataset cache {cache_dir} on {os.uname().nodename} has {free / 1e6:.1f} MB free; staging "
            f"needs {(needed + margin) / 1e6:.1f} MB: set data.cache_dir to a folder with room, or free it"
        )
    os.utime(keep, (time.time(), time.time()))  # in use now: the last a later eviction removes


def _fetch(root: Location, local: Path, rel: str, expected: str, tries: int = 2) -> None:
    """Copies one file (`rel`, under index/), keeping it only when its SHA-256 is the manifest's."""
    source, target = root / INDEX / rel, local / INDEX / rel
    partial = target.with_name(f"{target.name}.part")
    for _ in range(tries):
        digest = hashlib.sha256()
        with source.open() as stream, partial.open("wb") as out:
            while chunk := stream.read(1 << 22):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() == expected:
            partial.replace(target)
            return
        log.warning(f"{source} arrived with another checksum than its manifest holds; fetching it again")
    partial.unlink(missing_ok=True)
    raise DatasetError(
        f"{source} differs from the checksum in its manifest: upload the dataset again (`data upload`)"
    )
