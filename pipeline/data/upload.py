"""`resnet-pipe data upload ROOT URI`: a prepared dataset's index and shards onto an object store,
where every node of a cluster reads them (DALI's readers open s3:// URLs themselves).

    URI/index/classes.tsv, train.tsv, val.tsv    the lists, as `data prepare` wrote them
    URI/index/shards/*.tar, *.idx, shards.json   the shards (`data prepare --shards`)
    URI/index/dataset.json                       the dataset hash, written last

The images themselves stay behind: on an object store the dataset is read from its shards.
Shards already there with the checksum and size of the local ones are passed over, so an
interrupted upload continues; `shards.json` and then `dataset.json` go last, so a dataset is never
found prepared before all its shards are there.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.data.index import INDEX, load_index
from pipeline.data.shards import FOLDER, read_shards
from pipeline.storage import Location

PARALLEL = 8  # uploads at once: object stores take many streams better than one
LISTS = ("classes.tsv", "train.tsv", "val.tsv")


def upload(root: Path, target: str) -> tuple[int, int]:
    """Uploads `root`'s index and shards to `target`; returns (shard files uploaded, shard files
    already there).

    Raises:
        DatasetError: `root` is not prepared; FileNotFoundError: it has no shards of its current
        index; StorageError: `target` cannot be written.
    """
    load_index(root)
    read_shards(root, "train")
    dest = Location(target)
    dest.check_writable()
    local, remote = root / INDEX, dest / INDEX
    sums = json.loads((local / FOLDER / "shards.json").read_text())["sha256"]
    there = remote / FOLDER / "shards.json"
    uploaded = json.loads(there.read_text()).get("sha256", {}) if there.is_file() else {}
    sizes = {child.name: child.size() for child in (remote / FOLDER).children()}
    shards = [local / FOLDER / name for name in sorted(sums)]
    todo = [
        p for p in shards if uploaded.get(p.name) != sums[p.name] or sizes.get(p.name) != p.stat().st_size
    ]

    def put(path: Path) -> None:
        (dest / str(path.relative_to(root))).upload_file(path)

    with ThreadPoolExecutor(PARALLEL) as pool:
        list(pool.map(put, todo))
    for name in (f"{FOLDER}/shards.json", *LISTS, "dataset.json"):  # dataset.json last: it makes it found
        put(local / name)
    return len(todo), len(shards) - len(todo)
