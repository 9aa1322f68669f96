from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import BROKEN, KEPT_ODD
from PIL import Image
from torchvision.datasets import ImageFolder

from pipeline.data.index import DatasetError, load_index
from pipeline.data.prepare import prepare
from pipeline.data.synth import CLASSES, write_dataset


def _digest(root: Path) -> str:
    files = sorted(p for p in root.rglob("*.JPEG"))
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def test_synth_is_deterministic_from_its_seed(tmp_path: Path) -> None:
    write_dataset(tmp_path / "a", 3, 2, seed=5)
    write_dataset(tmp_path / "b", 3, 2, seed=5)
    write_dataset(tmp_path / "c", 3, 2, seed=6)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_synth_writes_real_jpegs_of_varied_sizes_in_imagenet_layout(tmp_path: Path) -> None:
    count = write_dataset(tmp_path, 4, 2, seed=0)
    assert count == len(CLASSES) * 6
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == sorted(CLASSES)
    sizes = set()
    for path in tmp_path.rglob("*.JPEG"):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            sizes.add(image.size)
    assert len(sizes) > count // 2  # sizes vary like photos


def test_prepare_keeps_odd_images_and_reports_broken_ones(prepared_dataset: Path) -> None:
    index = load_index(prepared_dataset)
    listed = set(index.files("train")) | set(index.files("val"))
    for path in KEPT_ODD.values():
        assert path in listed
    for path in BROKEN.values():
        assert path not in listed
    report = (prepared_dataset / "index" / "report.txt").read_text()
    for path in BROKEN.values():
        assert path in report
    assert f"left out: {len(BROKEN)} files" in report
    damaged = next(line for line in report.splitlines() if BROKEN["damaged marker"] in line)
    assert "cannot decode with DALI" in damaged, damaged
    assert len(index.files("train")) == 12 * len(CLASSES) + 2  # + grayscale and CMYK
    assert len(index.files("val")) == 5 * len(CLASSES) + 1  # + the PNG


def test_labels_follow_the_folder_and_imagefolder_order(prepared_dataset: Path) -> None:
    index = load_index(prepared_dataset)
    reference = ImageFolder(str(prepared_dataset / "train"), allow_empty=True)
    assert index.classes == reference.classes
    for path, label in index.splits["train"] + index.splits["val"]:
        assert Path(path).parent.name == index.classes[label]


def test_prepare_is_repeatable_and_decodes_nothing_twice(prepared_dataset: Path) -> None:
    before = (prepared_dataset / "index" / "train.tsv").read_text()
    report = prepare(prepared_dataset, workers=1)
    assert (prepared_dataset / "index" / "train.tsv").read_text() == before
    assert report.checked == 0 and report.reused > 0


def test_prepare_is_incremental(tmp_path: Path) -> None:
    write_dataset(tmp_path, 3, 2, seed=0)
    first = prepare(tmp_path, workers=1)
    assert first.checked == 20
    changed = tmp_path / "train" / "dots" / "dots_00000.JPEG"
    changed.write_bytes((tmp_path / "train" / "dots" / "dots_00001.JPEG").read_bytes())
    (tmp_path / "val" / "dots" / "new.JPEG").write_bytes(changed.read_bytes())
    second = prepare(tmp_path, workers=1)
    assert (second.checked, second.reused) == (2, 19)
    assert second.dataset_hash != first.dataset_hash
    assert "val/dots/new.JPEG" in load_index(tmp_path).files("val")


def test_an_interrupted_prepare_resumes_where_it_stopped(tmp_path: Path) -> None:
    write_dataset(tmp_path, 3, 2, seed=0)
    complete = prepare(tmp_path, workers=1)
    manifest = tmp_path / "index" / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    # as if killed after 8 files, in the middle of writing the 9th line
    manifest.write_text("\n".join(lines[:8]) + "\n" + lines[8][:20])
    resumed = prepare(tmp_path, workers=1)
    assert (resumed.checked, resumed.reused) == (12, 8)
    assert resumed.dataset_hash == complete.dataset_hash
    assert manifest.read_text().splitlines() == lines


def test_file_names_with_spaces_quotes_and_non_ascii_work(tmp_path: Path) -> None:
    write_dataset(tmp_path, 2, 1, seed=0)
    source = tmp_path / "train" / "dots" / "dots_00000.JPEG"
    odd = ["with space.JPEG", 'it\'s "quoted".JPEG', "élan-日本.JPEG"]
    for name in odd:
        (source.parent / name).write_bytes(source.read_bytes())
    (source.parent / "tab\there.JPEG").write_bytes(source.read_bytes())
    report = prepare(tmp_path, workers=1)
    index = load_index(tmp_path)
    for name in odd:
        assert f"train/dots/{name}" in index.files("train")
    assert ("train/dots/tab\there.JPEG", "a tab or newline in the file name (rename it)") in report.rejected


def test_missing_or_unprepared_folders_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        prepare(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no train/ folder"):
        prepare(tmp_path)
    (tmp_path / "x").mkdir()
    with pytest.raises(DatasetError, match="not prepared"):
        load_index(tmp_path / "x")
    with pytest.raises(DatasetError, match="does not exist"):
        load_index(tmp_path / "nope")
    with pytest.raises(DatasetError, match="data prepare"):
        load_index(tmp_path)


def test_a_val_class_missing_from_train_is_an_error(tmp_path: Path) -> None:
    write_dataset(tmp_path, 1, 1, seed=0)
    (tmp_path / "val" / "unicorns").mkdir()
    with pytest.raises(DatasetError, match="unicorns"):
        prepare(tmp_path)
