"""A dataset on an object store (moto's S3 server): `data upload`, then each node's staged copy,
checked against the shards' SHA-256, continued after an interruption and reused afterwards."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.config import load_job
from pipeline.data.cache import stage
from pipeline.data.index import INDEX, DatasetError, load_index
from pipeline.data.loader import build_loader
from pipeline.data.shards import FOLDER, first_image, read_shards, write_shards
from pipeline.data.upload import upload
from pipeline.storage import Location


@pytest.fixture
def sharded(prepared_dataset: Path, tmp_path: Path) -> Path:
    root = tmp_path / "dataset"
    shutil.copytree(prepared_dataset, root)
    write_shards(load_index(root), samples_per_shard=16)
    return root


def test_an_uploaded_dataset_reads_as_the_local_one_and_a_second_upload_sends_only_the_lists(
    sharded: Path, s3: str
) -> None:
    uploaded, kept = upload(sharded, s3)
    local, remote = load_index(sharded), load_index(s3)
    assert uploaded == {"shards": len(list((sharded / INDEX / FOLDER).glob("*.tar"))) * 2} and kept == 0
    assert (remote.dataset_hash, remote.classes, remote.splits) == (
        local.dataset_hash,
        local.classes,
        local.splits,
    )
    assert read_shards(s3, "val")[0][0] == f"{s3}/index/shards/val-00000.tar"
    assert first_image(s3, "val") == first_image(sharded, "val")
    assert upload(sharded, s3) == ({"shards": 0}, uploaded["shards"])


def test_a_node_stages_a_checked_copy_once_continues_a_broken_one_and_refuses_a_corrupt_shard(
    sharded: Path, s3: str, tmp_path: Path
) -> None:
    upload(sharded, s3)
    cache = tmp_path / "cache"
    copy = stage(Location(s3), cache)
    assert load_index(copy).dataset_hash == load_index(sharded).dataset_hash
    for tar in (sharded / INDEX / FOLDER).glob("*"):
        assert (copy / INDEX / FOLDER / tar.name).read_bytes() == tar.read_bytes()

    # interrupted: one shard and the completion mark missing; the others are kept as they are
    kept = copy / INDEX / FOLDER / "train-00000.tar"
    before = kept.stat().st_mtime_ns
    (copy / INDEX / FOLDER / "train-00001.tar").unlink()
    (copy / INDEX / "dataset.json").unlink()
    assert stage(Location(s3), cache) == copy
    assert kept.stat().st_mtime_ns == before
    assert (copy / INDEX / FOLDER / "train-00001.tar").read_bytes() == (
        sharded / INDEX / FOLDER / "train-00001.tar"
    ).read_bytes()

    # a complete copy is used as it is: the store is not read for its shards again
    Location(f"{s3}/index/shards/train-00001.tar").write_bytes(b"changed in the store")
    assert stage(Location(s3), cache) == copy

    # a fresh node meets the changed shard: refused, naming it, and nothing left half-made
    with pytest.raises(DatasetError, match=r"train-00001\.tar differs from the checksum"):
        stage(Location(s3), tmp_path / "other-node")
    assert not (tmp_path / "other-node" / load_index(sharded).dataset_hash / INDEX / "dataset.json").exists()


def test_pixel_arrays_travel_to_a_bucket_and_a_node_stages_them_checked(tmp_path: Path, s3: str) -> None:
    from cifar_release import write_cifar10

    from pipeline.data.memory import PIXELS
    from pipeline.data.prepare import prepare

    root = tmp_path / "cifar10"
    write_cifar10(root, train=30, test=10)  # the python release: arrays, no image files, no shards
    prepare(root)
    assert upload(root, s3) == ({"memory": 2}, 0)
    assert upload(root, s3) == ({"memory": 0}, 2)  # a second upload sends the lists only

    copy = stage(Location(s3), tmp_path / "cache", "memory")
    for split in ("train", "val"):
        name = PIXELS.format(split=split)
        assert (copy / INDEX / name).read_bytes() == (root / INDEX / name).read_bytes()
    assert load_index(copy).splits == load_index(root).splits
    # what a worker does with data.root = the bucket (pipeline.train.loop): stage, then read the copy
    job = load_job(
        "cifar10-resnet20",
        [
            f"data.root='{s3}'",
            "scaling.use_gpu=false",
            "scaling.batch_size_per_worker=8",
            "data.threads_per_worker=1",
        ],
    )
    staged = build_loader(
        job, load_index(stage(load_index(s3).root, tmp_path / "cache", job.data.source)), "train"
    )
    here = build_loader(job, load_index(root), "train")
    for (a, _, a_ids), (b, _, b_ids) in zip(staged, here):
        assert torch.equal(a_ids, b_ids) and torch.equal(a, b)
    with pytest.raises(DatasetError, match="has no shards"):
        stage(Location(s3), tmp_path / "cache", "shards")

    Location(f"{s3}/index/pixels-val.npy").write_bytes(b"changed in the store")
    with pytest.raises(DatasetError, match=r"pixels-val\.npy differs from the checksum"):
        stage(Location(s3), tmp_path / "other-node", "memory")


@contextlib.contextmanager
def small_disk(folder: Path, size_bytes: int):
    """`folder` on a tmpfs of `size_bytes` of its own (we run as root), unmounted at the end."""
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_cache_short_of_room_evicts_an_unused_copy_then_refuses_by_name(
    sharded: Path, s3: str, tmp_path: Path
) -> None:
    upload(sharded, s3)
    needed = sum(f.stat().st_size for f in (sharded / INDEX / FOLDER).iterdir()) + (1 << 20)  # and a margin
    with small_disk(tmp_path / "cache", needed + (512 << 10)) as cache:
        # an unused copy of another dataset takes most of the disk: it goes to make room
        other = cache / "another-dataset-hash"
        other.mkdir()
        (other / "train-00000.tar").write_bytes(b"\0" * (shutil.disk_usage(cache).free - (256 << 10)))
        copy = stage(Location(s3), cache)
        assert not other.exists() and load_index(copy).dataset_hash == load_index(sharded).dataset_hash

    with small_disk(tmp_path / "tiny", 64 << 10) as tiny:  # cannot hold the dataset at all
        with pytest.raises(DatasetError) as refused:
            stage(Location(s3), tiny)
        leftovers = [p.name for p in tiny.rglob("*") if p.is_file()]
    said = str(refused.value)
    assert said.startswith(f"the dataset cache {tiny} on ") and "\n" not in said
    assert re.search(r"has [\d.]+ MB free; staging needs [\d.]+ MB: set data.cache_dir", said), said
    assert not any(name.endswith((".tar", ".part")) for name in leftovers), leftovers  # nothing half-written
