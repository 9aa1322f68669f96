"""Cluster jobs through Ray's Job Submission API: `resnet-pipe submit JOB --address http://HEAD:8265`,
and `list`, `status`, `logs`, `stop`.

The project folder travels as the job's working directory (without .venv, data and runs), and
the job's entrypoint is `python -m pipeline.cli submit ...` on the cluster, whose Python must
have resnet-pipe's dependencies (`deploy/Dockerfile`). Checkpoints must outlive the job's
temporary working directory, so a remote run needs a `run.storage_path` that all nodes reach (an
object store, s3://..., or an absolute path all nodes mount), and it tracks to the MLflow server
of MLFLOW_TRACKING_URI (checked by the CLI before it submits). The nodes reach the object store
with their own credentials (a Kubernetes Secret, an instance profile), never the submitter's.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

from pipeline.cluster.address import ClusterError, cluster_address, unanswered
from pipeline.config import Job
from pipeline.storage import is_remote

PROJECT = Path(__file__).resolve().parents[2]
# gitignore patterns, anchored at the project's root where a folder of ours has the same name
# (a bare "data" also left out pipeline/data: the nodes of a cluster had no `pipeline.data`)
EXCLUDES = [
    "/.venv",
    "/data",
    "/runs",
    "/mlartifacts",
    "/mlruns",
    "*.db",
    ".git",
    ".pytest_cache",
    ".ruff_cache",
]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def client(address: str | None) -> JobSubmissionClient:
    address = cluster_address(address) or DEFAULT_ADDRESS
    try:
        return JobSubmissionClient(address, headers=_auth_headers())
    except ConnectionError as e:  # Ray's own ConnectionError, raised when the address does not answer
        raise unanswered("the job server", address) from e


def _auth_headers() -> dict[str, str] | None:
    """Ray's token authentication (on by default for clusters since Ray 2.59): the token from
    RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, as Ray itself looks."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else None


def check_storage(job: Job) -> str:
    """The storage path a remote run will use; raises ClusterError when nodes cannot share it."""
    path = job.run.storage_path
    if is_remote(path):
        return path
    if not Path(path).is_absolute():
        raise ClusterError(
            f"run.storage_path '{path}' is relative: on a cluster it would land in the job's temporary "
            f"folder; give a folder all nodes mount, or s3://..., with --set run.storage_path=..."
        )
    if not Path(path).is_dir() or not os.access(path, os.W_OK):
        raise ClusterError(
            f"run.storage_path {path} is not a writable folder here; create it on the shared mount"
        )
    return path


AGENT_WAIT_S = 60  # how long a submission waits for a freshly started head's job agent


def submit_remote(address: str, job_name: str, overrides: tuple[str, ...], flags: list[str], job: Job) -> str:
    """Submits `resnet-pipe submit JOB --set ... FLAGS` as a Ray job; returns its submission id.
    `flags`: `--name RUN`, or `--resume RUN` (and `--allow-changes`)."""
    check_storage(job)
    words = ["python", "-m", "pipeline.cli", "submit", job_name, *flags]
    for item in overrides:
        words += ["--set", item]
    submitter = client(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return submitter.submit_job(
                entrypoint=shlex.join(words),
                submission_id=None,
                runtime_env={
                    "working_dir": str(PROJECT),
                    "excludes": EXCLUDES,
                    "env_vars": {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]},
                },
                # what `status`, `logs --follow` and a second `submit` of the run find it by
                metadata={"job": job_name, "run": flags[1], "storage_path": job.run.storage_path},
            )
        except RuntimeError as e:
            # a head that has just started answers before its job agent is up: "try again later"
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def running_job(address: str | None, run_name: str) -> str | None:
    """The submission id of a job of the cluster that is training run `run_name` now (pending or
    running), or None."""
    live = {JobStatus.PENDING, JobStatus.RUNNING}
    for info in client(address).list_jobs():
        if info.status in live and (info.metadata or {}).get("run") == run_name:
            return info.submission_id
    return None


def follow(address: str | None, submission_id: str) -> Iterator[str]:
    """The job's log lines as they come, until it ends."""
    logs = client(address).tail_job_logs(submission_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(logs.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def status(address: str | None, submission_id: str) -> JobStatus:
    return client(address).get_job_status(submission_id)
