"""The live progress bar at the driver, fed by rank 0 through a small Ray actor.

Rank 0 posts its latest `Progress` (a few floats) to the board, fire-and-forget; the driver
polls the board twice a second and redraws one tqdm bar per epoch. Without a terminal (logs,
`ray job` drivers) there is no board and rank 0 prints progress lines instead.

    board = Board.remote()                        # driver; the handle goes into the train config
    board.post.remote(progress)                   # rank 0, every run.log_every_steps steps
    with ProgressBar(board, epochs, sys.stderr):  # driver, around trainer.fit()
        trainer.fit()
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TextIO

import ray
from tqdm import tqdm

POLL_S = 0.5


@dataclass(frozen=True)
class Progress:
    """Where rank 0 is in the epoch, and how fast it goes."""

    epoch: int
    epoch_step: int
    steps: int
    loss: float
    images_per_s: float
    data_wait: float
    eta_s: float

    def line(self) -> str:
        return (
            f"epoch {self.epoch} step {self.epoch_step}/{self.steps} "
            f"({100 * self.epoch_step // self.steps} %)  loss {self.loss:.4f}  "
            f"images/s {self.images_per_s:.1f}  data wait {100 * self.data_wait:.0f} %  "
            f"epoch ETA {self.eta_s // 60:.0f}m{self.eta_s % 60:02.0f}s"
        )

    def metrics(self, lr: float) -> dict[str, float]:
        return {
            "train/step_loss": self.loss,
            "train/lr": lr,
            "train/step_images_per_s": self.images_per_s,
            "train/step_data_wait": self.data_wait,
        }


@ray.remote(num_cpus=0)
class Board:
    """Holds rank 0's latest progress."""

    def __init__(self):
        self.latest = None

    def post(self, progress) -> None:
        self.latest = progress

    def read(self):
        return self.latest


class ProgressBar:
    """Redraws a bar from the board's latest progress on a background thread, until closed."""

    def __init__(self, board, epochs: int, stream: TextIO):
        self._board, self._epochs, self._stream = board, epochs, stream
        self._bar: tqdm | None = None
        self._epoch = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resnet-pipe-progress", daemon=True)

    def __enter__(self) -> ProgressBar:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._draw(ray.get(self._board.read.remote()))  # the last word, however quick the run
        if self._bar is not None:
            self._bar.close()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self._draw(ray.get(self._board.read.remote(), timeout=POLL_S * 4))
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
                continue  # a busy or restarting cluster: keep the last picture

    def _draw(self, progress) -> None:
        if progress is None:
            return
        if progress.epoch != self._epoch:
            if self._bar is not None:
                self._bar.close()
            self._epoch = progress.epoch
            self._bar = tqdm(
                total=progress.steps,
                desc=f"epoch {progress.epoch + 1}/{self._epochs}",
                file=self._stream,
                bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps  {postfix}",
                dynamic_ncols=True,
            )
        eta = progress.eta_s
        self._bar.set_postfix_str(
            f"loss {progress.loss:.4f}  {progress.images_per_s:,.1f} images/s  "
            f"data wait {100 * progress.data_wait:.0f} %  ETA {eta // 60:.0f}m{eta % 60:02.0f}s",
            refresh=False,
        )
        self._bar.update(progress.epoch_step - self._bar.n)
