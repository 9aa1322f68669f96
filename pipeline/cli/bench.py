"""`resnet-pipe bench data | train | serve | soak`: the first three run the competitor side by
side and print the ratio; `soak` holds a deployment at its knee and prints each minute."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from pipeline.cli.common import check_prepared, fail, print_table


@click.group()
def bench() -> None:
    """Benchmarks: the competitor side by side with its ratio (data, train, serve), and a soak."""


def _root_option(help: str):
    folder = click.Path(path_type=Path)
    return click.option("--root", type=folder, default=Path("data/sample"), show_default=True, help=help)


@bench.command("data")
@click.option(
    "--root",
    default="data/sample",
    show_default=True,
    help="A prepared dataset, any folder of JPEGs, or a dataset on an object store (s3://...).",
)
@click.option("--seconds", default=20.0, show_default=True, help="Timed seconds per row.")
@click.option(
    "--workers", type=int, default=None, help="DataLoader processes and DALI threads (default: all cores)."
)
@click.option("--crop", "crop_px", default=224, show_default=True)
@click.option("--batch", default=128, show_default=True, help="Images per batch, the same for every row.")
def bench_data(root: str, seconds: float, workers: int | None, crop_px: int, batch: int) -> None:
    """DALI's training pipeline against torchvision's DataLoader, images/s; with an object store's
    --root, the pipeline reading from it against the same from local disk."""
    from pipeline.storage import is_remote

    if is_remote(root):
        _bench_data_remote(root, seconds, workers, crop_px, batch)
        return
    from pipeline.bench.data import bench_data as run

    root = Path(root)
    if not root.is_dir():
        fail(f"{root} does not exist (give --root a folder of JPEGs or a prepared dataset)")
    from pipeline.data.memory import has_pixels

    if has_pixels(root):
        from pipeline.bench.data import bench_data_memory

        rows, wait = bench_data_memory(root, seconds, workers, batch)
        _print_ratios(rows, "pipeline (images held in memory)", "x torchvision")
        click.echo(
            f"ResNet-20 training steps fed by the pipeline: data wait {100 * wait:.2f} % of the step time"
        )
        return
    _print_ratios(run(root, seconds, workers, crop_px, batch), "pipeline", "x torchvision")


def _bench_data_remote(root: str, seconds: float, workers: int | None, crop_px: int, batch: int) -> None:
    from pipeline.bench.data import bench_data_remote

    check_prepared(root)
    try:
        results, staged = bench_data_remote(root, seconds, workers, crop_px, batch)
    except FileNotFoundError as e:  # no shards
        fail(str(e))
    _print_ratios(results, "pipeline", "x local disk")
    click.echo(
        f"staging the node's copy: {staged.megabytes:.1f} MB in {staged.seconds:.2f} s "
        f"({staged.megabytes / staged.seconds:.1f} MB/s)"
    )


@bench.command("train")
@_root_option("A prepared dataset; a CIFAR one (held as pixel arrays) measures the ResNet-20 step.")
@click.option("--steps", type=int, default=None, help="Steps per run, the first 2 warm-up [12; CIFAR: 50].")
@click.option("--batch", type=int, default=None, help="Images per batch and worker [16; CIFAR: 128].")
@click.option("--crop", "crop_px", default=224, show_default=True)
def bench_train(root: Path, steps: int | None, batch: int | None, crop_px: int) -> None:
    """The whole training pipeline against a bare PyTorch loop, images/s: ResNet-50, or on CIFAR
    the paper's ResNet-20 in fp32, bf16 autocast and compiled."""
    from pipeline.bench.train import bench_train as run
    from pipeline.data.memory import has_pixels

    check_prepared(root)
    if has_pixels(root):
        _bench_train_cifar(root, steps or 50, batch or 128)
        return
    results = run(root, steps or 12, batch or 16, crop_px)
    _print_ratios(results, "training", "x bare loop")
    one, two = results[-2].images_per_s, results[-1].images_per_s
    click.echo(f"2 DDP workers against 1 worker: {two / one:.3f}x the images/s on the same cores")


def _bench_train_cifar(root: Path, steps: int, batch: int) -> None:
    import os

    from pipeline.bench.train import CIFAR_SETTINGS, bench_train_cifar

    settings = _runnable(CIFAR_SETTINGS, lambda setting: setting[1], "the bf16 autocast row")
    pairs, on_ray = bench_train_cifar(root, steps, batch, settings)
    threads = len(os.sched_getaffinity(0))
    print_table(
        [(f"ResNet-20 step, batch {batch}, {threads} threads", "bare loop images/s", "resnet-pipe images/s",
          "x bare loop", "x fp32 pipeline")]
        + [(p.name, f"{p.bare:.1f}", f"{p.pipeline:.1f}", f"{p.pipeline / p.bare:.3f}",
            f"{p.pipeline / pairs[0].pipeline:.3f}") for p in pairs]
    )  # fmt: skip
    fp32 = pairs[0]
    click.echo(
        f"the fp32 bare loop as a Ray Train function: {on_ray:.1f} images/s ({on_ray / fp32.bare:.3f} x "
        f"the bare loop): the fp32 pipeline is {fp32.pipeline / on_ray:.3f} x that"
    )


