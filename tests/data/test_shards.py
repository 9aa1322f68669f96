"""Training and validation read the same samples from webdataset shards as from files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load_job
from pipeline.data.index import load_index
from pipeline.data.loader import build_loader
from pipeline.data.prepare import prepare
from pipeline.data.shards import read_shards, shard_dir, write_shards


@pytest.fixture(scope="module")
def sharded(prepared_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sharded") / "dataset"
    shutil.copytree(prepared_dataset, root)
    write_shards(load_index(root), samples_per_shard=10)
    return root


def _job(root: Path, source: str):
    return load_job(
        "quickstart",
        [f"data.root='{root}'", f"data.source='{source}'", "scaling.batch_size_per_worker=8",
         "data.crop_px=32", "data.val_resize_px=36", "data.val_crop_px=32"],
    )  # fmt: skip


def test_shards_hold_every_kept_file_in_small_tars(sharded: Path) -> None:
    index = load_index(sharded)
    train, _ = read_shards(sharded, "train")
    assert len(train) == -(-len(index.files("train")) // 10)
    assert all(Path(p).stat().st_size > 0 for p in train)


def test_each_shard_has_the_index_dalis_own_tool_writes(sharded: Path, tmp_path: Path) -> None:
    tars, indexes = read_shards(sharded, "train")
    assert indexes == [str(Path(t).with_suffix(".idx")) for t in tars]
    for tar, ours in zip(tars, indexes):
        theirs = tmp_path / Path(tar).with_suffix(".idx").name
        wds2idx = Path(sys.executable).parent / "wds2idx"  # DALI's own indexer
        subprocess.run([wds2idx, tar, theirs], check=True, capture_output=True)
        assert Path(ours).read_text() == theirs.read_text()


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_shard_epoch_covers_the_same_samples_and_labels_as_files(sharded: Path, split: str) -> None:
    index = load_index(sharded)
    seen = {}
    for source in ("files", "shards"):
        per_shard = []
        for shard_id in range(2):
            loader = build_loader(_job(sharded, source), index, split, shard_id=shard_id, num_shards=2)
            per_shard.append(
                [(i, label) for _, labels, ids in loader for i, label in zip(ids.tolist(), labels.tolist())]
            )
        assert not {i for i, _ in per_shard[0]} & {i for i, _ in per_shard[1]}
        seen[source] = sorted(per_shard[0] + per_shard[1])
    assert all(label == index.labels(split)[i] for i, label in seen["shards"])
    if split == "val":  # every sample exactly once, from either source
        assert seen["shards"] == seen["files"]
        assert [i for i, _ in seen["shards"]] == list(range(len(index.files("val"))))
    else:  # the same number of distinct samples; which few the last partial batch drops depends on the order
        assert len(seen["shards"]) == len({i for i, _ in seen["shards"]}) == len(seen["files"])


def test_validation_pixels_are_the_same_from_shards_and_files(sharded: Path) -> None:
    index = load_index(sharded)
    by_id = {}
    for source in ("files", "shards"):
        for images, _, ids in build_loader(_job(sharded, source), index, "val"):
            for image, i in zip(images, ids.tolist()):
                by_id.setdefault(i, []).append(image)
    assert all(torch.equal(a, b) for a, b in by_id.values())


def test_shards_of_an_older_index_are_refused_and_rewritten(sharded: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(sharded, root)
    (root / "val" / "dots" / "extra.JPEG").write_bytes((root / load_index(root).files("val")[0]).read_bytes())
    prepare(root, workers=1)
    with pytest.raises(FileNotFoundError, match="older index"):
        read_shards(root, "val")
    write_shards(load_index(root), samples_per_shard=10)
    assert len(read_shards(root, "val")[0]) == -(-len(load_index(root).files("val")) // 10)
    assert (shard_dir(root) / "shards.json").is_file()
