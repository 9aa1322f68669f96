"""A checkpoint knows its own weights: `save` records their size and SHA-256, and `load` refuses a
truncated, altered or missing weights file by name instead of reading garbage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import Job
from pipeline.train import checkpoint


def _save(folder: Path, step: int, top1: float) -> Path:
    folder.mkdir(parents=True)
    model = nn.Linear(8, 3)
    checkpoint.save(
        folder, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epoch=1, step=step,
        epoch_step=0, ranks=[], job=Job(), metrics={"val/top1": top1},
    )  # fmt: skip
    return folder


def test_a_whole_checkpoint_reads_back_with_its_recorded_digest(tmp_path: Path) -> None:
    folder = _save(tmp_path / "checkpoint_a", step=7, top1=0.5)
    meta = json.loads((folder / checkpoint.META).read_text())
    assert meta["weights_bytes"] == (folder / checkpoint.WEIGHTS).stat().st_size
    assert len(meta["weights_sha256"]) == 64
    assert checkpoint.load(folder)["step"] == 7


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda data: data[: len(data) // 2], "it is truncated"),
        (lambda data: data[:100] + bytes([data[100] ^ 0x01]) + data[101:], "does not match the SHA-256"),
        (None, "has no checkpoint.pt: it is incomplete"),
    ],
    ids=["truncated", "one flipped bit", "missing"],
)
def test_damaged_weights_are_refused_by_name(tmp_path: Path, damage, said: str) -> None:
    folder = _save(tmp_path / "checkpoint_b", step=9, top1=0.6)
    weights = folder / checkpoint.WEIGHTS
    if damage is None:
        weights.unlink()
    else:
        weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(checkpoint.CorruptCheckpoint, match=said) as refused:
        checkpoint.load(folder)
    assert str(folder) in str(refused.value)


def test_the_run_lists_its_checkpoints_newest_and_best_first(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _save(run / "checkpoint_1", step=3, top1=0.7)
    _save(run / "checkpoint_2", step=6, top1=0.4)
    _save(run / "checkpoint_3", step=9, top1=0.6)
    assert [f.name for f in checkpoint.newest_first(run)] == ["checkpoint_3", "checkpoint_2", "checkpoint_1"]
    assert [f.name for f in checkpoint.best_first(run)] == ["checkpoint_1", "checkpoint_3", "checkpoint_2"]
