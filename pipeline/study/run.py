"""Runs a study: opens its parent MLflow run, submits its runs as children (one after another),
then draws its figure and table and logs them to the parent.

    result = run_study(plan("degradation", "quick"), root="data/cifar10", out=Path("studies"))
    result.figure, result.table, result.findings
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.cluster.launch import submit
from pipeline.config import load_job
from pipeline.study.figures import draw, findings, read_curves, table
from pipeline.study.plans import Plan
from pipeline.tracking import Parent, close_run, studies


@dataclass(frozen=True)
class StudyResult:
    parent_run_id: str
    figure: Path
    table: str
    findings: list[str]
    failed: list[str]  # members whose run did not finish, with the error


def run_study(
    plan: Plan,
    root: str,
    out: Path,
    address: str | None = None,
    overrides: tuple[str, ...] = (),
    say: Callable[[str], None] = print,
) -> StudyResult:
    """Submits every member of `plan` on the dataset at `root`, grouped under one parent run in
    the MLflow experiment `study-<name>`, and writes `<out>/<study>-<scale>.png` and `.md`.

    Args:
        overrides: `key=value` settings for every member after the scale's (tests shrink runs).

    Raises:
        JobError: a member's job does not load with these settings; nothing submitted.
    """
    settings = (f"data.root='{root}'", *plan.settings, *overrides)
    jobs = [load_job(m.job, [*settings, *m.overrides]) for m in plan.members]  # all checked first
    experiment = f"study-{plan.study}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent = studies.open_study(
        experiment,
        f"{plan.study}-{plan.scale}-{stamp}",
        {"scale": plan.scale, "dataset": plan.dataset, "meaning": plan.meaning,
         "members": ", ".join(m.label for m in plan.members), "settings": " ".join(settings)},
        plan.meaning,
    )  # fmt: skip
    say(f"study {plan.study} ({plan.meaning}); MLflow parent run {parent} in experiment '{experiment}'")
    done, failed = [], []
    for member, job in zip(plan.members, jobs):
        say(f"[{len(done) + len(failed) + 1}/{len(jobs)}] {member.label}: job {member.job}")
        name = f"{plan.study}-{plan.scale}-{member.label.replace(' ', '-').lower()}-{stamp}"
        outcome = submit(
            job,
            name,
            address=address,
            progress_to=sys.stderr,
            say=say,
            parent=Parent(experiment, parent),
            register=False,
        )
        if outcome.finished:
            done.append(read_curves(member, outcome.mlflow_run_id))
        else:
            failed.append(f"{member.label}: {outcome.error}")
    figure = draw(plan, done, out / f"{plan.study}-{plan.scale}.png") if done else out / "none.png"
    text = table(plan, done) if done else ""
    lines = findings(plan, done)
    report = out / f"{plan.study}-{plan.scale}.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(f"{plan.meaning}\n\n{text}\n" + "".join(f"- {line}\n" for line in lines))
    if done:
        studies.log_files(parent, [figure, report], "study")
        studies.log_summary(
            parent,
            {f"{c.member.label.replace(' ', '_')}/train_error": c.final_train for c in done}
            | {f"{c.member.label.replace(' ', '_')}/test_error": c.final_test for c in done},
        )
    close_run(parent, succeeded=not failed)
    return StudyResult(parent, figure, text, lines, failed)
