"""Runs as MLflow holds them, for the terminal: `resnet-pipe runs [JOB]` and `runs compare A B`,
and the result of a run that ended on a cluster (`submit --follow`).

rows = run_table(job_name=None)   # newest first
differences = compare("lr-0.1", "lr-0.2")
plot_accuracy_against_time(["fast-seed0", "paper"], Path("time.png"))   # `runs plot`
ended = result_of("remote", job_name="quickstart")   # status, final metrics, registered version
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.tracking import runs_named, tracking_uri

RESULTS = ("val/top1", "val/top5", "val/ema_top1", "train/loss", "train/images_per_s", "time_to_target_s")


class RunsError(ValueError):
    """An unknown job or run."""


@dataclass(frozen=True)
class RunSummary:
    name: str
    run_id: str
    job: str
    status: str
    epochs: int  # trained (`train/loss` is logged every epoch; `val/top1` only where evaluated)
    best_top1: float | None
    images_per_s: float | None
    duration_s: float | None  # the run's own clock (`elapsed_s`: sessions of a resumed run, not the gaps)
    time_to_target_s: float | None  # the run's clock at its first evaluation at or above the job's target


def run_table(job_name: str | None = None) -> list[RunSummary]:
    """Every run (of `job_name`'s experiment, when given), newest first."""
    client = MlflowClient(tracking_uri())
    if job_name is not None:
        experiment = client.get_experiment_by_name(job_name)
        if experiment is None:
            raise RunsError(f"no runs of job '{job_name}' in {tracking_uri()}")
        experiments = [experiment]
    else:
        experiments = client.search_experiments()
    ids = [e.experiment_id for e in experiments]
    if not ids:
        return []
    runs = client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=1000)
    return [_summary(client, run) for run in runs]


def _summary(client: MlflowClient, run: Run) -> RunSummary:
    top1 = client.get_metric_history(run.info.run_id, "val/top1")
    trained = client.get_metric_history(run.info.run_id, "train/loss") or top1
    info = run.info
    duration = run.data.metrics.get("elapsed_s")
    if duration is None and info.end_time and info.start_time:
        duration = (info.end_time - info.start_time) / 1000
    return RunSummary(
        name=info.run_name,
        run_id=info.run_id,
        job=run.data.tags.get("job", ""),
        status=info.status,
        epochs=len({m.step for m in trained}),
        best_top1=max((m.value for m in top1), default=None),
        images_per_s=run.data.metrics.get("train/images_per_s"),
        duration_s=duration,
        time_to_target_s=run.data.metrics.get("time_to_target_s"),
    )


def find_run(client: MlflowClient, name_or_id: str) -> Run:
    """A run by id, else the newest run of that name."""
    try:
        return client.get_run(name_or_id)
    except MlflowException:
        pass
    found = runs_named(client, name_or_id, max_results=1)
    if not found:
        where = tracking_uri()
        raise RunsError(f"no run named or with id '{name_or_id}' in {where} (see `resnet-pipe runs`)")
    return found[0]


def compare(a: str, b: str) -> tuple[Run, Run, list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """The two runs, the settings that differ (key, a, b) and their results side by side."""
    client = MlflowClient(tracking_uri())
    run_a, run_b = find_run(client, a), find_run(client, b)
    params_a, params_b = run_a.data.params, run_b.data.params
    settings = [
        (key, params_a.get(key, "-"), params_b.get(key, "-"))
        for key in sorted(params_a.keys() | params_b.keys())
        if params_a.get(key) != params_b.get(key)
    ]
    results = []
    for key in RESULTS:
        values = [run.data.metrics.get(key) for run in (run_a, run_b)]
        if any(v is not None for v in values):
            results.append((key, *(f"{v:.4f}" if v is not None else "-" for v in values)))
    return run_a, run_b, settings, results


def plot_accuracy_against_time(names_or_ids: list[str], out: Path) -> None:
    """Writes val/top1 of the runs against their wall-clock minutes, in one figure, to `out`.

    Raises:
        RunsError: an unknown run, or none of them has an evaluation yet.
        OSError: `out` cannot be written.
    """
    from matplotlib.figure import Figure

    from pipeline.tracking.plots import accuracy_against_time

    kinds = Figure().canvas.get_supported_filetypes()  # png, svg, pdf, ...: asked before any drawing
    if out.suffix.lstrip(".").lower() not in kinds:
        endings = ", ".join(f".{kind}" for kind in kinds)
        raise RunsError(f"no figure format for '{out.name}': give --out a name ending in one of {endings}")
    client = MlflowClient(tracking_uri())
    found = [find_run(client, name) for name in names_or_ids]
    figure = accuracy_against_time(client, [run.info.run_id for run in found])
    if figure is None:
        named = ", ".join(names_or_ids)
        raise RunsError(f"no evaluation with its wall-clock (val/top1 and elapsed_s) in {named} yet")
    figure.savefig(out, dpi=110)


@dataclass(frozen=True)
class RunResult:
    """What MLflow holds of a run's end: its status, the last value of each result metric, and
    the model version it registered ("resnet50 version 3 (val/top1 0.945000)"), if any."""

    run_id: str
    name: str
    status: str
    metrics: dict[str, float]
    registered: str | None
    tags: dict[str, str]


def result_of(run_name: str, job_name: str) -> RunResult | None:
    """The newest run named `run_name` in job `job_name`'s experiment; None when MLflow has none."""
    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name(job_name)
    if experiment is None:
        return None
    quote = "'" if "'" not in run_name else '"'
    where = f"attributes.run_name = {quote}{run_name}{quote}"
    found = client.search_runs([experiment.experiment_id], where, order_by=["attributes.start_time DESC"])
    return _result(client, found[0]) if found else None


def describe(name_or_id: str) -> RunResult:
    """A run by id, else the newest run of that name (`find_run`), as `RunResult`."""
    client = MlflowClient(tracking_uri())
    return _result(client, find_run(client, name_or_id))


def _result(client: MlflowClient, run: Run) -> RunResult:
    metrics = {key: run.data.metrics[key] for key in RESULTS if key in run.data.metrics}
    versions = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    registered = None
    if versions:
        newest = max(versions, key=lambda v: int(v.version))
        registered = f"{newest.name} version {newest.version} (val/top1 {newest.tags.get('val/top1')})"
    return RunResult(
        run.info.run_id, run.info.run_name, run.info.status, metrics, registered, dict(run.data.tags)
    )
