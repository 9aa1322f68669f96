"""Each ImageNet layout, built from the same JPEGs, gives every file its right class."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import build_layout
from torchvision.datasets import ImageFolder

from pipeline.data.index import DatasetError, load_index
from pipeline.data.layouts import read_layout
from pipeline.data.prepare import prepare
from pipeline.data.synth import write_dataset


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("source")
    write_dataset(root, train_per_class=3, val_per_class=4, seed=2)
    return root


@pytest.mark.parametrize("kind", ["folders", "kaggle", "devkit"])
def test_prepare_gives_every_file_its_class_in_imagefolder_order(
    kind: str, source: Path, tmp_path: Path
) -> None:
    expected = build_layout(kind, source, tmp_path)
    report = prepare(tmp_path, workers=1)
    assert report.layout == kind
    index = load_index(tmp_path)
    assert index.classes == ImageFolder(str(source / "train")).classes
    got = {path: index.classes[label] for split in ("train", "val") for path, label in index.splits[split]}
    assert got == expected
    assert len(index.files("val")) == 4 * 4


def test_names_come_from_timm_for_imagenet_wnids(tmp_path: Path) -> None:
    write_dataset(tmp_path, 1, 1, seed=0)
    for split in ("train", "val"):
        (tmp_path / split / "checkerboard").rename(tmp_path / split / "n01440764")
    layout = read_layout(tmp_path)
    assert layout.names["n01440764"] == "tench, Tinca tinca"
    assert layout.names["dots"] == "dots"


def test_the_same_data_in_another_layout_has_another_hash_but_a_copy_has_the_same(
    source: Path, tmp_path: Path
) -> None:
    build_layout("folders", source, tmp_path / "a")
    build_layout("folders", source, tmp_path / "b")
    build_layout("kaggle", source, tmp_path / "c")
    hashes = [prepare(tmp_path / name, workers=1).dataset_hash for name in "abc"]
    assert hashes[0] == hashes[1] != hashes[2]


@pytest.mark.parametrize(
    "kind, remove, message",
    [
        ("kaggle", "LOC_val_solution.csv", "LOC_val_solution.csv"),
        ("devkit", "ILSVRC2012_devkit_t12/data/meta.mat", "meta.mat"),
    ],
)
def test_missing_label_files_are_named(
    kind: str, remove: str, message: str, source: Path, tmp_path: Path
) -> None:
    build_layout(kind, source, tmp_path)
    (tmp_path / remove).unlink()
    with pytest.raises(DatasetError, match=message):
        prepare(tmp_path, workers=1)
