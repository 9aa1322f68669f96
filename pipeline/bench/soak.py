"""`resnet-pipe bench soak`: the deployment held at the knee of its closed-loop load for minutes,
minute by minute: requests/s, latency, errors, and each replica's resident memory.

The knee is found first, on the same deployment, the way `bench serve` drives it (`drive`: each
client sends one image and waits for the answer): 1, 2, 4, ... clients for `sweep_s` each, until
a doubling buys less than 5 % more requests/s; the knee is the fewest clients within 10 % of the
best requests/s of the sweep. Past it, more clients only queue. The soak then drives that many
clients for `minutes`, a minute a row. A replica's memory is its process's resident set, read
through Ray's State API at the end of the sweep (the replica warm: its batches and allocator
caches at their working size) and after each minute; a replica that restarts is counted as an
error of its minute. The model is, by default, the bench's own (a 224 px ResNet-50 in a store of
its own), as in `bench serve`: the user's runs and registry stay untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.bench.serve import Row, _Connections, drive, images_to_send, served_model
from pipeline.system import free_port

GAIN_TO_GO_ON = 1.05  # a doubling of the clients that buys less than this stops the sweep
WITHIN_BEST = 0.9  # the knee: the fewest clients with this share of the sweep's best requests/s


@dataclass(frozen=True)
class Minute:
    row: Row  # requests/s, p50 and p99 ms, failed requests
    rss_mb: dict[str, float]  # each replica's resident memory at the minute's end, by replica
    restarted: int = 0  # replicas that died during the minute and came back


@dataclass(frozen=True)
class Soak:
    sweep: list[tuple[int, Row]]
    clients: int  # the knee
    start_rss_mb: dict[str, float]
    minutes: list[Minute]

    def growth(self) -> dict[str, float]:
        """Each replica's memory growth over the soak, a fraction of its memory at the start."""
        end = self.minutes[-1].rss_mb if self.minutes else {}
        return {r: end[r] / mb - 1 for r, mb in self.start_rss_mb.items() if r in end}

    def failed(self) -> int:
        return sum(m.row.failed + m.restarted for m in self.minutes)


def knee(measure: Callable[[int], Row], most: int = 64) -> tuple[int, list[tuple[int, Row]]]:
    """The knee of a closed-loop load: `measure(clients)` at 1, 2, 4, ... clients until a
    doubling gains less than GAIN_TO_GO_ON (or past `most`); returns the fewest clients with
    WITHIN_BEST of the best requests/s, and the sweep."""
    sweep: list[tuple[int, Row]] = []
    clients = 1
    while clients <= most:
        sweep.append((clients, measure(clients)))
        if len(sweep) > 1 and sweep[-1][1].per_s < GAIN_TO_GO_ON * max(r.per_s for _, r in sweep[:-1]):
            break
        clients *= 2
    best = max(row.per_s for _, row in sweep)
    return next(c for c, row in sweep if row.per_s >= WITHIN_BEST * best), sweep


def replica_memory() -> dict[str, float]:
    """The resident memory (MB) of each live replica of the app, by actor id (Ray's State API)."""
    import psutil
    from ray.util.state import list_actors

    from pipeline.serve.settings import APP_NAME

    found = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False):
        if actor.class_name.startswith(f"ServeReplica:{APP_NAME}:"):
            with contextlib.suppress(psutil.NoSuchProcess):  # gone between the listing and the read
                found[actor.actor_id] = psutil.Process(actor.pid).memory_info().rss / 2**20
    return found


def soak(
    root: Path,
    images_from: Path | None = None,
    model: str | None = None,
    minutes: int = 10,
    clients: int | None = None,
    replicas: int = 2,
    batch: int = 4,
    wait_ms: float = 20.0,
    sweep_s: float = 15.0,
    say: Callable[[str], None] = print,
) -> Soak:
    """Deploys `model` (default: the bench's own) with `replicas` replicas sharing this machine's
    cores, finds the knee (unless `clients` is given), then drives it for `minutes`."""
    images = images_to_send(images_from or root)
    with served_model(root.resolve(), model) as model:
        return _soak(model, images, minutes, clients, replicas, batch, wait_ms, sweep_s, say)


def _soak(
    model: str, images: list[bytes], minutes: int, clients: int | None, replicas: int, batch: int,
    wait_ms: float, sweep_s: float, say: Callable[[str], None],
) -> Soak:  # fmt: skip
    import ray
    from ray import serve

    from pipeline.cluster import serving
    from pipeline.serve.settings import Settings

    cores = len(os.sched_getaffinity(0))
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    settings = Settings(
        model=model, replicas=replicas, cpus_per_replica=max(1, cores // replicas),
        gpus_per_replica=1 / replicas if torch.cuda.is_available() else 0,  # the replicas share a GPU
        max_batch_size=batch, batch_wait_ms=wait_ms, max_ongoing_requests=64, max_queued_requests=256,
    )  # fmt: skip
    try:
        url = serving.start(settings, port=free_port(), log_to_driver=False)
        predict = _Connections(f"{url}/predict", "image/jpeg")

        def measure(n: int) -> Row:
            row = drive(predict.post, images, n, sweep_s)
            say(
                f"sweep: {n} clients, {row.per_s:.2f} requests/s, p99 {row.p99_ms:.0f} ms, "
                f"{row.failed} failed"
            )
            return row

        sweep: list[tuple[int, Row]] = []
        if clients is None:
            clients, sweep = knee(measure)
            say(f"knee: {clients} clients")
        start = replica_memory()
        say(f"replicas at the start: {', '.join(f'{mb:.0f} MB' for mb in start.values())}")
        done = []
        for number in range(1, minutes + 1):
            row = drive(predict.post, images, clients, 60.0)
            memory = replica_memory()
            restarted = len(set(memory) - set(start) - {r for m in done for r in m.rss_mb})
            done.append(Minute(row, memory, restarted))
            say(
                f"minute {number}: {row.per_s:.2f} requests/s, p50 {row.p50_ms:.0f} ms, p99 "
                f"{row.p99_ms:.0f} ms, {row.failed} failed, replicas "
                f"{', '.join(f'{mb:.0f} MB' for mb in memory.values())}"
            )
    finally:
        serve.shutdown()
        ray.shutdown()
    return Soak(sweep, clients, start, done)
