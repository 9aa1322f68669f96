"""The `resnet-pipe` command line: parse, call, print. No logic lives here.

Bad input (an unknown job, a missing dataset, an unknown --set key) is one line on stderr and
exit code 2, before Ray starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import click

from pipeline.config import JobError, flatten, job_names, load_job, to_dict
from pipeline.dataset import DatasetError

USAGE_ERROR = 2


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(USAGE_ERROR)


def _check_prepared(root: Path):
    """The prepared dataset's index; exits 2 with the reason when there is none."""
    from pipeline.dataset import load_index

    try:
        return load_index(root)
    except DatasetError as e:
        _fail(str(e))


def _load(name: str, overrides: tuple[str, ...]):
    try:
        return load_job(name, overrides)
    except JobError as e:
        _fail(str(e))


@click.group()
def main() -> None:
    """Train bottleneck ResNets with DALI and Ray Train, tracked in MLflow."""


@main.group(invoke_without_command=True)
@click.pass_context
def jobs(ctx: click.Context) -> None:
    """List the named jobs (jobs/*.toml)."""
    if ctx.invoked_subcommand is not None:
        return
    rows = [("JOB", "MODEL", "DATASET", "EPOCHS", "WORKERS")]
    for name in job_names():
        job = _load(name, ())
        device = "GPU" if job.scaling.use_gpu else "CPU"
        counts = job.scaling.worker_counts
        workers = f"{counts[0]}-{counts[-1] if len(counts) > 1 else counts[0]} x {device}"
        rows.append((name, job.model.arch, job.dataset, str(job.epochs), workers))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@jobs.command("show")
@click.argument("name")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a setting.")
def jobs_show(name: str, overrides: tuple[str, ...]) -> None:
    """Print the resolved job NAME, every setting with its value."""
    job = _load(name, overrides)
    for key, value in flatten(to_dict(job)).items():
        click.echo(f"{key} = {value!r}")
    click.echo(f"# derived: global_batch_size = {job.global_batch_size}, peak_lr = {job.peak_lr:g}")


@main.group()
def data() -> None:
    """Make and prepare datasets."""


@data.command("synth")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--train-per-class", default=150, show_default=True)
@click.option("--val-per-class", default=50, show_default=True)
@click.option("--seed", default=0, show_default=True)
def data_synth(directory: Path, train_per_class: int, val_per_class: int, seed: int) -> None:
    """Write the synthetic sample dataset (real JPEGs, ImageNet's layout) to DIRECTORY."""
    from pipeline.synth import CLASSES, write_dataset

    count = write_dataset(directory, train_per_class, val_per_class, seed)
    click.echo(f"wrote {count} images of {len(CLASSES)} classes to {directory}")


@data.command("prepare")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--workers", type=int, default=None, help="Decoding processes (default: all cores).")
@click.option("--shards", is_flag=True, help="Also write webdataset tar shards (ROOT/index/shards/).")
@click.option("--shard-size", default=1024, show_default=True, help="Samples per shard.")
def data_prepare(root: Path, workers: int | None, shards: bool, shard_size: int) -> None:
    """Index ROOT and check that every file decodes; writes ROOT/index/.

    Layouts: ROOT/{train,val}/<class>/*; Kaggle's ILSVRC/Data/CLS-LOC with LOC_val_solution.csv;
    or a flat val/ with the ILSVRC-2012 devkit. A re-run decodes only new or changed files.
    """
    from pipeline.dataset import format_report, load_index, prepare

    try:
        report = prepare(root, workers)
    except DatasetError as e:
        _fail(str(e))
    click.echo(format_report(root, report), nl=False)
    click.echo(f"index written to {root / 'index'}")
    if shards:
        from pipeline.shards import shard_dir, write_shards

        written = write_shards(load_index(root), shard_size)
        counts = ", ".join(f"{len(names)} {split}" for split, names in written.items())
        click.echo(f"shards ({counts}) in {shard_dir(root)}")


