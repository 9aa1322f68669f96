"""CIFAR in its canonical python release and as image folders: prepared into the same index,
held in memory, and augmented by DALI as the paper says (4-pixel zero padding, a random 32 x 32
crop, a horizontal flip; per-pixel mean or per-channel normalisation)."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from cifar_release import images, write_cifar10
from conftest import cli
from PIL import Image

from pipeline.config import load_job
from pipeline.data.index import DatasetError, load_index
from pipeline.data.loader import build_loader
from pipeline.data.prepare import prepare
from pipeline.data.synth import CLASSES

TRAIN, TEST = 60, 20


@pytest.fixture(scope="module")
def archive_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar-archive")
    write_cifar10(root, TRAIN, TEST)
    prepare(root)
    return root


def _job(root: Path, *overrides: str):
    return load_job(
        "cifar10-resnet20",
        [f"data.root='{root}'", "scaling.use_gpu=false", "scaling.batch_size_per_worker=8",
         "data.threads_per_worker=1", "data.prefetch_batches=1", *overrides],
    )  # fmt: skip


def _batches(loader) -> list[tuple[np.ndarray, list[int], list[int]]]:
    return [(x.numpy(), y.tolist(), ids.tolist()) for x, y, ids in loader]


def test_the_canonical_archive_and_its_folder_prepare_to_the_same_dataset(archive_root, tmp_path) -> None:
    index = load_index(archive_root)
    assert index.layout == "cifar-10-python"
    assert index.classes == list(CLASSES)
    assert (len(index.splits["train"]), len(index.splits["val"])) == (TRAIN, TEST)
    pixels, labels = images(TRAIN + TEST, seed=0)
    assert index.labels("train") == labels[:TRAIN] and index.labels("val") == labels[TRAIN:]
    np.testing.assert_array_equal(np.load(archive_root / "index" / "pixels-train.npy"), pixels[:TRAIN])
    np.testing.assert_array_equal(np.load(archive_root / "index" / "pixels-val.npy"), pixels[TRAIN:])
    manifest = (archive_root / "index" / "manifest.jsonl").read_text()
    assert "cifar-10-python.tar.gz" in manifest

    write_cifar10(tmp_path, TRAIN, TEST, extract=True)
    prepare(tmp_path)
    assert load_index(tmp_path).dataset_hash == index.dataset_hash  # same images, same hash


def test_prepare_says_an_archive_is_held_in_arrays_and_refuses_shards_of_it(tmp_path: Path) -> None:
    write_cifar10(tmp_path, TRAIN, TEST)
    prepared = cli("data", "prepare", str(tmp_path))
    assert prepared.returncode == 0, prepared.stderr
    assert f"held in arrays: {TRAIN + TEST} images read from 1 release files" in prepared.stdout
    assert "decoded now" not in prepared.stdout  # no file was decoded: the arrays were read

    sharded = cli("data", "prepare", str(tmp_path), "--shards")
    assert sharded.returncode == 2
    assert len(sharded.stderr.splitlines()) == 1 and sharded.stderr.startswith("error: ")
    assert "CIFAR's python release" in sharded.stderr and "data.source = 'memory'" in sharded.stderr
    assert not (tmp_path / "index" / "shards").exists()


def test_image_folders_of_small_images_are_held_as_arrays_too(tmp_path: Path) -> None:
    pixels, labels = images(12, seed=3)
    for split, rows in (("train", range(8)), ("test", range(8, 12))):
        for i in rows:
            folder = tmp_path / split / CLASSES[labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i]).save(folder / f"{i:04d}.png")  # lossless, to compare pixels
    report = prepare(tmp_path)
    assert report.counts == {"train": 8, "val": 4}
    index = load_index(tmp_path)
    held = np.load(tmp_path / "index" / "pixels-train.npy")
    for row, (rel, label) in enumerate(index.splits["train"]):
        np.testing.assert_array_equal(held[row], pixels[int(Path(rel).stem)])
        assert index.classes[label] == Path(rel).parent.name


def test_a_pickle_that_asks_for_code_is_refused_and_not_run(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path, 10, 5, extract=True)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (folder / "data_batch_1").write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(DatasetError, match="the pickle asks for .*; a CIFAR batch holds only arrays"):
        prepare(tmp_path)
    assert not marker.exists()


def test_a_damaged_archive_is_a_clear_error(tmp_path: Path) -> None:
    archive = write_cifar10(tmp_path, 10, 5)
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(
        DatasetError, match="cifar-10-python.tar.gz is not a readable tar.gz.*download it again"
    ):
        prepare(tmp_path)


def test_an_archive_without_the_test_batch_names_it(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        data = pickle.dumps({b"label_names": [b"a"]}, protocol=2)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DatasetError, match="lacks cifar-10-batches-py/data_batch_1.*test_batch"):
        prepare(tmp_path)


def _candidates(image: np.ndarray, pad: int) -> dict[tuple[int, int, bool], np.ndarray]:
    """Every crop of `image` zero-padded by `pad`, and its mirror: what the paper's augmentation may give."""
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    size = image.shape[0]
    out = {}
    for y in range(2 * pad + 1):
        for x in range(2 * pad + 1):
            crop = padded[y : y + size, x : x + size]
            out[(y, x, False)] = crop
            out[(y, x, True)] = crop[:, ::-1]
    return out