@bench.command("serve")
@_root_option("A prepared dataset (the bench model's classes).")
@click.option(
    "--images", type=click.Path(path_type=Path), default=None, help="JPEGs to send (default: --root's)."
)
@click.option(
    "--model", default=None, help="MODEL@ALIAS or MODEL/VERSION (default: a fresh 224 px ResNet-50)."
)
@click.option("--seconds", default=20.0, show_default=True, help="Timed seconds per row.")
@click.option("--clients", default=8, show_default=True, help="Concurrent clients, one image per request.")
@click.option(
    "--batch",
    default=4,
    show_default=True,
    help="Max batch size: half the clients, one batch fills while one runs.",
)
@click.option("--batch-wait-ms", default=20.0, show_default=True)
def bench_serve(
    root: Path,
    images: Path | None,
    model: str | None,
    seconds: float,
    clients: int,
    batch: int,
    batch_wait_ms: float,
) -> None:
    """The Serve deployment in each runtime and precision (PyTorch fp32 and bf16, ONNX Runtime
    fp32 and int8; /predict and the Open Inference Protocol's binary requests) against `mlflow
    models serve` (same model, same cores), each against its own bare forward pass and against
    PyTorch's raw fp32 one: requests/s, latency, and top-1 agreement with fp32 on the photos."""
    from pipeline.bench.serve import bench_serve as run

    check_prepared(root)
    if images is not None and not images.is_dir():
        fail(f"--images {images} is not a folder of images")
    from pipeline.bench.serve import KINDS, ceiling_of

    kinds = _runnable(KINDS, lambda kind: kind[1], "PyTorch bf16")
    rows = run(root, images, model, seconds, clients, batch, batch_wait_ms, kinds)
    table = [("serving", "per s", "p50 ms", "p99 ms", "failed", "x own ceiling", "x PyTorch ceiling",
              "x mlflow", "top-1 as fp32")]  # fmt: skip
    for row in rows:
        own = ceiling_of(row, rows) if not row.ceiling else None
        table.append((
            row.name, f"{row.per_s:.2f}",
            f"{row.p50_ms:.0f}" if row.p50_ms is not None else "-",
            f"{row.p99_ms:.0f}" if row.p99_ms is not None else "-",
            str(row.failed),
            f"{row.per_s / own.per_s:.3f}" if own is not None else "-",
            f"{row.per_s / rows[0].per_s:.3f}" if row.against_ceiling else "-",
            f"{row.per_s / rows[-1].per_s:.2f}" if row.against_ceiling and not row.ceiling else "-",
            f"{row.agreement:.3f}" if row.agreement is not None else "-",
        ))  # fmt: skip
    print_table(table)


@bench.command("soak")
@_root_option("A prepared dataset (the bench model's classes).")
@click.option(
    "--images", type=click.Path(path_type=Path), default=None, help="JPEGs to send (default: --root's)."
)
@click.option(
    "--model", default=None, help="MODEL@ALIAS or MODEL/VERSION (default: a fresh 224 px ResNet-50)."
)
@click.option("--minutes", default=10, show_default=True, type=click.IntRange(1), help="Minutes of load.")
@click.option("--clients", type=click.IntRange(1), default=None, help="The load [the knee, found first].")
@click.option("--replicas", default=2, show_default=True, type=click.IntRange(1))
@click.option("--batch", default=4, show_default=True, help="Max batch size of each replica.")
@click.option("--sweep-seconds", default=15.0, show_default=True, help="Seconds a step of the sweep.")
def bench_soak(
    root: Path,
    images: Path | None,
    model: str | None,
    minutes: int,
    clients: int | None,
    replicas: int,
    batch: int,
    sweep_seconds: float,
) -> None:
    """The deployment held at the knee of its closed-loop load (found first, as `bench serve`
    drives it) for --minutes: requests/s, p50 and p99 and errors each minute, and each replica's
    memory at the start and the end (aims: no error, growth under 5 %)."""
    from pipeline.bench.soak import soak

    check_prepared(root)
    if images is not None and not images.is_dir():
        fail(f"--images {images} is not a folder of images")
    result = soak(
        root, images, model, minutes, clients, replicas, batch, sweep_s=sweep_seconds, say=click.echo
    )
    table = [("minute", "requests/s", "p50 ms", "p99 ms", "failed", "replicas' memory MB")]
    for number, minute in enumerate(result.minutes, start=1):
        row = minute.row
        memory = ", ".join(f"{mb:.0f}" for mb in minute.rss_mb.values())
        table.append((str(number), f"{row.per_s:.2f}", f"{row.p50_ms:.0f}", f"{row.p99_ms:.0f}",
                      str(row.failed + minute.restarted), memory))  # fmt: skip
    click.echo()
    print_table(table)
    sent = sum(m.row.per_s * 60 for m in result.minutes)
    growth = ", ".join(
        f"{result.start_rss_mb[r]:.0f} -> {result.minutes[-1].rss_mb[r]:.0f} MB ({g:+.1%})"
        for r, g in result.growth().items()
    )
    click.echo(f"load: {result.clients} clients{' (the knee)' if result.sweep else ''}")
    click.echo(f"errors: {result.failed()} in about {sent:.0f} requests (aim: none)")
    growth = growth or "no replica kept its process"
    click.echo(f"replica memory, start -> end: {growth} (aim: growth under 5 %)")


def _runnable(rows: tuple, precision_of: Callable, what: str) -> tuple:
    """The bench's `rows`, less those in bf16 where this machine has no bf16 units (they would
    measure PyTorch's slow reference path, for minutes), said in one line."""
    import torch

    from pipeline.system import bf16_units, no_bf16_units

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if bf16_units(device):
        return rows
    click.echo(f"{what} left out: {no_bf16_units('this machine', device)}")
    return tuple(row for row in rows if precision_of(row) != "bf16")


def _print_ratios(results: list, title: str, ratio_title: str) -> None:
    """A table of images/s, each row against the first."""
    width = max(len(title), *(len(r.name) for r in results))
    click.echo(f"{title:<{width}}  {'images/s':>9}  {ratio_title:>13}")
    for r in results:
        click.echo(
            f"{r.name:<{width}}  {r.images_per_s:9.2f}  {r.images_per_s / results[0].images_per_s:13.3f}"
        )
