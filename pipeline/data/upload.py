"""`resnet-pipe data upload ROOT URI`: a prepared dataset's index with its shards, its pixel
arrays, or both, onto an object store, where every node of a cluster reads them.

    URI/index/classes.tsv, train.tsv, val.tsv    the lists, as `data prepare` wrote them
    URI/index/shards/*.tar, *.idx, shards.json   the shards (`data prepare --shards`): data.source = "shards"
    URI/index/pixels-*.npy, pixels.json          the pixel arrays of small images: data.source = "memory"
    URI/index/dataset.json                       the dataset hash, written last

The image files themselves stay behind. Each data file's SHA-256 goes into its manifest
(`shards.json`, `pixels.json`), which the nodes check their copies against
(`pipeline.data.cache`). Files already there with the checksum and size of the local ones are
passed over, so an interrupted upload continues; the manifests and then `dataset.json` go last,
so a dataset is never found prepared before all its files are there.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.data.index import INDEX, DatasetError, load_index
from pipeline.data.memory import PIXELS, has_pixels
from pipeline.data.shards import FOLDER, read_shards, sha256
from pipeline.storage import Location

PARALLEL = 8  # uploads at once: object stores take many streams better than one
LISTS = ("classes.tsv", "train.tsv", "val.tsv")
PIXELS_MANIFEST = "pixels.json"  # {"hash": dataset hash, "sha256": {"pixels-train.npy": ...}}
# by data.source: the folder under index/ that holds its files, and their manifest there
MANIFESTS = {"shards": (FOLDER, "shards.json"), "memory": ("", PIXELS_MANIFEST)}


def under(folder: str, name: str) -> str:
    """A file's path under index/."""
    return f"{folder}/{name}" if folder else name


def pixel_manifest(root: Path) -> dict | None:
    """Writes (and returns) ROOT/index/pixels.json for the pixel arrays of the current index;
    None when the dataset has none."""
    if not (has_pixels(root, "train") and has_pixels(root, "val")):
        return None
    local = root / INDEX
    names = [PIXELS.format(split=split) for split in ("train", "val")]
    digest = json.loads((local / "dataset.json").read_text())["hash"]
    manifest = {"hash": digest, "sha256": {name: sha256(local / name) for name in names}}
    (local / PIXELS_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def upload(root: Path, target: str) -> tuple[dict[str, int], int]:
    """Uploads `root`'s index, shards and pixel arrays to `target`.

    Returns:
        (the data files uploaded, by kind: {"shards": n, "memory": n}; the data files already there).

    Raises:
        DatasetError: `root` is not prepared, or has neither shards of its current index nor pixel
        arrays; StorageError: `target` cannot be written.
    """
    load_index(root)
    local = root / INDEX
    files: dict[str, tuple[str, str]] = {}  # path under index/ -> (its kind, its SHA-256)
    try:
        read_shards(root, "train")  # shards of the current index, or none
        sums = json.loads((local / FOLDER / "shards.json").read_text())["sha256"]
        files |= {under(FOLDER, name): ("shards", digest) for name, digest in sums.items()}
    except FileNotFoundError:
        pass
    if pixels := pixel_manifest(root):
        files |= {name: ("memory", digest) for name, digest in pixels["sha256"].items()}
    if not files:
        raise DatasetError(
            f"{root} has neither shards nor pixel arrays to upload: run `resnet-pipe data prepare {root} "
            "--shards` (a cluster reads image files from shards)"
        )
    dest = Location(target)
    dest.check_writable()
    remote = dest / INDEX
    there: dict[str, str] = {}  # what the store's manifests say it holds
    sizes: dict[str, int | None] = {}
    for folder, manifest in MANIFESTS.values():
        sizes |= {under(folder, child.name): child.size() for child in (remote / folder).children()}
        if (remote / under(folder, manifest)).is_file():
            sums = json.loads((remote / under(folder, manifest)).read_text()).get("sha256", {})
            there |= {under(folder, name): digest for name, digest in sums.items()}
    todo = [
        rel
        for rel, (_, digest) in sorted(files.items())
        if there.get(rel) != digest or sizes.get(rel) != (local / rel).stat().st_size
    ]

    def put(rel: str) -> None:
        (remote / rel).upload_file(local / rel)

    with ThreadPoolExecutor(PARALLEL) as pool:
        list(pool.map(put, todo))
    kinds = {kind for kind, _ in files.values()}
    manifests = [under(*MANIFESTS[kind]) for kind in sorted(kinds)]
    for rel in (*manifests, *LISTS, "dataset.json"):  # the manifests after their files; dataset.json last
        put(rel)
    counts = {kind: sum(files[rel][0] == kind for rel in todo) for kind in sorted(kinds)}
    return counts, len(files) - len(todo)
