"""Faults that tests inject into a training run, through `pipeline.cluster.launch.submit`'s
`step_hook`: called by every rank before each step. Nothing a user runs can trip them: they live
here, and the hook is None unless a caller passes one. Ray pickles them by value, so the
workers need not import this folder."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass

import ray.cloudpickle

from pipeline.storage import Location

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class RaiseAt:
    """Rank 0 raises at global step `step`, on every attempt."""

    step: int

    def __call__(self, rank: int, world: int, step: int, run_dir: Location) -> None:
        if step == self.step and rank == 0:
            raise RuntimeError(f"injected fault at step {step}")


@dataclass(frozen=True)
class KillAt:
    """The last rank SIGKILLs its own process at global step `step`, the first time the run gets
    there (a marker in the run's folder remembers it)."""

    step: int

    def __call__(self, rank: int, world: int, step: int, run_dir: Location) -> None:
        if step != self.step or rank != world - 1:
            return
        marker = run_dir / "faults" / f"killed-at-step-{step}"
        if not marker.exists():
            marker.write_text("")
            os.kill(os.getpid(), signal.SIGKILL)
