"""`pipeline.storage.Location`: one API over a local folder and an S3 bucket (moto's server), and
the checkpoint lookups that resume and registration make through it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.storage import Location, StorageError, is_remote
from pipeline.train import checkpoint


@pytest.fixture(params=["local", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    if request.param == "local":
        return Location(tmp_path / "store")
    return Location(request.getfixturevalue("s3"))


def test_files_are_written_listed_read_and_deleted_the_same_way_on_disk_and_in_a_bucket(
    place: Location,
) -> None:
    assert not place.exists() and place.children() == []
    (place / "a" / "one.txt").write_text("one")
    (place / "b.bin").write_bytes(b"\x00\x01\x02\x03")
    assert [child.name for child in place.children()] == ["a", "b.bin"]
    assert (place / "a").is_dir() and (place / "b.bin").is_file() and not (place / "c").exists()
    assert (place / "a" / "one.txt").read_text() == "one"
    assert (place / "b.bin").read_range(1, 2) == b"\x01\x02"
    assert [child.size() for child in place.children() if child.name == "b.bin"] == [4]
    place.check_writable()
    assert [child.name for child in place.children()] == ["a", "b.bin"]  # the probe is gone
    (place / "a").delete()
    assert not (place / "a" / "one.txt").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        (place / "missing").read_bytes()


def test_a_location_that_cannot_be_written_is_named_with_what_to_check(s3: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"cannot write to s3://no-such-bucket/runs: .*AWS_ENDPOINT_URL"):
        Location("s3://no-such-bucket/runs").check_writable()
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="check the path and its permissions"):
        Location(tmp_path / "file" / "runs").check_writable()


def test_uris_and_paths(s3: str) -> None:
    assert is_remote("s3://bucket/x") and is_remote("gs://b/x") and not is_remote("runs")
    assert not is_remote("file:///tmp/x") and Location("file:///tmp/x").uri == "/tmp/x"
    assert Location("runs").uri == str(Path("runs").resolve())
    assert (Location("s3://bucket/runs/") / "a").uri == "s3://bucket/runs/a"


def _fake_checkpoint(run: Location, name: str, step: int, top1: float | None) -> None:
    metrics = {"val/top1": top1} if top1 is not None else {}
    meta = {"format": checkpoint.FORMAT, "epoch": 1, "step": step, "epoch_step": 0, "metrics": metrics}
    (run / name / checkpoint.META).write_text(json.dumps(meta))


def test_the_latest_and_best_checkpoints_are_found_in_a_bucket_as_on_disk(place: Location) -> None:
    run = place / "run"
    assert checkpoint.latest(run) is None and checkpoint.best(run) is None
    _fake_checkpoint(run, "checkpoint_2026-01-01_00-00-01.000000", step=10, top1=0.5)
    _fake_checkpoint(run, "checkpoint_2026-01-01_00-00-02.000000", step=20, top1=0.7)
    _fake_checkpoint(run, "checkpoint_2026-01-01_00-00-03.000000", step=25, top1=None)  # mid-epoch
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's own files are passed by
    assert checkpoint.latest(run).name.endswith("03.000000")
    assert checkpoint.best(run).name.endswith("02.000000")
    assert checkpoint.read_meta(checkpoint.best(run))["step"] == 20
