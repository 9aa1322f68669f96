"""Plots of a finished run, logged to it as images: `plots/curves.png` (training loss,
validation top-1 and top-5 per epoch), `plots/accuracy_vs_time.png` (validation top-1 against the
run's wall-clock, with its target) and `plots/learning_rate.png` (the schedule as the run took it,
per step), drawn from what MLflow holds; `plots/class_errors.png` (the classes the
registered weights miss most, with every class's counts in `plots/class_errors.json`), drawn
from the best checkpoint.

    log_plots(run_id)                                      # the driver, at the end of a run
    log_class_errors(run_id, per_class, wnids, names)      # with the registered weights' counts
    accuracy_against_time(client, [a, b]).savefig(path)    # `resnet-pipe runs plot A B`
"""

from __future__ import annotations

import torch
from matplotlib.figure import Figure  # a figure without pyplot: no display, no global state
from mlflow.tracking import MlflowClient

from pipeline.tracking import tracking_uri
from pipeline.tracking.studies import series


def _series(client: MlflowClient, run_id: str, key: str) -> tuple[list[int], list[float]]:
    points = series(run_id, key, client)
    return [s for s, _ in points], [v for _, v in points]


def log_plots(run_id: str) -> list[str]:
    """Draws and logs the plots the run has data for; returns their artifact paths."""
    client = MlflowClient(tracking_uri())
    logged = []
    epochs, loss = _series(client, run_id, "train/loss")
    if epochs:
        figure = Figure(figsize=(11, 4))
        left, right = figure.subplots(1, 2)
        left.plot(epochs, loss, marker="o")
        left.set(title="training loss", xlabel="epoch", ylabel="loss")
        for key in ("val/top1", "val/top5", "val/ema_top1"):
            steps, values = _series(client, run_id, key)
            if steps:
                right.plot(steps, values, marker="o", label=key)
        right.set(title="validation accuracy", xlabel="epoch", ylabel="accuracy", ylim=(0, 1))
        right.legend()
        figure.tight_layout()
        client.log_figure(run_id, figure, "plots/curves.png")
        logged.append("plots/curves.png")
    if path := _accuracy_against_time(client, run_id):
        logged.append(path)
    steps, lr = _series(client, run_id, "train/lr")
    if steps:
        figure = Figure(figsize=(6, 4))
        axis = figure.subplots()
        axis.plot(steps, lr)
        axis.set(title="learning rate", xlabel="step", ylabel="learning rate")
        figure.tight_layout()
        client.log_figure(run_id, figure, "plots/learning_rate.png")
        logged.append("plots/learning_rate.png")
    return logged


def _accuracy_against_time(client: MlflowClient, run_id: str) -> str | None:
    figure = accuracy_against_time(client, [run_id])
    if figure is None:
        return None
    client.log_figure(run_id, figure, "plots/accuracy_vs_time.png")
    return "plots/accuracy_vs_time.png"


def accuracy_against_time(client: MlflowClient, run_ids: list[str]) -> Figure | None:
    """Validation top-1 of each run against the wall-clock minutes at which each evaluation ended
    (the metric `elapsed_s` of the same epoch: time between resumed sessions left out), with each
    job's target: time to accuracy, as drawn. None when no run has an evaluation."""
    figure = Figure(figsize=(7, 4.5))
    axis = figure.subplots()
    targets, drawn = set(), False
    for run_id in run_ids:
        run = client.get_run(run_id)
        clock = dict(series(run_id, "elapsed_s", client))
        points = [
            (clock[epoch] / 60, top1) for epoch, top1 in series(run_id, "val/top1", client) if epoch in clock
        ]
        if points:
            axis.plot(*zip(*points), marker="o", markersize=3, label=run.info.run_name)
            drawn = True
        targets.add(float(run.data.params.get("target_top1", 0) or 0))
    if not drawn:
        return None
    for target in sorted(targets - {0.0}):
        axis.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target}")
    axis.set(title="val/top1 against wall-clock time", xlabel="minutes of the run's clock", ylabel="top-1")
    axis.set_xlim(left=0)  # time to accuracy is counted from the run's start
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def log_class_errors(
    run_id: str, per_class: torch.Tensor, wnids: list[str], names: list[str], most: int = 20
) -> list[dict]:
    """Logs the `most` classes with the highest top-1 error rate on validation as a bar chart,
    and every class's counts as JSON; returns the charted rows, worst first.

    Args:
        per_class: [classes, 2]: each class's validation samples and top-1 errors.
    """
    rows = [
        {"class_index": i, "wnid": wnids[i], "name": names[i], "samples": samples, "errors": errors,
         "error_rate": errors / samples}
        for i, (samples, errors) in enumerate(per_class.tolist())
        if samples
    ]  # fmt: skip
    client = MlflowClient(tracking_uri())
    client.log_dict(run_id, rows, "plots/class_errors.json")
    worst = sorted(rows, key=lambda r: (-r["error_rate"], -r["samples"], r["class_index"]))[:most]
    figure = Figure(figsize=(8, 0.3 * len(worst) + 1.2))
    axis = figure.subplots()
    labels = [f"{r['name'][:28]} ({r['wnid']})" for r in worst]
    axis.barh(labels[::-1], [r["error_rate"] for r in worst][::-1])
    title = f"classes with the most top-1 errors (of {len(rows)})"
    axis.set(title=title, xlabel="top-1 error rate", xlim=(0, 1))
    figure.tight_layout()
    client.log_figure(run_id, figure, "plots/class_errors.png")
    return worst
