"""The end of a run, in a known state whatever fails there: the best checkpoint registered, the
MLflow run closed, and the outcome stored in the run's folder (`result.json`), where `submit
--follow` and later commands read it when MLflow cannot answer.

    outcome = finish(job, "quickstart", run_id, run_dir, index, error=None, metrics={...})
    outcome.registered          # "resnet50 version 3 (val/top1 0.945000)", or None
    outcome.left_undone         # what failed at the end, with the command that completes it
    register_run("quickstart")  # `resnet-pipe register`: a finished run that could not register

A run whose training finished but whose registration failed (the object store or MLflow down)
ends FINISHED in MLflow with the tag `resnet_pipe.registration` saying why; `resnet-pipe
register RUN`, or submitting the run again, registers it then.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from pipeline import tracking
from pipeline.config import Job, from_dict
from pipeline.data.index import DatasetError, Index, load_index
from pipeline.storage import Location
from pipeline.train import checkpoint

RESULT_FILE = "result.json"
TRACKING_WAIT_S = 60.0  # how long the end of a run waits for a tracking server that does not answer
REGISTRATION_TAG = "resnet_pipe.registration"  # "registered resnet50 version 3 ...", or why not


@dataclass(frozen=True)
class Outcome:
    finished: bool
    metrics: dict[str, float]
    mlflow_run_id: str
    run_dir: Location  # the run's folder in storage: its checkpoints, local or on an object store
    error: str | None = None
    registered: str | None = None  # "resnet50 version 3 (val/top1 0.945000)": what the registry got
    left_undone: list[str] = field(default_factory=list)  # end-of-run steps that failed, and the fix


class FinishError(ValueError):
    """`register_run` cannot register: an unknown run, one not finished, no whole checkpoint."""


def finish(
    job: Job,
    run_name: str,
    run_id: str,
    run_dir: Location,
    index: Index,
    error: str | None,
    metrics: dict[str, float],
    register: bool = True,
    say: Callable[[str], None] = print,
) -> Outcome:
    """Registers a run whose training succeeded (`error` None; with `register`), closes its MLflow
    run and stores the outcome. Nothing here raises: what fails is said and kept in the outcome's
    `left_undone`, with the command that completes it."""
    from pipeline.tracking.registry import RegistryError

    registered, undone, tags, closed = None, [], {}, False
    with tracking.bounded_retries():
        silent = tracking.unanswered(TRACKING_WAIT_S)  # one wait, not one per request
        if error is None and register:
            try:
                if silent:
                    raise RegistryError(silent)
                registered = _register(job, run_id, run_dir, index, say)
                tags[REGISTRATION_TAG] = f"registered {registered}" if registered else "no scored checkpoint"
            except (RegistryError, OSError, DatasetError) as e:
                reason = _first_line(e)
                undone.append(
                    f"the run finished training but its model is not registered ({reason}): "
                    f"`resnet-pipe register {run_name}` registers it once that is fixed"
                )
                tags[REGISTRATION_TAG] = f"failed: {reason}"
        try:
            if silent:
                raise tracking.TrackingError(silent)
            tracking.close_run(run_id, succeeded=error is None, tags=tags)
            closed = True
        except tracking.TrackingError as e:
            then = (
                f"`resnet-pipe register {run_name}`"
                if error is None
                else f"`resnet-pipe submit --resume {run_name}`"
            )
            undone.append(
                f"MLflow could not be told that run {run_id} ended ({_first_line(e)}): "
                f"it shows RUNNING until {then} ends it"
            )
    outcome = Outcome(error is None, metrics, run_id, run_dir, error, registered, undone)
    try:
        store_result(outcome, closed)
    except OSError as e:
        undone.append(f"the outcome could not be stored in {run_dir / RESULT_FILE}: {_first_line(e)}")
    for line in undone:
        say(f"warning: {line}")
    return outcome


def store_result(outcome: Outcome, closed: bool) -> None:
    """Writes the outcome to the run's folder: status, final metrics, registered version."""
    record = asdict(outcome) | {"run_dir": outcome.run_dir.uri, "mlflow_closed": closed, "at": time.time()}
    record["status"] = "FINISHED" if outcome.finished else "FAILED"
    (outcome.run_dir / RESULT_FILE).write_text(json.dumps(record, indent=1))


def stored_result(run_dir: Location) -> dict | None:
    """What `store_result` wrote for the run, or None."""
    result = run_dir / RESULT_FILE
    return json.loads(result.read_text()) if result.is_file() else None


