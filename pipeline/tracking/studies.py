"""A study's MLflow records: the parent run that groups its runs (each a child, MLflow's nested
runs, in the study's experiment), the metric histories its figure is drawn from, and the
figure and table it logs.

    parent = open_study("study-degradation", "degradation-quick-2026...", {"scale": "quick", ...})
    series(child_run_id, "train/step_error")     # [(step, value), ...]
    log_files(parent, [png, table], "study")
"""

from __future__ import annotations

from pathlib import Path

from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from pipeline.tracking import _experiment_id, tracking_uri


def open_study(experiment: str, run_name: str, params: dict[str, str], description: str) -> str:
    """Creates the parent run of a study; returns its id."""
    client = MlflowClient(tracking_uri())
    run = client.create_run(
        _experiment_id(client, experiment), run_name=run_name, tags={"mlflow.note.content": description}
    )
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
    return run.info.run_id


def series(run_id: str, key: str, client: MlflowClient | None = None) -> list[tuple[int, float]]:
    """Every value of metric `key` of the run, by step (a study's curves, a run's plots)."""
    history = (client or MlflowClient(tracking_uri())).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


def children(parent_run_id: str) -> dict[str, tuple[str, str, str]]:
    """The finished child runs of a study's parent run, by the member each ran: (run id, run
    folder, status)."""
    client = MlflowClient(tracking_uri())
    parent = client.get_run(parent_run_id)
    found = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000
    )
    return {
        run.data.tags["study.member"]: (run.info.run_id, run.data.tags["run_dir"], run.info.status)
        for run in found
        if "study.member" in run.data.tags and "run_dir" in run.data.tags
    }


def params(run_id: str) -> dict[str, str]:
    return MlflowClient(tracking_uri()).get_run(run_id).data.params


def log_files(run_id: str, files: list[Path], artifact_dir: str) -> None:
    client = MlflowClient(tracking_uri())
    for path in files:
        client.log_artifact(run_id, str(path), artifact_dir)


def log_summary(run_id: str, metrics: dict[str, float]) -> None:
    """The study's own numbers (each configuration's final errors) on its parent run."""
    client = MlflowClient(tracking_uri())
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
