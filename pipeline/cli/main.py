"""The `resnet-pipe` command line: parse, call, print. No logic lives here.

Bad input (an unknown job, a missing dataset, an unknown --set key) is one line on stderr and
exit code 2, before Ray starts.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from pipeline.cli.bench import bench
from pipeline.cli.common import check_prepared, fail, load_job_or_fail, print_table
from pipeline.cli.models import models
from pipeline.cli.serving import deploy, export, predict, promote, ui
from pipeline.cli.study import study
from pipeline.cluster.address import NoTrackingServer, cluster_address, is_job_server, tracking_server
from pipeline.config import flatten, job_names, to_dict
from pipeline.data.index import DatasetError


@click.group()
def main() -> None:
    """Train bottleneck ResNets with DALI and Ray Train, tracked in MLflow."""


@main.group(invoke_without_command=True)
@click.pass_context
def jobs(ctx: click.Context) -> None:
    """List the named jobs (jobs/*.toml)."""
    if ctx.invoked_subcommand is not None:
        return
    rows = [("JOB", "MODEL", "DATASET", "LENGTH", "WORKERS")]
    for name in job_names():
        job = load_job_or_fail(name, ())
        device = "GPU" if job.scaling.use_gpu else "CPU"
        counts = job.scaling.worker_counts
        workers = f"{counts[0]}-{counts[-1]}" if len(counts) > 1 else f"{counts[0]}"
        workers += f" x {device}"
        length = f"{job.iterations // 1000}k it" if job.iterations else f"{job.epochs} ep"
        rows.append((name, job.model.arch, job.dataset, length, workers))
    print_table(rows)


@jobs.command("show")
@click.argument("name")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a setting.")
def jobs_show(name: str, overrides: tuple[str, ...]) -> None:
    """Print the resolved job NAME, every setting with its value."""
    job = load_job_or_fail(name, overrides)
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
    from pipeline.data.synth import CLASSES, write_dataset

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
    from pipeline.data.index import load_index
    from pipeline.data.prepare import format_report, prepare

    try:
        report = prepare(root, workers)
    except DatasetError as e:
        fail(str(e))
    click.echo(format_report(root, report), nl=False)
    click.echo(f"index written to {root / 'index'}")
    if shards:
        from pipeline.data.shards import shard_dir, write_shards

        try:
            written = write_shards(load_index(root), shard_size)
        except DatasetError as e:
            fail(str(e))
        counts = ", ".join(f"{len(names)} {split}" for split, names in written.items())
        click.echo(f"shards ({counts}) in {shard_dir(root)}")


@data.command("upload")
@click.argument("root", type=click.Path(path_type=Path))
@click.argument("uri")
def data_upload(root: Path, uri: str) -> None:
    """Copy ROOT's index, shards and pixel arrays to URI (s3://BUCKET/PATH), where a cluster
    trains from them with data.root=URI and data.source='shards' (or 'memory', for the pixel
    arrays of CIFAR and other small images). A re-run uploads only what is missing."""
    from pipeline.data.upload import upload
    from pipeline.storage import StorageError

    try:
        uploaded, kept = upload(root, uri)
    except (DatasetError, StorageError, FileNotFoundError) as e:
        fail(str(e))
    names = {"shards": "shard files", "memory": "pixel arrays"}
    sent = ", ".join(f"{count} {names[kind]}" for kind, count in uploaded.items())
    click.echo(f"uploaded {sent} and the index to {uri}/index ({kept} files were there already)")
    sources = " or ".join(f"--set data.source='{kind}'" for kind in uploaded)
    click.echo(f"train from it with: --set data.root='{uri}' {sources}")


@data.command("preview")
@click.argument("job_name", metavar="JOB")
@click.option("--out", type=click.Path(path_type=Path), default=Path("preview.png"), show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a setting.")
@click.option("--count", default=16, show_default=True, help="Samples to draw (at most one batch).")
@click.option("--seed", default=0, show_default=True)
def data_preview(job_name: str, out: Path, overrides: tuple[str, ...], count: int, seed: int) -> None:
    """Write a grid of JOB's augmented training samples, with their class names, to --out."""
    from pipeline.data.preview import write_preview

    job = load_job_or_fail(job_name, overrides)
    check_prepared(job.data.root)
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
@click.option(
    "--allow-changes",
    is_flag=True,
    help="With --resume: continue under settings that differ from the run's (recorded in MLflow).",
)
def submit(
    job_name: str,
    overrides: tuple[str, ...],
    run_name: str | None,
    address: str | None,
    follow: bool,
    resume: str | None,
    allow_changes: bool,
) -> None:
    """Train JOB on Ray Train; resumes the run if it has checkpoints (with the same settings)."""
    job = load_job_or_fail(job_name, overrides)
    address = cluster_address(address)
    remote = is_job_server(address)
    if follow and not remote:
        fail(
            "--follow streams a job server's logs: give --address http://HEAD:8265 (or RAY_ADDRESS); "
            "a run on this machine or through ray:// prints its progress as it goes"
        )
    if allow_changes and not resume:
        fail("--allow-changes goes with --resume RUN: it continues RUN under changed settings")
    if resume:
        if run_name and run_name != resume:
            fail(f"--name {run_name} and --resume {resume} name two runs; give one")
        run_name = resume
    if remote:
        from pipeline.cluster.jobs import ClusterError, check_storage

        try:
            check_storage(job)
        except ClusterError as e:
            fail(str(e))
    _check_storage(job, resume, remote)
    if address is not None:
        try:
            tracking_server()
        except NoTrackingServer as e:
            fail(str(e))
    if remote:
        _attach_if_running(address, run_name or job.name, follow)
        flags = ["--resume", run_name] if resume else ["--name", run_name or job.name]
        _submit_remote(
            address, job_name, overrides, flags + (["--allow-changes"] if allow_changes else []), job, follow
        )
        return
    index = check_prepared(job.data.root)
    if address is None and not job.scaling.use_gpu:  # the workers are this machine's CPU: ask it now
        _check_precision(job)
    from pipeline.cluster.address import ClusterError
    from pipeline.cluster.launch import SettingsChanged  # imports Ray: only after the checks
    from pipeline.cluster.launch import submit as launch_submit
    from pipeline.cluster.resources import NoRoom
    from pipeline.storage import StorageError
    from pipeline.tracking import TrackingError

    progress = sys.stderr if sys.stderr.isatty() else sys.stdout  # a live bar on a terminal; else lines
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` ends the run as Ctrl-C does
    try:
        outcome = launch_submit(
            job, run_name or job.name, address, index, progress_to=progress, allow_changes=allow_changes
        )
    except (TrackingError, SettingsChanged, StorageError, DatasetError, NoRoom, ClusterError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        click.echo(
            f"interrupted: run '{run_name or job.name}' is KILLED in MLflow; its checkpoints stay, and the "
            "same command continues it from the latest",
            err=True,
        )
        sys.exit(130)
    click.echo(f"MLflow run id: {outcome.mlflow_run_id}")
    for key in ("val/top1", "val/top5", "train/loss"):
        if key in outcome.metrics:
            click.echo(f"{key}: {outcome.metrics[key]:.4f}")
    if "time_to_target_s" in outcome.metrics:
        reached = outcome.metrics["time_to_target_s"]
        target = job.target_top1
        click.echo(
            f"time_to_target_s: {reached:.1f} (val/top1 first at or above {target}: {reached / 60:.1f} min)"
        )
    elif job.target_top1 and outcome.finished:
        click.echo(f"time_to_target_s: - (val/top1 never reached {job.target_top1})")
    if outcome.registered:
        click.echo(f"registered model {outcome.registered}")
    if not outcome.finished:
        click.echo(f"error: training failed: {outcome.error}", err=True)
        sys.exit(1)
    if outcome.left_undone:  # said as warnings already, with the command that completes each
        click.echo(
            "error: the run finished training, but its end is not complete (see the warnings)", err=True
        )
        sys.exit(1)


@main.command()
@click.argument("run")
def register(run: str) -> None:
    """Register finished run RUN (name or MLflow run id) whose registration failed when it ended
    (its object store or MLflow was down), and end its MLflow run FINISHED."""
    from pipeline.cluster.finish import FinishError, register_run
    from pipeline.tracking import TrackingError

    try:
        outcome = register_run(run)
    except (FinishError, TrackingError, DatasetError) as e:
        fail(str(e))
    if outcome.left_undone:
        click.echo("error: not registered (see the warning above)", err=True)
        sys.exit(1)
    click.echo(f"registered model {outcome.registered}")


def _check_precision(job) -> None:
    """A precision this machine's CPU cannot run at speed, refused before Ray starts (a
    cluster's workers refuse it themselves, each for its own CPU)."""
    import torch

    from pipeline.train.step import PrecisionError, check_precision

    try:
        check_precision(job, torch.device("cpu"))
    except PrecisionError as e:
        fail(str(e))


def _check_storage(job, resume: str | None, remote: bool) -> None:
    """Exits 2 when the run's storage cannot be written from here, or `resume` names a run with no
    checkpoints there. A local path given to a job server is the cluster's, not checked here."""
    from pipeline.storage import Location, StorageError, is_remote

    if remote and not is_remote(job.run.storage_path):
        return
    try:
        storage = Location(job.run.storage_path)
        storage.check_writable()
        if resume:
            from pipeline.train import checkpoint

            if checkpoint.latest(storage / resume) is None:
                fail(f"run '{resume}' has no checkpoints in {storage}; submit without --resume to start it")
    except StorageError as e:
        fail(str(e))


def _submit_remote(address: str, job_name: str, overrides, flags: list[str], job, follow: bool) -> None:
    from pipeline.cluster import jobs as cluster

    try:
        submission_id = cluster.submit_remote(address, job_name, overrides, flags, job)
    except cluster.ClusterError as e:
        fail(str(e))
    click.echo(f"submitted {job_name} as {submission_id} to {address}")
    if follow:
        _follow(address, submission_id)


def _attach_if_running(address: str, run_name: str, follow: bool) -> None:
    """A run the cluster is training now (its `submit` was killed, or another terminal submitted
    it) is not submitted a second time: this follows it (with `follow`) or says how, and exits."""
    from pipeline.cluster import jobs as cluster

    try:
        running = cluster.running_job(address, run_name)
    except cluster.ClusterError as e:
        fail(str(e))
    if running is None:
        return
    click.echo(f"run '{run_name}' is running already as {running} on {address}: not submitted again")
    if follow:
        _follow(address, running)
    click.echo(f"follow it with: resnet-pipe logs {running} --follow --address {address}")
    sys.exit(0)


def _follow(address: str | None, submission_id: str) -> None:
    """Streams the job's log until it ends, then says its outcome from what the run stored (MLflow,
    else the run's result.json), not from the log's last lines, which Ray's tail can drop."""
    from pipeline.cluster import jobs as cluster

    for chunk in cluster.follow(address, submission_id):
        click.echo(chunk, nl=False)
    final = cluster.status(address, submission_id)
    click.echo(f"{submission_id}: {final.value}")
    _say_result(cluster.client(address).get_job_info(submission_id).metadata or {})
    sys.exit(0 if final.value == "SUCCEEDED" else 1)


def _say_result(metadata: dict[str, str]) -> None:
    """The outcome of the run a job trained (its metadata names the job and the run), as MLflow
    holds it, else as the run's folder does."""
    from pipeline.cluster.finish import stored_outcome

    if not {"job", "run"} <= metadata.keys():
        return  # a job that resnet-pipe did not submit
    found, where = stored_outcome(metadata["job"], metadata["run"], metadata.get("storage_path"))
    if found is None:
        click.echo(f"result: {where}")
        return
    click.echo(f"result of run '{metadata['run']}' ({where}): {found['status']}")
    click.echo(f"MLflow run id: {found['mlflow_run_id']}")
    for key in ("val/top1", "val/top5", "train/loss", "time_to_target_s"):
        if key in found["metrics"]:
            click.echo(f"{key}: {found['metrics'][key]:.4f}")
    if found["registered"]:
        click.echo(f"registered model {found['registered']}")
    elif found["status"] == "FINISHED":
        click.echo(f"not registered: {found.get('registration') or 'no registered version'}")


ADDRESS_HELP = "The job server, http://HEAD:8265 (default: RAY_ADDRESS, else http://127.0.0.1:8265)."


def _jobs(address: str | None):
    """The cluster's Job Submission client; exits 2 with one line when its job server does not
    answer."""
    from pipeline.cluster import jobs as cluster

    try:
        return cluster.client(address)
    except cluster.ClusterError as e:
        fail(str(e))


@main.command("list")
@click.option("--address", default=None, help=ADDRESS_HELP)
def list_jobs(address: str | None) -> None:
    """The cluster's jobs: id, status, job and run."""
    for info in sorted(_jobs(address).list_jobs(), key=lambda i: i.start_time or 0):
        meta = info.metadata or {}
        click.echo(
            f"{info.submission_id}  {info.status.value:<9}  {meta.get('job', '-')}  {meta.get('run', '-')}"
        )


@main.command("status")
@click.argument("submission_id")
@click.option("--address", default=None, help=ADDRESS_HELP)
def job_status(submission_id: str, address: str | None) -> None:
    """A job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    info = _jobs(address).get_job_info(submission_id)
    click.echo(f"{submission_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))


@main.command("logs")
@click.argument("submission_id")
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.option("--follow", is_flag=True, help="Keep streaming until the job ends.")
def job_logs(submission_id: str, address: str | None, follow: bool) -> None:
    """A job's logs."""
    client = _jobs(address)  # the job server answers, or one line says it does not
    if follow:
        _follow(address, submission_id)
    click.echo(client.get_job_logs(submission_id), nl=False)


@main.command("stop")
@click.argument("submission_id")
@click.option("--address", default=None, help=ADDRESS_HELP)
def stop_job(submission_id: str, address: str | None) -> None:
    """Stop a job; its checkpoints stay, and submitting the same run again resumes it."""
    stopped = _jobs(address).stop_job(submission_id)
    click.echo(f"{submission_id}: {'stopping' if stopped else 'not running'}")


@main.command()
@click.argument("words", nargs=-1, metavar="[JOB] | compare A B | plot RUN... | sync RUN_DIR")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("accuracy_vs_time.png"),
              show_default=True, help="With plot: the image file to write.")  # fmt: skip
def runs(words: tuple[str, ...], out: Path) -> None:
    """The runs in MLflow (of JOB): status, epochs, best top-1, images/s, duration, time to target.

    `runs compare A B`: what differs between runs A and B (names or ids), settings then results.
    `runs plot RUN...`: val/top1 of the runs against wall-clock minutes, with their targets, in
    one figure (--out). `runs sync RUN_DIR`: send the metrics a run kept locally while MLflow was
    unreachable.
    """
    if words[:1] == ("plot",):
        if len(words) < 2:
            fail("runs plot takes one or more runs: resnet-pipe runs plot A [B ...] --out FILE.png")
        _runs_plot(words[1:], out)
    elif words[:1] == ("compare",):
        if len(words) != 3:
            fail("runs compare takes two runs: resnet-pipe runs compare A B")
        _runs_compare(words[1], words[2])
    elif words[:1] == ("sync",):
        if len(words) != 2:
            fail("runs sync takes one run folder: resnet-pipe runs sync runs/NAME")
        _runs_sync(words[1])
    elif len(words) <= 1:
        _runs_table(words[0] if words else None)
    else:
        fail("runs takes at most one JOB (or: runs compare A B, runs sync RUN_DIR)")


def _runs_table(job_name: str | None) -> None:
    from pipeline.tracking.runs import RunsError, run_table

    try:
        summaries = run_table(job_name)
    except RunsError as e:
        fail(str(e))
    rows = [("RUN", "JOB", "STATUS", "EPOCHS", "BEST TOP-1", "IMAGES/S", "DURATION", "TO TARGET", "RUN ID")]
    for r in summaries:
        rows.append((
            r.name, r.job, r.status, str(r.epochs),
            f"{r.best_top1:.4f}" if r.best_top1 is not None else "-",
            f"{r.images_per_s:.1f}" if r.images_per_s is not None else "-",
            _duration(r.duration_s), _duration(r.time_to_target_s), r.run_id,
        ))  # fmt: skip
    print_table(rows)


def _runs_compare(a: str, b: str) -> None:
    from pipeline.tracking.runs import RunsError, compare

    try:
        run_a, run_b, settings, results = compare(a, b)
    except RunsError as e:
        fail(str(e))
    header = (f"A: {run_a.info.run_name}", f"B: {run_b.info.run_name}")
    click.echo("settings that differ:" if settings else "settings: identical")
    if settings:
        print_table([("SETTING", *header), *settings])
    click.echo("results:")
    print_table([("METRIC", *header), *results])


def _runs_plot(names: tuple[str, ...], out: Path) -> None:
    from pipeline.tracking.runs import RunsError, plot_accuracy_against_time

    try:
        plot_accuracy_against_time(list(names), out)
    except RunsError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write {out}: {e.strerror}: give --out a path in a folder you can write")
    click.echo(f"wrote {out}")


def _runs_sync(where: str) -> None:
    from pipeline.storage import Location
    from pipeline.tracking import RUN_ID_FILE, sync_unsent

    run_dir = Location(where)
    if not (run_dir / RUN_ID_FILE).is_file():
        fail(f"{run_dir} is not a run folder (no {RUN_ID_FILE}); run folders are under runs/")
    click.echo(f"sent {sync_unsent(run_dir)} metrics")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


for command in (promote, ui, export, deploy, predict, bench, study, models):
    main.add_command(command)
