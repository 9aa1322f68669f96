"""MLflow tracking: this package is the only place that imports mlflow. This module opens and
closes runs and holds rank 0's logger; `registry` registers and promotes models, `runs` reads
runs back for the terminal, `plots` draws a finished run's curves.

The driver opens (or reopens) the run, the workers' rank 0 logs metrics and artifacts into it
by run id, and the driver closes it. The default store is a SQLite file in the working folder
with artifacts beside it; MLFLOW_TRACKING_URI overrides both.

    run_id = open_run(job, run_name, run_dir, dataset_hash)
    logger = RunLogger(tracking_uri(), run_id)        # on rank 0
    logger.log_metrics({"val/top1": 0.9}, step=3)
    close_run(run_id, succeeded=True)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils import logging_utils
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline.config import Job, flatten, jobs_dir, to_dict
from pipeline.storage import Location

log = logging.getLogger("resnet_pipe")
# MLflow draws a progress bar for every artifact it downloads or uploads (a registered model's
# weights, plots): the terminal shows our progress and results, not MLflow's bookkeeping. Set in
# the environment, the user's choice wins.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# and its INFO records ("Creating initial MLflow database tables ...", "Validating input example
# against model signature") are its own bookkeeping too: warnings and errors still show
logging.getLogger("mlflow").setLevel(logging.WARNING)
RUN_ID_FILE = "mlflow_run_id"  # in the run's storage folder: a resubmitted run reopens its MLflow run
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
UNSENT_FILE = "unsent_metrics.jsonl"  # in the run's folder: metrics that never reached MLflow
RETRY_S = 5.0  # while MLflow is unreachable, the logger tries again this often
REQUEST_TIMEOUT_S = 20
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch


CREDENTIALS = (  # what MLflow's client reads for a server with authentication or TLS
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
)


@contextlib.contextmanager
def quiet_mlflow():
    """Silences MLflow's event messages ("Successfully registered model ...", "Created version
    ...") and warnings while the block runs: the caller reports what happened, in its own words."""
    logging_utils.disable_logging()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging_utils.enable_logging()


@contextlib.contextmanager
def tracking_at(uri: str):
    """MLflow at `uri` while the block runs, then as it was: MLFLOW_TRACKING_URI, which
    `tracking_uri()` and the processes started meanwhile read, and MLflow's own setting, which its
    module-level API (`mlflow.start_run`, `register_model`) reads. `mlflow.set_tracking_uri` sets
    both, for good: a later run of the process, or a command it starts, would go to this store."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None: unset again


def credentials() -> dict[str, str]:
    """This process's MLflow credentials (CREDENTIALS that are set), to hand to the processes
    that log or load models for it: rank 0 of a training job, the Serve replicas."""
    return {key: os.environ[key] for key in CREDENTIALS if key in os.environ}


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite file in the working folder (absolute, for the workers)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def _experiment_id(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:"):
        location = (Path.cwd() / DEFAULT_ARTIFACTS / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


class TrackingError(RuntimeError):
    """The tracking store refused or could not be reached when a run was opened."""


@dataclass(frozen=True)
class Parent:
    """The MLflow run a run belongs under (a study's), and its experiment."""

    experiment: str
    run_id: str
    member: str = ""  # the child's part in the study ("ResNet-56"), tagged `study.member`


def open_run(
    job: Job, run_name: str, run_dir: Location | Path, dataset_hash: str, parent: Parent | None = None
) -> str:
    """Creates the MLflow run of `run_name` with the resolved job as params, or reopens it; with
    `parent`, a child of that run in its experiment (MLflow's nested runs).

    Raises:
        TrackingError: MLflow refused (credentials) or could not be reached; nothing started.
    """
    try:
        return _open_run(job, run_name, Location(run_dir), dataset_hash, parent)
    except MlflowException as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrackingError(
            f"cannot open the MLflow run at {tracking_uri()}: {first_line}\n"
            "Check MLFLOW_TRACKING_URI; a server with authentication also needs "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)."
        ) from e


def _open_run(job: Job, run_name: str, run_dir: Location, dataset_hash: str, parent: Parent | None) -> str:
    client = MlflowClient(tracking_uri())
    id_file = run_dir / RUN_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id
    tags = {"job": job.name, "dataset_hash": dataset_hash, "run_dir": run_dir.uri}
    experiment = job.name
    if parent is not None:
        tags |= {MLFLOW_PARENT_RUN_ID: parent.run_id, "study.member": parent.member}
        experiment = parent.experiment
    run = client.create_run(_experiment_id(client, experiment), run_name=run_name, tags=tags)
    params = {key: str(value) for key, value in flatten(to_dict(job)).items()}
    params |= {"global_batch_size": str(job.global_batch_size), "peak_lr": str(job.peak_lr)}
    params |= {"dataset_hash": dataset_hash}
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in sorted(params.items())])
    client.log_dict(run.info.run_id, to_dict(job), "job/resolved.json")
    job_file = jobs_dir() / f"{job.name}.toml"
    if job_file.is_file():
        client.log_text(run.info.run_id, job_file.read_text(), f"job/{job.name}.toml")
    for key, value in _environment().items():
        client.set_tag(run.info.run_id, key, value)
    id_file.write_text(run.info.run_id)
    return run.info.run_id


