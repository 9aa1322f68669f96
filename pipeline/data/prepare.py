"""Dataset indexing and verification: `resnet-pipe data prepare ROOT` writes the index that
`pipeline.data.index` reads.

`prepare` reads any layout of `pipeline.data.layouts`, decodes every file once with PIL and with
DALI's CPU decoder (in parallel, with a progress bar), and writes ROOT/index/:

    classes.tsv     index <TAB> class id (wnid) <TAB> name; index order = sorted class ids
    train.tsv       relative path <TAB> class index, one usable image a line
    val.tsv
    manifest.jsonl  one line per file: path, size, mtime_ns, blake2b checksum, and why it was left out
    dataset.json    layout, counts and the dataset hash (recorded by every run)
    report.txt      counts, and every file left out with the reason
    pixels-train.npy, pixels-val.npy
                    small images (CIFAR's 32 x 32) as one N x H x W x 3 uint8 array per split, in
                    the .tsv's order: what `data.source = "memory"` trains from

CIFAR's python release has no image files: its manifest lists the archive (or the extracted
batch files), and the dataset hash takes each image's pixels in place of a file's checksum.

The manifest makes `prepare` incremental and resumable: a file whose size and mtime match its
manifest line is not decoded again, and lines are appended as files are checked, so an
interrupted run picks up where it stopped. Grayscale, CMYK and PNG-in-a-.JPEG files stay in (the
loader decodes them to RGB); truncated, empty and undecodable files are left out and reported,
as are the damaged files that PIL decodes and DALI cannot.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import multiprocessing
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.data.decode import FedPipeline, decode_pipeline
from pipeline.data.index import INDEX, DatasetError
from pipeline.data.layouts import SPLITS, Layout, LayoutError, read_layout
from pipeline.data.memory import PIXELS

MANIFEST = "manifest.jsonl"
MEMORY_MAX_PX = 64  # images up to this size (per side) are also kept as arrays, for `source = "memory"`


@dataclass(frozen=True)
class Report:
    layout: str
    counts: dict[str, int]  # split -> images kept
    rejected: list[tuple[str, str]]  # (relative path, reason)
    num_classes: int
    dataset_hash: str
    checked: int  # files decoded by this run (0 for a release of arrays)
    reused: int  # files whose manifest line was still valid
    sources: int = 0  # > 0: the images came as arrays from this many release files (CIFAR's python release)


def check_file(path: str) -> dict:
    """Reads and fully decodes one file: its size, mtime, checksum, and an error or None."""
    stat = os.stat(path)
    entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "blake2b": None, "error": None}
    try:
        with open(path, "rb") as f:
            data = f.read()
        entry["blake2b"] = hashlib.blake2b(data, digest_size=16).hexdigest()
        if not data:
            entry["error"] = "empty file"
            return entry
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes every pixel: truncated data raises here, not at open
            if image.width < 1 or image.height < 1:
                entry["error"] = "zero-size image"
                return entry
    except Exception as e:  # PIL raises many types for corrupt data; every one means "left out"
        entry["error"] = f"cannot decode: {e}".splitlines()[0]
        return entry
    entry["error"] = _dali_error(data)
    return entry


def _dali_error(data: bytes) -> str | None:
    """Why DALI's CPU decoder, the one the loaders run, cannot decode `data` (None: it can).
    PIL is more lenient (`pipeline.data.decode.FedPipeline` says where); such a file would stop a
    training run, on every retry."""
    try:
        _dali_decoder()([data])
        return None
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = lines[lines.index("encountered:") + 1] if "encountered:" in lines[:-1] else lines[0]
        return f"cannot decode with DALI (the training loader's decoder): {reason}"


@functools.cache
def _dali_decoder():
    return FedPipeline(
        functools.partial(
            decode_pipeline, batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1,
            exec_async=False, exec_pipelined=False,
        )
    )  # fmt: skip


def _check_one(item: tuple[str, str]) -> tuple[str, dict]:
    rel, path = item
    return rel, check_file(path)


def _read_manifest(path: Path) -> dict[str, dict]:
    entries: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the last line of an interrupted run
                continue
            entries[entry.pop("path")] = entry
    return entries


def _still_valid(root: Path, rel: str, entry: dict | None) -> bool:
    if entry is None:
        return False
    stat = os.stat(root / rel)
    return entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns


def _verify(root: Path, rels: list[str], workers: int | None) -> tuple[dict[str, dict], int]:
    """Manifest entries for `rels`, decoding only new or changed files; returns them and the count decoded."""
    out = root / INDEX
    out.mkdir(exist_ok=True)
    manifest = _read_manifest(out / MANIFEST)
    todo = [rel for rel in rels if not _still_valid(root, rel, manifest.get(rel))]
    if todo:
        with (
            open(out / MANIFEST, "a", encoding="utf-8") as log,
            # spawn, not fork: the caller may hold threads (Ray, DALI) that a fork would copy mid-state
            multiprocessing.get_context("spawn").Pool(workers or os.cpu_count()) as pool,
            tqdm(total=len(todo), desc="verifying", unit="file", disable=None) as bar,
        ):
            for rel, entry in pool.imap_unordered(
                _check_one, [(r, str(root / r)) for r in todo], chunksize=16
            ):
                manifest[rel] = entry
                log.write(json.dumps({"path": rel} | entry, ensure_ascii=False) + "\n")
                bar.update()
    _write_lines(
        out / MANIFEST, (json.dumps({"path": r} | manifest[r], ensure_ascii=False) for r in sorted(rels))
    )
    return {rel: manifest[rel] for rel in rels}, len(todo)


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    """Writes atomically: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)


