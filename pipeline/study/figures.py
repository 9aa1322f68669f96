"""A study's figure and table, drawn from its runs' MLflow metrics.

Training error is what the runs log as `train/step_error`: the top-1 error of the augmented
batches as they are trained on, every `run.log_every_steps` steps (the paper's thin curves).
Test error is 1 - `val/top1` at each epoch's end, placed at the iteration that epoch ended on
(the bold curves). A net's final training error is the mean of its last tenth of iterations. (A run too short
to log a progress line has only each epoch's `train/error`, used in their place.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure  # a figure without pyplot: no display, no global state

from pipeline.models import create_model
from pipeline.models.measure import parameters
from pipeline.study.plans import TABLE3, TABLE6, Member, Plan
from pipeline.tracking import studies

COLOURS = {20: "tab:orange", 32: "tab:blue", 44: "tab:red", 56: "tab:green", 110: "black", 1202: "tab:purple"}
LAST_SHARE = 0.1  # the final training error: the mean over the last tenth of the iterations


@dataclass(frozen=True)
class Curves:
    member: Member
    run_id: str
    train: list[tuple[int, float]]  # (iteration, training error)
    test: list[tuple[int, float]]  # (iteration, test error)
    parameters: int

    @property
    def final_train(self) -> float:
        last = self.train[-1][0]
        tail = [e for step, e in self.train if step > last * (1 - LAST_SHARE)]
        return sum(tail) / len(tail)

    @property
    def final_test(self) -> float:
        return self.test[-1][1]


def read_curves(member: Member, run_id: str) -> Curves:
    """The member's curves, from its MLflow run."""
    ends = dict(studies.series(run_id, "iterations"))  # epoch -> the iteration it ended on
    # a run shorter than its progress interval has only its epochs' training error
    train = studies.series(run_id, "train/step_error") or [
        (ends[epoch], error) for epoch, error in studies.series(run_id, "train/error") if epoch in ends
    ]
    test = [(ends[epoch], 1 - top1) for epoch, top1 in studies.series(run_id, "val/top1") if epoch in ends]
    arch = studies.params(run_id)["model.arch"]
    with torch.device("meta"):  # shapes only: counting needs no weights
        count = parameters(create_model(arch, num_classes=10))
    return Curves(member, run_id, train, test, count)


def _smooth(values: list[float], window: int = 5) -> list[float]:
    return [
        sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
        for i in range(len(values))
    ]


def draw(plan: Plan, curves: list[Curves], path: Path) -> Path:
    """The study's figure as a PNG: training error thin and test error bold against iterations,
    the plain and the residual nets side by side (degradation), or every net in one panel."""
    families = list(dict.fromkeys(c.member.family for c in curves)) if plan.study == "degradation" else [None]
    figure = Figure(figsize=(5.5 * len(families), 4.2), dpi=120)
    axes = figure.subplots(1, len(families), squeeze=False, sharey=True)[0]
    for ax, family in zip(axes, families):
        for c in (c for c in curves if family in (None, c.member.family)):
            colour = COLOURS.get(c.member.depth) if plan.study != "shortcuts" else None
            steps, errors = zip(*c.train) if c.train else ((), ())
            line = ax.plot(
                steps, [100 * e for e in _smooth(list(errors))], linewidth=0.8, color=colour, alpha=0.8
            )[0]
            if c.test:
                steps, errors = zip(*c.test)
                ax.plot(
                    steps,
                    [100 * e for e in errors],
                    linewidth=2.2,
                    color=line.get_color(),
                    marker="o",
                    markersize=3,
                    label=c.member.label,
                )
        title = {"plain": "plain networks", "residual": "ResNets"}.get(family, "")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("error (%): training thin, test bold")
    figure.suptitle(f"{plan.study}, {plan.scale} scale", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def table(plan: Plan, curves: list[Curves]) -> str:
    """The study's table in Markdown: each net's parameters and final errors, beside the
    paper's number where it gives one."""
    paper = None  # the paper's column, where its number is of the same dataset
    if plan.study == "depth":
        paper = lambda m: TABLE6.get(m.depth)  # noqa: E731
    elif plan.study == "shortcuts" and plan.dataset == "imagenet":
        paper = lambda m: TABLE3.get(m.family)  # noqa: E731
    head = "| net | parameters | training error (%) | test error (%) |"
    rule = "|---|---:|---:|---:|"
    if paper:
        head, rule = head + " paper's test error (%) |", rule + "---:|"
    lines = [head, rule]
    for c in curves:
        row = f"| {c.member.label} | {c.parameters / 1e6:.2f}M | {100 * c.final_train:.1f} "
        row += f"| {100 * c.final_test:.1f} |"
        if paper:
            quoted = paper(c.member)
            row += f" {quoted:.2f} |" if quoted is not None else " - |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def depths(by: dict[tuple[str, int], float], family: str) -> list[int]:
    """The depths of `family` among the keys (family, depth) of `by`, in order."""
    return sorted(d for f, d in by if f == family)


def twins(by: dict[tuple[str, int], float]) -> list[int]:
    """The depths at which `by` has both a plain and a residual net."""
    return sorted(set(depths(by, "plain")) & set(depths(by, "residual")))


def findings(plan: Plan, curves: list[Curves]) -> list[str]:
    """What the figure shows, in sentences: for the degradation study, whether the deeper plain
    net trains worse than the shallower one, and the residual net's lead at the deepest depth."""
    if plan.study != "degradation":
        return []
    by = {(c.member.family, c.member.depth): c.final_train for c in curves}
    plain = depths(by, "plain")
    lines = []
    if len(plain) > 1:
        low, high = plain[0], plain[-1]
        verdict = "above" if by["plain", high] > by["plain", low] else "not above"
        lines.append(
            f"plain-{high}'s training error {100 * by['plain', high]:.1f} % is {verdict} plain-{low}'s "
            f"{100 * by['plain', low]:.1f} %: "
            + ("the degradation problem" if verdict == "above" else "no degradation seen")
        )
    for depth in twins(by):
        gap = 100 * (by["plain", depth] - by["residual", depth])
        lines.append(
            f"at depth {depth} the residual net's training error is {gap:.1f} points below the plain net's"
        )
    residual = depths(by, "residual")
    if len(residual) > 1:
        low, high = residual[0], residual[-1]
        relation = "below" if by["residual", high] < by["residual", low] else "above"
        lines.append(
            f"ResNet-{high}'s training error {100 * by['residual', high]:.1f} % is {relation} ResNet-{low}'s "
            f"{100 * by['residual', low]:.1f} %"
        )
    return lines
