"""Plots of a finished run, drawn from what MLflow holds and logged to it as images:
`plots/curves.png` (training loss, validation top-1 and top-5 per epoch) and
`plots/learning_rate.png` (the schedule as the run took it, per step).

    log_plots(run_id)   # the driver, at the end of a run
"""

from __future__ import annotations

from matplotlib.figure import Figure  # a figure without pyplot: no display, no global state
from mlflow.tracking import MlflowClient

from pipeline.tracking import tracking_uri


def _series(client: MlflowClient, run_id: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
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