def stored_outcome(job_name: str, run_name: str, storage_path: str | None) -> tuple[dict | None, str]:
    """The outcome of run `run_name` of job `job_name` as MLflow holds it, else as its folder under
    `storage_path` does (`result.json`), and where it came from; (None, why) when neither answers.
    Keys: status, mlflow_run_id, metrics, registered, registration."""
    from pipeline.tracking.runs import result_of

    unreachable = tracking.unanswered(10.0)
    if not unreachable:
        try:
            with tracking.bounded_retries():
                found = result_of(run_name, job_name)
        except Exception as e:  # noqa: BLE001 - MLflow refusing: the stored result then
            unreachable = f"MLflow {tracking.tracking_uri()} did not answer: {_first_line(e)}"
        else:
            if found is not None:
                record = {
                    "status": found.status,
                    "mlflow_run_id": found.run_id,
                    "metrics": found.metrics,
                    "registered": found.registered,
                    "registration": found.tags.get(REGISTRATION_TAG),
                }
                return record, f"from MLflow, {tracking.tracking_uri()}"
            unreachable = f"MLflow {tracking.tracking_uri()} has no run '{run_name}' of job '{job_name}'"
    if storage_path is None:
        return None, unreachable
    run_dir = Location(storage_path) / run_name
    try:
        stored = stored_result(run_dir)
    except OSError as e:
        return None, f"{unreachable}; {run_dir / RESULT_FILE} could not be read: {_first_line(e)}"
    if stored is None:
        return None, f"{unreachable}; the run stored no result in {run_dir}"
    stored["registration"] = "; ".join(stored["left_undone"])
    return stored, f"from {run_dir / RESULT_FILE}"


def _register(
    job: Job, run_id: str, run_dir: Location, index: Index, say: Callable[[str], None]
) -> str | None:
    """The run's plots, and its best whole checkpoint into the model registry (a corrupt one is
    named and passed over); returns what was registered, None when no checkpoint is scored.

    Raises:
        RegistryError, OSError: MLflow or the object store refused or could not be reached.
    """
    best, state = None, None
    for best in checkpoint.best_first(run_dir):
        try:
            state = checkpoint.load(best)
            break
        except checkpoint.CorruptCheckpoint as e:
            say(f"warning: {e}; registering the next best")
    if state is None:
        return None
    from pipeline.tracking import registry

    version = registry.publish(run_id, state, best.uri, job, index)
    return f"{version.name} version {version.version} (val/top1 {version.tags['val/top1']})"


def register_run(run: str, say: Callable[[str], None] = print) -> Outcome:
    """Registers finished run `run` (name or MLflow run id) that could not register when it ended,
    closes its MLflow run FINISHED, and stores its outcome. A run registered already keeps its
    version.

    Raises:
        FinishError: unknown run, not finished training, or no whole scored checkpoint.
        TrackingError: MLflow cannot be reached.
    """
    from pipeline.tracking.runs import RunsError, describe

    try:
        found = describe(run)
    except RunsError as e:
        raise FinishError(str(e)) from None
    if "run_dir" not in found.tags:
        raise FinishError(f"run {found.run_id} is not a training run of resnet-pipe (it has no run_dir tag)")
    run_dir = Location(found.tags["run_dir"])
    latest = checkpoint.latest(run_dir)
    if latest is None:
        raise FinishError(f"run '{found.name}' has no checkpoints in {run_dir}: nothing to register")
    job, meta = from_dict(checkpoint.read_job(latest)), checkpoint.read_meta(latest)
    index = load_index(job.data.root)
    epochs = planned_epochs(job, index)
    if meta["epoch"] < epochs or meta["epoch_step"]:
        raise FinishError(
            f"run '{found.name}' has not finished training (its latest checkpoint is in epoch {meta['epoch']}"
            f" of {epochs}): `resnet-pipe submit {job.name} --resume {found.name}` trains it to the end"
        )
    outcome = finish_again(job, found.name, found.run_id, run_dir, index, meta["metrics"], True, say)
    if outcome.registered is None and not outcome.left_undone:
        raise FinishError(f"run '{found.name}' has no scored checkpoint in {run_dir} to register")
    return outcome


def finish_again(
    job: Job,
    run_name: str,
    run_id: str,
    run_dir: Location,
    index: Index,
    metrics: dict[str, float],
    register: bool,
    say: Callable[[str], None],
) -> Outcome:
    """The end of a run that finished training before: registered now if it is not yet (with
    `register`), and closed FINISHED."""
    from pipeline.tracking import registry

    already = registry.version_of_run(run_id) if register else None
    if already is None:
        return finish(job, run_name, run_id, run_dir, index, None, metrics, register, say)
    registered = f"{already.name} version {already.version} (val/top1 {already.tags.get('val/top1')})"
    say(f"run '{run_name}' registered {registered} already")
    tracking.close_run(run_id, succeeded=True, tags={REGISTRATION_TAG: f"registered {registered}"})
    return Outcome(True, metrics, run_id, run_dir, registered=registered)


def planned_epochs(job: Job, index: Index) -> int:
    """The epochs `job` trains on `index`: its `epochs`, or as many as hold its `iterations`."""
    if not job.iterations:
        return job.epochs
    images = len(index.splits["train"]) - job.data.holdout
    if job.data.train_images:
        images = min(images, job.data.train_images)
    steps = images // job.global_batch_size
    if job.run.max_steps_per_epoch:
        steps = min(steps, job.run.max_steps_per_epoch)
    return job.epochs_for(max(steps, 1))


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