@data.command("preview")
@click.argument("job_name", metavar="JOB")
@click.option("--out", type=click.Path(path_type=Path), default=Path("preview.png"), show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a setting.")
@click.option("--count", default=16, show_default=True, help="Samples to draw (at most one batch).")
@click.option("--seed", default=0, show_default=True)
def data_preview(job_name: str, out: Path, overrides: tuple[str, ...], count: int, seed: int) -> None:
    """Write a grid of JOB's augmented training samples, with their class names, to --out."""
    from pipeline.preview import write_preview

    job = _load(job_name, overrides)
    _check_prepared(Path(job.data.root))
    shown = write_preview(job, out, count, seed)
    click.echo(f"wrote {shown} augmented samples of {job_name} to {out}")


@main.command()
@click.argument("job_name", metavar="JOB")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a setting.")
@click.option(
    "--name",
    "run_name",
    default=None,
    help="Run name (default: the job's). A name that has checkpoints resumes from the latest.",
)
@click.option(
    "--address",
    default=None,
    help="A Ray cluster: ray://... or an address to join, or a job server "
    "http://HEAD:8265 (Job Submission API). Default: RAY_ADDRESS, else a local Ray.",
)
@click.option("--follow", is_flag=True, help="With a job server: stream the job's logs until it ends.")
@click.option(
    "--resume",
    default=None,
    metavar="RUN",
    help="Continue run RUN (the same MLflow run) from its latest checkpoint; an error if it has none.",
)
def submit(
    job_name: str,
    overrides: tuple[str, ...],
    run_name: str | None,
    address: str | None,
    follow: bool,
    resume: str | None,
) -> None:
    """Train JOB on Ray Train; resumes the run if it has checkpoints."""
    job = _load(job_name, overrides)
    address = address or os.environ.get("RAY_ADDRESS")
    if resume:
        if run_name and run_name != resume:
            _fail(f"--name {run_name} and --resume {resume} name two runs; give one")
        run_name = resume
        storage = Path(job.run.storage_path)
        if "://" not in job.run.storage_path and not any((storage / resume).glob("*/meta.json")):
            _fail(f"run '{resume}' has no checkpoints in {storage}; submit without --resume to start it")
    if address and address.startswith(("http://", "https://")):  # a job server: Job Submission API
        _submit_remote(address, job_name, overrides, run_name or job.name, job, follow)
        return
    index = _check_prepared(Path(job.data.root))
    from pipeline.launch import submit as launch_submit  # imports Ray: only after the checks
    from pipeline.tracking import TrackingError

    terminal = sys.stderr if sys.stderr.isatty() else None  # a live bar there; else progress lines
    try:
        outcome = launch_submit(job, run_name or job.name, address, index, progress_to=terminal)
    except TrackingError as e:
        _fail(str(e))
    click.echo(f"MLflow run id: {outcome.mlflow_run_id}")
    for key in ("val/top1", "val/top5", "train/loss"):
        if key in outcome.metrics:
            click.echo(f"{key}: {outcome.metrics[key]:.4f}")
    if not outcome.finished:
        click.echo(f"error: training failed: {outcome.error}", err=True)
        sys.exit(1)


def _submit_remote(address: str, job_name: str, overrides, run_name: str, job, follow: bool) -> None:
    from pipeline import cluster

    try:
        submission_id = cluster.submit_remote(address, job_name, overrides, run_name, job)
    except cluster.ClusterError as e:
        _fail(str(e))
    click.echo(f"submitted {job_name} as {submission_id} to {address}")
    if follow:
        _follow(address, submission_id)


def _follow(address: str | None, submission_id: str) -> None:
    from pipeline import cluster

    for chunk in cluster.follow(address, submission_id):
        click.echo(chunk, nl=False)
    final = cluster.status(address, submission_id)
    click.echo(f"{submission_id}: {final.value}")
    sys.exit(0 if final.value == "SUCCEEDED" else 1)


ADDRESS_HELP = "The job server, http://HEAD:8265 (default: RAY_ADDRESS, else http://127.0.0.1:8265)."


@main.command("list")
@click.option("--address", default=None, help=ADDRESS_HELP)
def list_jobs(address: str | None) -> None:
    """The cluster's jobs: id, status, job and run."""
    from pipeline import cluster

    for info in sorted(cluster.client(address).list_jobs(), key=lambda i: i.start_time or 0):
        meta = info.metadata or {}
        click.echo(
            f"{info.submission_id}  {info.status.value:<9}  {meta.get('job', '-')}  {meta.get('run', '-')}"
        )


@main.command("status")
@click.argument("submission_id")
@click.option("--address", default=None, help=ADDRESS_HELP)
def job_status(submission_id: str, address: str | None) -> None:
    """A job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from pipeline import cluster

    info = cluster.client(address).get_job_info(submission_id)
    click.echo(f"{submission_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))


@main.command("logs")
@click.argument("submission_id")
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.option("--follow", is_flag=True, help="Keep streaming until the job ends.")
def job_logs(submission_id: str, address: str | None, follow: bool) -> None:
    """A job's logs."""
    from pipeline import cluster

    if follow:
        _follow(address, submission_id)
    click.echo(cluster.client(address).get_job_logs(submission_id), nl=False)


@main.command("stop")
@click.argument("submission_id")
@click.option("--address", default=None, help=ADDRESS_HELP)
def stop_job(submission_id: str, address: str | None) -> None:
    """Stop a job; its checkpoints stay, and submitting the same run again resumes it."""
    from pipeline import cluster

    stopped = cluster.client(address).stop_job(submission_id)
    click.echo(f"{submission_id}: {'stopping' if stopped else 'not running'}")


@main.command()
@click.argument("words", nargs=-1, metavar="[JOB] | compare A B | sync RUN_DIR")
def runs(words: tuple[str, ...]) -> None:
    """The runs in MLflow (of JOB): status, epochs, best top-1, images/s, duration.

    `runs compare A B`: what differs between runs A and B (names or ids), settings then results.
    `runs sync RUN_DIR`: send the metrics a run kept locally while MLflow was unreachable.
    """
    if words[:1] == ("compare",):
        if len(words) != 3:
            _fail("runs compare takes two runs: resnet-pipe runs compare A B")
        _runs_compare(words[1], words[2])
    elif words[:1] == ("sync",):
        if len(words) != 2:
            _fail("runs sync takes one run folder: resnet-pipe runs sync runs/NAME")
        _runs_sync(Path(words[1]))
    elif len(words) <= 1:
        _runs_table(words[0] if words else None)
    else:
        _fail("runs takes at most one JOB (or: runs compare A B, runs sync RUN_DIR)")


def _runs_table(job_name: str | None) -> None:
    from pipeline.tracking.runs import RunsError, run_table

    try:
        summaries = run_table(job_name)
    except RunsError as e:
        _fail(str(e))
    rows = [("RUN", "JOB", "STATUS", "EPOCHS", "BEST TOP-1", "IMAGES/S", "DURATION", "RUN ID")]
    for r in summaries:
        rows.append((
            r.name, r.job, r.status, str(r.epochs),
            f"{r.best_top1:.4f}" if r.best_top1 is not None else "-",
            f"{r.images_per_s:.1f}" if r.images_per_s is not None else "-",
            _duration(r.duration_s), r.run_id,
        ))  # fmt: skip
    _print_table(rows)


def _runs_compare(a: str, b: str) -> None:
    from pipeline.tracking.runs import RunsError, compare

    try:
        run_a, run_b, settings, results = compare(a, b)
    except RunsError as e:
        _fail(str(e))
    header = (f"A: {run_a.info.run_name}", f"B: {run_b.info.run_name}")
    click.echo("settings that differ:" if settings else "settings: identical")
    if settings:
        _print_table([("SETTING", *header), *settings])
    click.echo("results:")
    _print_table([("METRIC", *header), *results])


def _runs_sync(run_dir: Path) -> None:
    from pipeline.tracking import RUN_ID_FILE, sync_unsent

    if not (run_dir / RUN_ID_FILE).is_file():
        _fail(f"{run_dir} is not a run folder (no {RUN_ID_FILE}); run folders are under runs/")
    click.echo(f"sent {sync_unsent(run_dir)} metrics")


@main.command()
@click.argument("target", metavar="RUN | MODEL/VERSION | MODEL")
@click.option("--force", is_flag=True, help="Promote even when it does not beat the current champion.")
@click.option("--rollback", is_flag=True, help="Give MODEL's champion alias back to the previous version.")
def promote(target: str, force: bool, rollback: bool) -> None:
    """Move MODEL's `champion` alias to a run's registered version, only when it beats the
    current champion's val/top1 on the same dataset hash."""
    from pipeline.tracking import registry

    try:
        outcome = registry.rollback(target) if rollback else registry.promote(target, force=force)
    except registry.RegistryError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo(outcome.message)


@main.command()
@click.option("--port", default=5000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen address (loopback by default).")
def ui(port: int, host: str) -> None:
    """Start the MLflow UI over the local store (mlflow.db and mlartifacts/ here)."""
    from pipeline.tracking import DEFAULT_ARTIFACTS, tracking_uri

    uri = tracking_uri()
    command = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
        "--default-artifact-root", str(Path.cwd() / DEFAULT_ARTIFACTS), "--host", host, "--port", str(port),
    ]  # fmt: skip
    click.echo(f"MLflow UI: http://{host}:{port}  (store {uri}; Ctrl-C stops it)")
    try:
        sys.exit(subprocess.call(command))
    except KeyboardInterrupt:
        sys.exit(0)


@main.command()
@click.argument("target", required=False, metavar="[MODEL@ALIAS | MODEL/VERSION | RUN]")
@click.option("--replicas", default="1", show_default=True, help="A number, or 'auto' (autoscaling).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen address (loopback by default).")
@click.option("--port", default=8000, show_default=True)
@click.option("--max-batch-size", default=8, show_default=True, help="Images per batched forward pass.")
@click.option("--batch-wait-ms", default=20.0, show_default=True, help="How long a batch waits to fill.")
@click.option("--cpus-per-replica", type=float, default=None, help="Default: all of this machine's cores.")
@click.option("--gpus-per-replica", type=float, default=None, help="Default: 1 when there is a GPU.")
@click.option("--address", default=None, help="A Ray cluster to deploy on (default: a local Ray).")
def deploy(
    target: str | None,
    replicas: str,
    host: str,
    port: int,
    max_batch_size: int,
    batch_wait_ms: float,
    cpus_per_replica: float | None,
    gpus_per_replica: float | None,
    address: str | None,
) -> None:
    """Serve a registered model over HTTP with Ray Serve (default: the champion of the most
    recently updated model); it follows the alias: a promotion or rollback switches versions.
    Set RESNET_PIPE_SERVE_TOKEN to require `Authorization: Bearer <token>`."""
    from pipeline import serving
    from pipeline.tracking import registry

    if replicas != "auto" and not replicas.isdigit():
        _fail(f"--replicas {replicas}: give a number of replicas or 'auto'")
    try:
        version, alias = registry.serving_version(target)
    except registry.RegistryError as e:
        _fail(str(e))
    import torch

    gpus = gpus_per_replica if gpus_per_replica is not None else float(torch.cuda.is_available())
    settings = serving.Settings(
        model=f"{version.name}@{alias}" if alias else f"{version.name}/{version.version}",
        replicas=replicas if replicas == "auto" else int(replicas),
        cpus_per_replica=cpus_per_replica or float(len(os.sched_getaffinity(0))),
        gpus_per_replica=gpus,
        max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms,
    )
    url = serving.start(settings, host, port, address)
    following = f", following {version.name}@{alias}" if alias else ""
    click.echo(f"serving {version.name} version {version.version}{following} at {url}")
    click.echo(
        f"  POST {url}/predict (an image), {url}/predict/batch (a form); API: {url}/docs; Ctrl-C stops"
    )
    try:
        while True:
            threading.Event().wait(3600)
    except KeyboardInterrupt:
        serving.stop()


@main.command()
@click.argument(
    "images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="The deployment's address.")
def predict(images: tuple[Path, ...], url: str) -> None:
    """Classify IMAGES with a running deployment; prints a table (exit 1 if any was refused)."""
    from pipeline import serving

    rows, failed = [("image", "class", "name", "probability", "model")], 0
    for path in images:
        try:
            answer = serving.predict_file(url, path)
        except serving.ServeError as e:
            rows.append((str(path), "-", f"error {e}", "-", "-"))
            failed += 1
            continue
        best = answer["predictions"][0]
        model = f"{answer['model']}/{answer['version']}"
        rows.append((str(path), best["wnid"], best["name"], f"{best['probability']:.4f}", model))
    _print_table(rows)
    sys.exit(1 if failed else 0)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@main.group()
def bench() -> None:
    """Benchmarks that run the competitor side by side and print the ratio."""


def _root_option(help: str):
    folder = click.Path(path_type=Path)
    return click.option("--root", type=folder, default=Path("data/sample"), show_default=True, help=help)


@bench.command("data")
@_root_option("A prepared dataset, or any folder of JPEGs.")
@click.option("--seconds", default=20.0, show_default=True, help="Timed seconds per row.")
@click.option(
    "--workers", type=int, default=None, help="DataLoader processes and DALI threads (default: all cores)."
)
@click.option("--crop", "crop_px", default=224, show_default=True)
@click.option("--batch", default=128, show_default=True, help="Images per batch, the same for every row.")
def bench_data(root: Path, seconds: float, workers: int | None, crop_px: int, batch: int) -> None:
    """DALI's training pipeline against torchvision's DataLoader, images/s."""
    from pipeline.bench import bench_data as run

    if not root.is_dir():
        _fail(f"{root} does not exist (give --root a folder of JPEGs or a prepared dataset)")
    _print_ratios(run(root, seconds, workers, crop_px, batch), "pipeline", "x torchvision")


@bench.command("train")
@_root_option("A prepared dataset.")
@click.option("--steps", default=12, show_default=True, help="Steps per run (the first 2 are warm-up).")
@click.option("--batch", default=16, show_default=True, help="Images per batch and worker.")
@click.option("--crop", "crop_px", default=224, show_default=True)
def bench_train(root: Path, steps: int, batch: int, crop_px: int) -> None:
    """The whole training pipeline against a bare PyTorch loop, images/s (ResNet-50)."""
    from pipeline.bench import bench_train as run

    _check_prepared(root)
    _print_ratios(run(root, steps, batch, crop_px), "training", "x bare loop")


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
    """The Serve deployment against `mlflow models serve` (same model, same cores), with the
    raw batched forward pass as the ceiling: requests/s and latency."""
    from pipeline.bench_serve import bench_serve as run

    _check_prepared(root)
    if images is not None and not images.is_dir():
        _fail(f"--images {images} is not a folder of images")
    rows = run(root, images, model, seconds, clients, batch, batch_wait_ms)
    table = [("serving", "per s", "p50 ms", "p99 ms", "failed", "x ceiling", "x mlflow")]
    for row in rows:
        table.append((
            row.name, f"{row.per_s:.2f}",
            f"{row.p50_ms:.0f}" if row.p50_ms is not None else "-",
            f"{row.p99_ms:.0f}" if row.p99_ms is not None else "-",
            str(row.failed), f"{row.per_s / rows[0].per_s:.3f}", f"{row.per_s / rows[2].per_s:.2f}",
        ))  # fmt: skip
    _print_table(table)


def _print_ratios(results: list, title: str, ratio_title: str) -> None:
    """A table of images/s, each row against the first."""
    width = max(len(title), *(len(r.name) for r in results))
    click.echo(f"{title:<{width}}  {'images/s':>9}  {ratio_title:>13}")
    for r in results:
        click.echo(
            f"{r.name:<{width}}  {r.images_per_s:9.2f}  {r.images_per_s / results[0].images_per_s:13.3f}"
        )


if __name__ == "__main__":  # `python -m pipeline.cli`: the entrypoint of cluster jobs
    main()
