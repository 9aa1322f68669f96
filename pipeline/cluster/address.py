"""Which Ray a command talks to, and whether that cluster can track, read without importing Ray
or MLflow (bad input fails before anything starts).

cluster_address(None)                          # RAY_ADDRESS, else None: a Ray of our own
is_job_server("http://head:8265")              # True: the Job Submission API, not a Ray to join
tracking_server()                              # MLFLOW_TRACKING_URI, checked: a server that answers
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request


class ClusterError(ValueError):
    """A cluster that cannot be used as asked (a remote submission that cannot work, an address
    that does not answer), with what to do about it."""


def unanswered(what: str, address: str) -> ClusterError:
    """The error for `what` (the job server, the cluster) at `address` when nothing answers there."""
    return ClusterError(
        f"{what} at {address} does not answer: start the cluster (ray start --head, or "
        "`kubectl get raycluster`), or give its address with --address / RAY_ADDRESS"
    )


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster a command uses: `address`, else RAY_ADDRESS; None: a Ray of our own,
    started on this machine."""
    return address or os.environ.get("RAY_ADDRESS")


def is_job_server(address: str | None) -> bool:
    """An http(s) address: a cluster's dashboard and job server (`submit` goes through its Job
    Submission API; it is no address that `ray.init` joins)."""
    return address is not None and address.startswith(("http://", "https://"))


class NoTrackingServer(ValueError):
    """A cluster run without an MLflow tracking server that its nodes reach over HTTP."""


def tracking_server(timeout_s: float = 10.0) -> str:
    """MLFLOW_TRACKING_URI, when it names an MLflow server that answers its /health check.

    On one machine runs track to a SQLite file and a local folder; on a cluster that file would be
    one node's own, and through the Job Submission API the artifacts (the weights, the registered
    model) would land in the job's temporary folder and vanish with it.

    Raises:
        NoTrackingServer: unset, not http(s), or not answering; with what to do.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    advice = (
        "a run on a cluster tracks to an MLflow server that every node reaches: set MLFLOW_TRACKING_URI="
        "http://HOST:5000 (see docs/deployment.md: `mlflow server` with a database and "
        "--artifacts-destination s3://...)"
    )
    if not uri.startswith(("http://", "https://")):
        found = f"MLFLOW_TRACKING_URI is '{uri}'" if uri else "MLFLOW_TRACKING_URI is not set"
        raise NoTrackingServer(f"{found}; {advice}")
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as answer:
            answer.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise NoTrackingServer(
            f"the MLflow server at MLFLOW_TRACKING_URI={uri} does not answer ({reason}); {advice}"
        ) from e
    return uri
