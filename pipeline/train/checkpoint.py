"""The one checkpoint schema: what a training checkpoint holds, and how it is written and read.

A checkpoint is a folder with `checkpoint.pt` (a plain dict of tensors and primitives, loaded
with `weights_only=True`, never unpickling objects) and `meta.json` (epoch, step and metrics,
readable without torch, and the size and SHA-256 of `checkpoint.pt`). Ray Train moves the folder
to the run's storage, a local folder or an object store (`pipeline.storage.Location`), where
`latest` and `best` find them again.

A checkpoint whose weights are missing, truncated or altered (its node died mid-upload, a byte
flipped at rest) fails `load` with `CorruptCheckpoint`, naming it; `complete` gives the run's
checkpoints newest first for a caller that falls back to the previous whole one.

    save(folder, model=model, optimizer=optimizer, epoch=1, step=120, epoch_step=0, ranks=[...],
         job=job, metrics={...})
    state = load(folder)   # {"model": ..., "optimizer": ..., "epoch": 1, "step": 120, "ranks": [...], ...}
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import Job, to_dict
from pipeline.storage import Location

FORMAT = 3
WEIGHTS = "checkpoint.pt"
META = "meta.json"


class CorruptCheckpoint(ValueError):
    """A checkpoint whose weights file is missing or differs from what `save` recorded."""


def save(
    folder: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    step: int,
    epoch_step: int,
    ranks: list[dict[str, Any]],
    job: Job,
    metrics: dict[str, float],
    scaler: torch.amp.GradScaler | None = None,
    ema: nn.Module | None = None,
    clock: dict[str, float | None] | None = None,
    per_class: dict[str, torch.Tensor] | None = None,
) -> None:
    """Writes a checkpoint into `folder`.

    Args:
        epoch, step, epoch_step: the epoch in progress, the next global step, and the steps of
            `epoch` already taken (0 at an epoch boundary, where `epoch` is the next to run).
        ranks: per rank, in rank order: "loader" (the DALI pipeline's serialized state) and
            "torch_rng" (torch's CPU RNG state).
        scaler, ema: the fp16 GradScaler and the EMA model, when the run has them.
        clock: "train_s" (seconds trained so far) and "target_reached_s".
        per_class: "model" (and "ema"): each class's validation samples and top-1 errors
            (`pipeline.train.step.Evaluation.per_class`), at an epoch's end.
    """
    meta = {"format": FORMAT, "epoch": epoch, "step": step, "epoch_step": epoch_step, "metrics": metrics}
    state = meta | {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "ranks": ranks,
        "job": to_dict(job),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "ema": ema.state_dict() if ema is not None else None,
        "clock": clock or {"train_s": 0.0, "target_reached_s": None},
        "per_class": per_class,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    (folder / WEIGHTS).write_bytes(data)
    # the job too, so that a resubmission compares settings without loading the weights; the
    # weights' size and digest, so that a reader knows whole weights from a part or garbage
    sealed = {"weights_bytes": len(data), "weights_sha256": hashlib.sha256(data).hexdigest()}
    (folder / META).write_text(json.dumps(meta | sealed | {"job": state["job"]}, indent=1))


def load(folder: Path | Location) -> dict[str, Any]:
    """Reads a checkpoint written by `save`, tensors on the CPU, from a local folder or storage.

    Raises:
        CorruptCheckpoint: the weights file is missing, or its size or SHA-256 differ from those
            `save` recorded in meta.json.
    """
    folder = Location(folder)
    weights = folder / WEIGHTS
    try:
        data = weights.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpoint(f"checkpoint {folder} has no {WEIGHTS}: it is incomplete") from None
    sealed = read_meta(folder)
    if "weights_sha256" in sealed:  # checkpoints from before the digest are read as they are
        if len(data) != sealed["weights_bytes"]:
            raise CorruptCheckpoint(
                f"checkpoint {folder}: {WEIGHTS} has {len(data):,} bytes, {sealed['weights_bytes']:,} were "
                "saved: it is truncated"
            )
        if hashlib.sha256(data).hexdigest() != sealed["weights_sha256"]:
            raise CorruptCheckpoint(
                f"checkpoint {folder}: {WEIGHTS} does not match the SHA-256 recorded when it was saved: "
                "it is corrupt"
            )
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"{weights} has checkpoint format {state.get('format')}, expected {FORMAT}")
    return state


def read_meta(folder: Path | Location) -> dict[str, Any]:
    meta = json.loads((Location(folder) / META).read_text())
    meta.setdefault("epoch_step", 0)  # format 1 checkpoints were written at epoch ends only
    return meta


def read_job(folder: Path | Location) -> dict[str, Any]:
    """The resolved job a checkpoint was trained with (as `pipeline.config.to_dict` gives it)."""
    meta = read_meta(folder)
    return meta["job"] if "job" in meta else load(folder)["job"]  # older checkpoints: the weights file


def _checkpoints(run: Path | Location) -> list[tuple[dict[str, Any], Location]]:
    """The (meta, folder) of each checkpoint in a run's storage folder (Ray Train's
    `checkpoint_<time>` folders; what else is there, such as Ray's own state files, is passed by)."""
    found = []
    for folder in Location(run).children():
        if folder.name.startswith("checkpoint_") and (folder / META).is_file():
            found.append((read_meta(folder), folder))
    return found


def latest(run: Path | Location) -> Location | None:
    """The checkpoint folder of a run with the highest step, or None."""
    found = [(meta["step"], folder) for meta, folder in _checkpoints(run)]
    return max(found)[1] if found else None


def newest_first(run: Path | Location, before_step: int | None = None) -> list[Location]:
    """The run's checkpoint folders, highest step first (those of steps below `before_step`
    only, when given): where a resume looks for the newest one that `load` reads whole."""
    found = [
        (m["step"], f.name, f) for m, f in _checkpoints(run) if before_step is None or m["step"] < before_step
    ]
    return [folder for _, _, folder in sorted(found, reverse=True)]


def best(run: Path | Location) -> Location | None:
    """The scored checkpoint of a run with the highest val/top1 (the later one on a tie); None
    when there is none (mid-epoch checkpoints carry no score)."""
    ranked = best_first(run)
    return ranked[0] if ranked else None


def best_first(run: Path | Location) -> list[Location]:
    """The run's scored checkpoints, highest val/top1 first (the later one on a tie)."""
    found = [
        (meta["metrics"]["val/top1"], meta["step"], folder)
        for meta, folder in _checkpoints(run)
        if meta["metrics"].get("val/top1", -1.0) >= 0
    ]
    return [folder for _, _, folder in sorted(found, reverse=True)]