def dataset_hash(classes: list[str], kept: dict[str, list[tuple[str, int, str]]]) -> str:
    """sha256 over the classes and every kept (split, path, label, checksum): same data, same hash."""
    digest = hashlib.sha256()
    for i, class_id in enumerate(classes):
        digest.update(f"class\t{i}\t{class_id}\n".encode())
    for split in SPLITS:
        for rel, label, checksum in sorted(kept[split]):
            digest.update(f"{split}\t{rel}\t{label}\t{checksum}\n".encode())
    return digest.hexdigest()


def prepare(root: Path, workers: int | None = None) -> Report:
    """Indexes and verifies the dataset at `root`, writing `root/index/`.

    Raises:
        DatasetError: `root` is missing or in no known layout.
    """
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    try:
        layout = read_layout(root)
    except LayoutError as e:
        raise DatasetError(str(e)) from None
    index_of = {c: i for i, c in enumerate(layout.classes)}
    rels = [rel for split in SPLITS for rel, _ in layout.files[split]]
    if layout.pixels is not None:
        entries, checked = _array_entries(root, layout), 0  # every image read from the release's arrays
    else:
        entries, checked = _verify(root, rels, workers)

    kept: dict[str, list[tuple[str, int, str]]] = {}
    rejected = []
    for split in SPLITS:
        kept[split] = []
        for rel, class_id in layout.files[split]:
            error = entries[rel]["error"]
            if error is None and ("\t" in rel or "\n" in rel):
                error = "a tab or newline in the file name (rename it)"
            if error:
                rejected.append((rel, error))
            else:
                kept[split].append((rel, index_of[class_id], entries[rel]["blake2b"]))
    digest = dataset_hash(layout.classes, kept)

    out = root / INDEX
    _write_lines(out / "classes.tsv", (f"{i}\t{c}\t{layout.names[c]}" for i, c in enumerate(layout.classes)))
    for split in SPLITS:
        _write_lines(out / f"{split}.tsv", (f"{rel}\t{label}" for rel, label, _ in kept[split]))
    counts = {split: len(kept[split]) for split in SPLITS}
    reused = len(rels) - checked if layout.pixels is None else 0
    report = Report(
        layout.kind, counts, sorted(rejected), len(layout.classes), digest, checked, reused,
        sources=len(layout.sources) if layout.pixels is not None else 0,
    )  # fmt: skip
    summary = {"layout": layout.kind, "classes": len(layout.classes), "counts": counts, "hash": digest}
    if shape := _write_pixels(root, layout, kept):
        summary["pixels"] = shape
    (out / "dataset.json").write_text(json.dumps(summary, indent=1))
    (out / "report.txt").write_text(format_report(root, report), encoding="utf-8")
    return report


