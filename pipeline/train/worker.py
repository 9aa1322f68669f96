"""What one rank's training loop shares between its parts (`pipeline.train.loop`, and
`pipeline.train.persist`, which moves its checkpoints to and from storage): the run's position
and clock (`State`), and the rank's model, optimizer, logger and settings (`Worker`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.config import Job
from pipeline.storage import Location
from pipeline.tracking import RunLogger
from pipeline.train.ema import WeightEMA


@dataclass
class State:
    epoch: int = 0  # the epoch in progress (or next to run, when epoch_step is 0)
    step: int = 0  # next global step (optimizer steps since the start)
    epoch_step: int = 0  # steps of `epoch` already taken: > 0 only in a mid-epoch checkpoint
    # the run's wall-clock seconds: from `submit` through every epoch of every attempt (an attempt
    # that resumes adds its set-up, not the time the run stood still in between)
    train_s: float = 0.0
    target_reached_s: float | None = None  # train_s at the first evaluation at or above target_top1


@dataclass
class Worker:
    """What every part of one rank's loop shares."""

    job: Job  # as run by this many workers (micro-batch and accumulation)
    submitted: Job  # as submitted: what checkpoints record
    rank: int
    world: int
    device: torch.device
    model: nn.Module  # the bare model: checkpoints and evaluation use it, not the DDP wrapper
    optimizer: torch.optim.Optimizer
    ema: WeightEMA | None
    logger: RunLogger | None  # rank 0 only
    sample_log: Path | None  # where this rank appends the ids of every batch, when asked
    run_dir: Location
    step_hook: Callable[[int, int, int, Path], None] | None  # tests inject faults here; None for users
    board: object | None  # rank 0, when the driver draws a live bar: its board (pipeline.train.progress)
    scaler: torch.amp.GradScaler | None = field(default=None)  # the Stepper's, once it exists
    uploads: list[threading.Event] = field(default_factory=list)  # rank 0's, set as each one ends
