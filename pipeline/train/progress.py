"""What the user sees of a run, at the driver, fed by rank 0 through a small Ray actor.

Rank 0 sends its lines (epoch results, a resume, a warning: what it logs to `resnet_pipe`) to
the board, and on a terminal also its latest `Progress` (a few floats), fire-and-forget; the
driver polls the board twice a second, prints the lines, and on a terminal redraws one tqdm bar
per epoch (without one, rank 0 sends a progress line every `run.log_every_steps` steps instead).
Nothing else of the workers reaches the driver's output: Ray's own messages stay in its logs.

    board = Board.remote()                              # driver; the handle goes into the train config
    board.post.remote(progress); board.say.remote(line) # rank 0
    with ProgressView(board, epochs, sys.stderr, live=True):  # driver, around trainer.fit()
        trainer.fit()
"""

from __future__ import annotations

import logging
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
    error: float  # top-1 training error over the batches since the last progress
    images_per_s: float
    data_wait: float
    eta_s: float

    def line(self) -> str:
        return (
            f"epoch {self.epoch} step {self.epoch_step}/{self.steps} "
            f"({100 * self.epoch_step // self.steps} %)  loss {self.loss:.4f}  error {self.error:.3f}  "
            f"images/s {self.images_per_s:.1f}  data wait {100 * self.data_wait:.0f} %  "
            f"epoch ETA {self.eta_s // 60:.0f}m{self.eta_s % 60:02.0f}s"
        )

    def metrics(self, lr: float) -> dict[str, float]:
        return {
            "train/step_loss": self.loss,
            "train/step_error": self.error,
            "train/lr": lr,
            "train/step_images_per_s": self.images_per_s,
            "train/step_data_wait": self.data_wait,
        }


@ray.remote(num_cpus=0)
class Board:
    """Holds rank 0's latest progress and every line it said."""

    def __init__(self):
        self.latest = None
        self.lines: list[str] = []

    def post(self, progress) -> None:
        self.latest = progress

    def say(self, line: str) -> None:
        self.lines.append(line)

    def read(self, since: int) -> tuple:
        """The latest progress, and the lines from number `since` on."""
        return self.latest, self.lines[since:]

    def flush(self) -> None:
        """Returns once every earlier call of the caller has been taken (an actor runs one
        caller's calls in order): rank 0's last lines are on the board before its run ends."""


class BoardHandler(logging.Handler):
    """Rank 0's log records, as lines on the board (fire-and-forget, in order)."""

    def __init__(self, board):
        super().__init__()
        self.board = board

    def emit(self, record: logging.LogRecord) -> None:
        self.board.say.remote(self.format(record))


class ProgressView:
    """Prints the board's new lines to `stream`, and with `live` redraws a bar from its latest
    progress, on a background thread until closed."""

    def __init__(self, board, epochs: int, stream: TextIO, live: bool):
        self._board, self._epochs, self._stream, self._live = board, epochs, stream, live
        self._bar: tqdm | None = None
        self._epoch = -1
        self._said = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resnet-pipe-progress", daemon=True)

    def __enter__(self) -> ProgressView:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._show(*ray.get(self._board.read.remote(self._said)))  # the last word, however quick the run
        if self._bar is not None:
            self._bar.close()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self._show(*ray.get(self._board.read.remote(self._said), timeout=POLL_S * 4))
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
                continue  # a busy or restarting cluster: keep the last picture

    def _show(self, progress, lines: list[str]) -> None:
        for line in lines:
            if self._bar is not None:
                self._bar.write(line, file=self._stream)
            else:
                print(line, file=self._stream, flush=True)
        self._said += len(lines)
        if self._live and progress is not None:
            self._draw(progress)

    def _draw(self, progress) -> None:
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