def _array_entries(root: Path, layout: Layout) -> dict[str, dict]:
    """Manifest entries for a dataset read as arrays: one line per source file, and per image its
    pixels' checksum (what the dataset hash takes)."""
    out = root / INDEX
    out.mkdir(exist_ok=True)
    lines = []
    for source in layout.sources:
        stat = source.stat()
        digest = hashlib.blake2b(source.read_bytes(), digest_size=16).hexdigest()
        entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "blake2b": digest, "error": None}
        lines.append(json.dumps({"path": str(source.relative_to(root))} | entry))
    _write_lines(out / MANIFEST, lines)
    return {
        rel: {"blake2b": hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest(), "error": None}
        for split in SPLITS
        for (rel, _), image in zip(layout.files[split], layout.pixels[split])
    }


def _write_pixels(
    root: Path, layout: Layout, kept: dict[str, list[tuple[str, int, str]]]
) -> list[int] | None:
    """Writes each split's images as one array when they are small and all of one size (CIFAR):
    the release's own arrays, or the files decoded once. Returns the training array's shape."""
    out = root / INDEX
    for split in SPLITS:
        (out / PIXELS.format(split=split)).unlink(missing_ok=True)  # never one left from before
    if layout.pixels is not None:
        arrays = {split: layout.pixels[split] for split in SPLITS}  # every image is kept
    else:
        arrays = _small_images(root, kept)
        if arrays is None:
            return None
    for split, array in arrays.items():
        path = out / PIXELS.format(split=split)
        with open(path.with_suffix(".tmp"), "wb") as f:
            np.save(f, array)
        path.with_suffix(".tmp").replace(path)
    return list(arrays["train"].shape)


def _small_images(root: Path, kept: dict[str, list[tuple[str, int, str]]]) -> dict[str, np.ndarray] | None:
    """The kept images decoded to RGB arrays, if the first is at most MEMORY_MAX_PX a side and
    every other has its size; else None."""
    if not kept["train"]:
        return None
    with Image.open(root / kept["train"][0][0]) as first:
        size = first.size
    if max(size) > MEMORY_MAX_PX:
        return None
    arrays = {}
    for split in SPLITS:
        array = np.empty((len(kept[split]), size[1], size[0], 3), dtype=np.uint8)
        for i, (rel, _, _) in enumerate(kept[split]):
            with Image.open(root / rel) as image:
                if image.size != size:
                    return None
                array[i] = np.asarray(image.convert("RGB"))
        arrays[split] = array
    return arrays


def format_report(root: Path, report: Report) -> str:
    lines = [f"dataset {root} ({report.layout} layout): {report.num_classes} classes"]
    lines += [f"  {split}: {n} images" for split, n in report.counts.items()]
    if report.sources:
        images = sum(report.counts.values())
        sources = report.sources
        lines.append(f"  held in arrays: {images} images read from {sources} release files (no image files)")
    else:
        checked, reused = report.checked, report.reused
        lines.append(f"  decoded now: {checked} files; unchanged since the last prepare: {reused}")
    lines.append(f"  dataset hash: {report.dataset_hash}")
    lines.append(f"  left out: {len(report.rejected)} files")
    lines += [f"    {rel}: {why}" for rel, why in report.rejected]
    return "\n".join(lines) + "\n"
