"""The one checkpoint schema: what a training checkpoint holds, and how it is written and read.

A checkpoint is a folder with `checkpoint.pt` (a plain dict of tensors and primitives, loaded
with `weights_only=True`, never unpickling objects) and `meta.json` (epoch, step and metrics,
readable without torch). Ray Train moves the folder to the run's storage.

    save(folder, model=model, optimizer=optimizer, epoch=1, step=120, job=job, metrics={...})
    state = load(folder)   # {"model": ..., "optimizer": ..., "epoch": 1, "step": 120, "job": {...}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import Job, to_dict

FORMAT = 1
WEIGHTS = "checkpoint.pt"
META = "meta.json"


def save(
    folder: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    step: int,
    job: Job,
    metrics: dict[str, float],
) -> None:
    """Writes a checkpoint into `folder`. `epoch` is the next epoch to run, `step` the next step."""
    meta = {"format": FORMAT, "epoch": epoch, "step": step, "metrics": metrics}
    state = meta | {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "job": to_dict(job)}
    torch.save(state, folder / WEIGHTS)
    (folder / META).write_text(json.dumps(meta, indent=1))


def load(folder: Path) -> dict[str, Any]:
    """Reads a checkpoint written by `save`, tensors on the CPU."""
    state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"{folder / WEIGHTS} has checkpoint format {state.get('format')}, expected {FORMAT}")
    return state


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / META).read_text())


def latest(run_dir: Path) -> Path | None:
    """The checkpoint folder under `run_dir` with the highest (epoch, step), or None."""
    found = [(read_meta(p.parent), p.parent) for p in run_dir.glob(f"*/{META}")]
    if not found:
        return None
    return max(found, key=lambda item: (item[0]["epoch"], item[0]["step"]))[1]