PACKAGES = ("torch", "torchvision", "timm", "ray", "nvidia-dali-cuda120", "mlflow", "numpy")


def _environment() -> dict[str, str]:
    """Tags: the git commit of the code (MLflow's own key), package versions, Python, the OS."""
    tags = {"python": platform.python_version(), "platform": platform.platform()}
    for package in PACKAGES:
        try:
            tags[f"versions.{package}"] = version(package)
        except PackageNotFoundError:
            continue
    project = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(project), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass  # not a git checkout, or no git: the versions above still say what ran
    return tags


def runs_named(client: MlflowClient, run_name: str, max_results: int = 1000) -> list:
    """The runs named `run_name` in every experiment, newest first. MLflow's filter strings have
    no escape for quotes: the name goes in the quotes it does not contain, and a name with both
    kinds is matched here, over every run."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    order = ["attributes.start_time DESC"]
    for quote in ("'", '"'):
        if quote not in run_name:
            where = f"attributes.run_name = {quote}{run_name}{quote}"
            return list(client.search_runs(experiments, where, order_by=order, max_results=max_results))
    found, token = [], None
    while True:
        page = client.search_runs(experiments, order_by=order, max_results=1000, page_token=token)
        found += [run for run in page if run.info.run_name == run_name]
        token = page.token
        if not token or len(found) >= max_results:
            return found[:max_results]


def record_hardware(run_id: str, nodes: int, cpus: float, gpus: float, gpu_kind: str) -> None:
    """The cluster an attempt ran on (a resumed run records the latest one)."""
    tags = {"hardware.nodes": str(nodes), "hardware.cpus": f"{cpus:g}", "hardware.gpus": f"{gpus:g}"}
    if gpu_kind:
        tags["hardware.gpu"] = gpu_kind
    client = MlflowClient(tracking_uri())
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def record_changes(run_id: str, changes: dict[str, tuple], step: int) -> None:
    """Records settings changed on a resume (`key -> (was, now)`, from global `step` on): MLflow
    keeps a run's params as first logged, so the changes go to `job/changed-at-step-<step>.json`
    and the tag `settings_changed` (the keys, at each step, oldest first)."""
    client = MlflowClient(tracking_uri())
    changed = {key: {"was": was, "now": now} for key, (was, now) in changes.items()}
    client.log_dict(run_id, {"step": step, "changed": changed}, f"job/changed-at-step-{step}.json")
    earlier = client.get_run(run_id).data.tags.get("settings_changed")
    entry = f"step {step}: {', '.join(changes)}"
    client.set_tag(run_id, "settings_changed", f"{earlier}; {entry}" if earlier else entry)


def record_error(run_id: str, text: str) -> None:
    """What a failed run raised, whole, as the artifact `error.txt`; a tracking server that
    cannot take it is passed by (the run's end says what else failed)."""
    with contextlib.suppress(MlflowException, OSError), bounded_retries():
        MlflowClient(tracking_uri()).log_text(run_id, text, "error.txt")


@contextlib.contextmanager
def bounded_retries(retries: int = 2):
    """In this block MLflow's client retries a failing request `retries` times (after 2 s, then
    4 s) instead of its default 7 (about 2 minutes a request): the end of a run makes tens of
    requests, and a server that is down must cost minutes, not an hour. A user's own
    MLFLOW_HTTP_REQUEST_MAX_RETRIES wins."""
    key = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
    if key in os.environ:
        yield
        return
    os.environ[key] = str(retries)
    try:
        yield
    finally:
        os.environ.pop(key, None)


def unanswered(wait_s: float, every_s: float = 5.0) -> str | None:
    """None once the tracking server answers, tried every `every_s` for up to `wait_s`; else what
    it last said (one line)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with bounded_retries(0):
                MlflowClient(tracking_uri()).search_experiments(max_results=1)
            return None
        except (MlflowException, OSError) as e:
            said = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if time.monotonic() + every_s > deadline:
            return f"MLflow ({tracking_uri()}) did not answer for {wait_s:.0f} s: {said}"
        time.sleep(every_s)


def close_run(
    run_id: str, succeeded: bool, interrupted: bool = False, tags: dict[str, str] | None = None
) -> None:
    """Ends the run FINISHED or FAILED; KILLED when the user `interrupted` it (Ctrl-C); sets
    `tags` first.

    Raises:
        TrackingError: MLflow could not be reached or refused; the run stays as it was.
    """
    status = RunStatus.KILLED if interrupted else RunStatus.FINISHED if succeeded else RunStatus.FAILED
    client = MlflowClient(tracking_uri())
    try:
        for key, value in (tags or {}).items():
            client.set_tag(run_id, key, value)
        client.set_terminated(run_id, status=RunStatus.to_string(status))
    except (MlflowException, OSError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrackingError(
            f"MLflow ({tracking_uri()}) could not be told that run {run_id} ended "
            f"{RunStatus.to_string(status)}: {first_line}"
        ) from e


class RunLogger:
    """Logs into one existing run; used by rank 0 only.

    Metrics go through a queue to a background thread, so a slow or unreachable tracking server
    never holds up training: while it is down they wait in memory (a warning says so once) and
    are sent when it answers again. `close` waits a little for the rest, and writes what is
    still unsent to a file that `resnet-pipe runs sync` sends later.
    """

    def __init__(self, uri: str, run_id: str, unsent_file: Location | None = None, retry_s: float = RETRY_S):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # this thread retries, not each call
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(REQUEST_TIMEOUT_S))
        self.client = MlflowClient(uri)
        self.run_id = run_id
        self._unsent_file, self._retry_s = unsent_file, retry_s
        self._logged_up_to: dict[str, int] = {}
        self._queue: list[Metric] = []
        self._wake = threading.Condition()
        self._closing, self._deadline = False, 0.0
        self._sender = threading.Thread(target=self._send, name="resnet-pipe-tracking", daemon=True)
        self._sender.start()

    def skip_logged(self) -> None:
        """From now on, leaves out what the run already holds at a step: a run restarted from a
        checkpoint goes over steps an earlier attempt logged (after the checkpoint it restarts
        from), and each step of each metric stays in MLflow once."""
        try:
            for key in self.client.get_run(self.run_id).data.metrics:
                steps = [m.step for m in self.client.get_metric_history(self.run_id, key)]
                self._logged_up_to[key] = max(steps, default=-1)
        except Exception as e:  # noqa: BLE001 - any tracking failure: train on, say so
            log.warning(
                f"warning: could not read the run's logged steps from MLflow ({e}); "
                "steps logged before the restart may appear twice"
            )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if step > self._logged_up_to.get(key, -1)
        ]
        with self._wake:
            self._queue.extend(batch)
            self._wake.notify()

    def close(self, timeout_s: float = 60.0) -> int:
        """Waits up to `timeout_s` for the queue to drain; returns how many metrics are left,
        written to the unsent file."""
        with self._wake:
            self._closing, self._deadline = True, time.monotonic() + timeout_s
            self._wake.notify()
        self._sender.join(timeout_s + REQUEST_TIMEOUT_S + 5)  # the thread gives up by the deadline
        with self._wake:
            left, self._queue = self._queue, []
        if left and self._unsent_file is not None:
            earlier = self._unsent_file.read_text() if self._unsent_file.is_file() else ""
            records = [dict(key=m.key, value=m.value, timestamp=m.timestamp, step=m.step) for m in left]
            self._unsent_file.write_text(earlier + "".join(json.dumps(r) + "\n" for r in records))
            run_dir = self._unsent_file.uri.rsplit("/", 1)[0]
            log.warning(
                f"warning: {len(left)} metrics could not reach MLflow; they are in {self._unsent_file}: "
                f"`resnet-pipe runs sync {run_dir}` sends them"
            )
        return len(left)

    def _send(self) -> None:
        failing = False
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return
                batch = self._queue[:MAX_BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as e:  # noqa: BLE001 - any tracking failure: keep the metrics, retry
                if not failing:
                    log.warning(
                        f"warning: MLflow is unreachable ({type(e).__name__}); training goes on and "
                        "metrics wait in memory until it answers"
                    )
                failing = True
                if self._closing and time.monotonic() >= self._deadline:
                    return
                time.sleep(self._retry_s)
                continue
            with self._wake:
                del self._queue[: len(batch)]
            if failing:
                log.warning("MLflow answers again: the waiting metrics are being sent")
                failing = False


def sync_unsent(run_dir: Location) -> int:
    """Sends the metrics a run's rank 0 could not (its UNSENT_FILE) to the run; returns how many.
    The file is renamed once they are in."""
    unsent = run_dir / UNSENT_FILE
    if not unsent.is_file():
        return 0
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    metrics = [Metric(**json.loads(line)) for line in unsent.read_text().splitlines() if line.strip()]
    client = MlflowClient(tracking_uri())
    for first in range(0, len(metrics), MAX_BATCH):
        client.log_batch(run_id, metrics=metrics[first : first + MAX_BATCH])
    (run_dir / UNSENT_FILE.replace(".jsonl", ".sent")).write_text(unsent.read_text())
    unsent.delete()
    return len(metrics)