def test_training_images_are_padded_cropped_and_flipped_as_the_paper(archive_root: Path) -> None:
    # mean 0 and std 1/255: the loader's output is the augmented pixels themselves
    job = _job(
        archive_root,
        "data.normalize='channel'",
        "data.mean=[0.0, 0.0, 0.0]",
        "data.std=[0.00392156862745098, 0.00392156862745098, 0.00392156862745098]",
    )  # noqa: E501
    pixels = np.load(archive_root / "index" / "pixels-train.npy")
    seen = set()
    for batch, _, ids in _batches(build_loader(job, load_index(archive_root), "train")):
        for out, row in zip(batch, ids):
            out = np.rint(out.transpose(1, 2, 0)).astype(np.uint8)
            found = [key for key, crop in _candidates(pixels[row], 4).items() if np.array_equal(crop, out)]
            assert found, f"image {row} is no padded crop of its source"
            seen |= {found[0][:2]} | {("flip", found[0][2])}
    assert {("flip", True), ("flip", False)} <= seen
    assert len(seen) > 10  # many offsets among the 81 of a 4-pixel pad


def test_pixel_mean_subtracts_the_mean_training_image(archive_root: Path) -> None:
    job = _job(archive_root, "data.normalize='pixel_mean'")
    pixels = {
        s: np.load(archive_root / "index" / f"pixels-{s}.npy").astype(np.float32) for s in ("train", "val")
    }
    mean = pixels["train"].mean(axis=0)
    for batch, _, ids in _batches(build_loader(job, load_index(archive_root), "val")):
        expected = (pixels["val"][ids] - mean) / 255
        np.testing.assert_allclose(batch, expected.transpose(0, 3, 1, 2), atol=1e-5)


def test_a_holdout_splits_the_training_set_the_same_way_every_time(archive_root: Path) -> None:
    job = _job(archive_root, "data.holdout=20", "scaling.batch_size_per_worker=4")
    index = load_index(archive_root)
    train = {i for _, _, ids in _batches(build_loader(job, index, "train")) for i in ids}
    val = [i for _, _, ids in _batches(build_loader(job, index, "val")) for i in ids]
    assert len(val) == len(set(val)) == 20 and len(train) == TRAIN - 20  # 40 split evenly in 4s
    assert not train & set(val)
    again = [i for _, _, ids in _batches(build_loader(job, index, "val")) for i in ids]
    assert again == val
    labels = [label for _, label, _ in _batches(build_loader(job, index, "val"))]
    assert sum(labels, []) == [index.labels("train")[i] for i in val]  # held-out images keep their labels


def test_two_shards_split_each_epoch_and_a_restored_loader_continues_exactly(archive_root: Path) -> None:
    job = _job(archive_root)
    index = load_index(archive_root)
    shards = [_batches(build_loader(job, index, "train", shard, 2)) for shard in (0, 1)]
    ids = [[i for _, _, batch_ids in batches for i in batch_ids] for batches in shards]
    assert len(ids[0]) == len(ids[1]) == 24 and not set(ids[0]) & set(ids[1])  # 30 each, 3 batches of 8

    loader = build_loader(job, index, "train")
    batches = iter(loader)
    next(batches), next(batches)
    state = loader.state()
    rest = [next(batches) for _ in range(5)]  # into the next epoch
    restored = iter(build_loader(job, index, "train", checkpoint=state))
    for (x, _, i), (x2, _, i2) in zip(rest, (next(restored) for _ in range(5))):
        assert i.tolist() == i2.tolist()
        np.testing.assert_array_equal(x.numpy(), x2.numpy())  # the same crops and flips
