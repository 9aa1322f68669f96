"""Which Ray a command talks to, read without importing Ray (bad input fails before Ray starts).

cluster_address(None)                          # RAY_ADDRESS, else None: a Ray of our own
is_job_server("http://head:8265")              # True: the Job Submission API, not a Ray to join
"""

from __future__ import annotations

import os


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster a command uses: `address`, else RAY_ADDRESS; None: a Ray of our own,
    started on this machine."""
    return address or os.environ.get("RAY_ADDRESS")


def is_job_server(address: str | None) -> bool:
    """An http(s) address: a cluster's dashboard and job server (`submit` goes through its Job
    Submission API; it is no address that `ray.init` joins)."""
    return address is not None and address.startswith(("http://", "https://"))
