"""Runs a study: opens its parent MLflow run, submits its runs as children, as many at once as
the cluster has room for, then draws its figure and table and logs them to the parent.

    result = run_study(plan("degradation", "quick"), root="data/cifar10", out=Path("studies"))
    result.figure, result.table, result.findings
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import ray
from mlflow.exceptions import MlflowException

from pipeline.cluster.launch import check_room, connect, submit
from pipeline.config import Job, from_dict, load_job
from pipeline.data.index import load_index
from pipeline.storage import Location
from pipeline.study.figures import draw, findings, read_curves, table
from pipeline.study.plans import Plan
from pipeline.study.responses import draw_responses, measure, responses_findings, responses_table
from pipeline.tracking import Parent, close_run, studies, tracking_uri
from pipeline.train import checkpoint


class StudyError(ValueError):
    """A study that cannot run as asked (`runs_of` without the runs it needs)."""


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
    runs_of: str | None = None,
) -> StudyResult:
    """Submits every member of `plan` on the dataset at `root`, grouped under one parent run in
    the MLflow experiment `study-<name>`, and writes `<out>/<study>-<scale>.png` and `.md`.

    Args:
        overrides: `key=value` settings for every member after the scale's (tests shrink runs).
        runs_of: the parent run of an earlier study whose finished runs include this plan's
            members (the responses study measures the degradation study's nets): nothing trains.

    Raises:
        JobError: a member's job does not load with these settings; nothing submitted.
        StudyError: `runs_of` lacks a finished run of a member; nothing measured.
        NoRoom: the cluster can never hold one of the runs; nothing submitted.
    """
    settings = (f"data.root='{root}'", *plan.settings, *overrides)
    jobs = [load_job(m.job, [*settings, *m.overrides]) for m in plan.members]  # all checked first
    earlier = _earlier_runs(plan, runs_of) if runs_of else None
    if earlier is None:
        check_room(jobs, address, say)  # each run on its own: NoRoom before the parent run exists
    experiment = f"study-{plan.study}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    params = {"scale": plan.scale, "dataset": plan.dataset, "meaning": plan.meaning,
              "members": ", ".join(m.label for m in plan.members),
              "settings": " ".join(settings)}  # fmt: skip
    parent = studies.open_study(
        experiment,
        f"{plan.study}-{plan.scale}-{stamp}",
        params | ({"runs_of": runs_of} if runs_of else {}),
        plan.meaning,
    )
    say(f"study {plan.study} ({plan.meaning}); MLflow parent run {parent} in experiment '{experiment}'")
    if earlier is not None:
        say(f"the runs of study run {runs_of}: nothing to train")
        outcomes = earlier
    else:
        outcomes = _train(plan, jobs, Parent(experiment, parent), stamp, address, say)
    done = [(m, outcomes[i]) for i, m in enumerate(plan.members) if outcomes[i].error is None]
    failed = [f"{m.label}: {outcomes[i].error}" for i, m in enumerate(plan.members) if outcomes[i].error]
    path = out / f"{plan.study}-{plan.scale}.png"
    if plan.study == "responses":
        index = load_index(root)
        measured = []
        for member, ran in done:
            latest = checkpoint.latest(ran.run_dir)
            say(f"measuring {member.label}'s responses and gradients ({latest})")
            measured.append((member, measure(from_dict(checkpoint.read_job(latest)), index, latest)))
        figure = draw_responses(measured, path) if measured else out / "none.png"
        text = responses_table(measured) if measured else ""
        lines = responses_findings(measured)
        summary = {f"{m.label}/mean_response_std": sum(r.responses) / len(r.responses) for m, r in measured}
    else:
        curves = [read_curves(member, ran.run_id) for member, ran in done]
        figure = draw(plan, curves, path) if curves else out / "none.png"
        text = table(plan, curves) if curves else ""
        lines = findings(plan, curves)
        summary = {f"{c.member.label}/train_error": c.final_train for c in curves} | {
            f"{c.member.label}/test_error": c.final_test for c in curves
        }
    report = out / f"{plan.study}-{plan.scale}.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(f"{plan.meaning}\n\n{text}\n" + "".join(f"- {line}\n" for line in lines))
    if done:
        studies.log_files(parent, [figure, report], "study")
        studies.log_summary(parent, {key.replace(" ", "_"): value for key, value in summary.items()})
    close_run(parent, succeeded=not failed)
    return StudyResult(parent, figure, text, lines, failed)


@dataclass(frozen=True)
class Ran:
    """A member's run: its MLflow run and folder, or why it did not finish."""

    run_id: str = ""
    run_dir: Location | None = None
    error: str | None = None


def _train(
    plan: Plan, jobs: list[Job], parent: Parent, stamp: str, address: str | None, say: Callable[[str], None]
) -> dict[int, Ran]:
    """Trains the plan's members, as many at once as the cluster holds, the deepest first (with
    fewer slots than runs, the longest must not be left for last)."""
    connect(address, log_to_driver=False)
    order = sorted(range(len(jobs)), key=lambda i: -plan.members[i].depth)
    slots = room([jobs[i] for i in order], ray.available_resources())
    say(f"{len(jobs)} runs, {slots} at once (what the cluster holds now)")
    lock = threading.Lock()

    def run(i: int) -> Ran:
        member = plan.members[i]
        tell = say if slots == 1 else lambda line: say(f"{member.label}: {line}")
        tell(f"starts: job {member.job}")
        outcome = submit(
            jobs[i],
            f"{plan.study}-{plan.scale}-{member.label.replace(' ', '-').lower()}-{stamp}",
            address=address,
            progress_to=sys.stderr if slots == 1 else Prefixed(sys.stderr, f"{member.label}: ", lock),
            say=tell,
            parent=replace(parent, member=member.label),
            register=False,
        )
        return Ran(outcome.mlflow_run_id, outcome.run_dir) if outcome.finished else Ran(error=outcome.error)

    pool = ThreadPoolExecutor(slots, thread_name_prefix="study")
    try:
        return dict(zip(order, pool.map(run, order)))
    except KeyboardInterrupt:  # trainers in threads have no SIGINT handler of Ray Train's own
        say("interrupted: the study's runs stop with it (their checkpoints stay)")
        ray.shutdown()  # the runs' controllers are this driver's actors: they end with it
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _earlier_runs(plan: Plan, runs_of: str) -> dict[int, Ran]:
    """The finished runs of study run `runs_of` that ran this plan's members."""
    try:
        children = studies.children(runs_of)
    except MlflowException as e:
        raise StudyError(f"no study run {runs_of} in {tracking_uri()}: {str(e).splitlines()[0]}") from e
    missing = [m.label for m in plan.members if children.get(m.label, ("", "", ""))[2] != "FINISHED"]
    if missing:
        raise StudyError(
            f"study run {runs_of} has no finished run of {', '.join(missing)} (it has: "
            f"{', '.join(sorted(children)) or 'none'}); run the study without --runs-of to train them"
        )
    return {i: Ran(children[m.label][0], Location(children[m.label][1])) for i, m in enumerate(plan.members)}


def room(jobs: Sequence[Job], free: Mapping[str, float]) -> int:
    """How many of `jobs`, taken in order, a cluster's `free` CPUs and GPUs hold at once (at
    least one: the rest wait for it, and a cluster that scales up gets asked for one run's
    worth at a time)."""
    cpus, gpus = free.get("CPU", 0.0), free.get("GPU", 0.0)
    fits = 0
    for job in jobs:
        workers = job.scaling.num_workers
        cpus -= workers * job.scaling.cpus_per_worker
        gpus -= workers if job.scaling.use_gpu else 0
        if cpus < 0 or gpus < 0:
            break
        fits += 1
    return max(1, fits)


class Prefixed:
    """A text stream that writes each whole line to `stream` behind `prefix`, under `lock`: the
    progress of runs that train at once, told apart."""

    def __init__(self, stream: TextIO, prefix: str, lock: threading.Lock):
        self._stream, self._prefix, self._lock = stream, prefix, lock
        self._partial = ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        if lines:
            with self._lock:
                self._stream.write("".join(f"{self._prefix}{line}\n" for line in lines))
                self._stream.flush()
        return len(text)

    def flush(self) -> None:
        pass  # whole lines are written as they come; a partial one waits for its end

    def isatty(self) -> bool:
        return False  # no live bar: lines only
