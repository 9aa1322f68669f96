"""Whether a cluster can hold a job, checked before anything is submitted.

Ray Train places a run's workers as a placement group and waits, silently and without end, until
the cluster has room for all of them (at least `scaling.min_workers` of an elastic run). A worker
that asks for more than any node has, or more workers than the nodes hold, waits for ever on a
cluster that cannot grow: the embedded local Ray, or a cluster with no autoscaler. So `submit`
and `study` compare the ask with the nodes first:

    nodes = local_nodes()                   # or cluster_nodes() once connected
    problem = shortfall([job], nodes)       # None: it fits; else what is missing, and the settings that fit
    wait_for_room([job], timeout_s=600, say=print)   # a cluster with an autoscaler: wait, bounded

A node is a dict of Ray resources ("CPU", "GPU", "memory" in bytes) as `ray.nodes()` gives them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence

from pipeline.config import Job

Node = dict[str, float]
POLL_S = 2.0  # how often a wait looks at the cluster again


class NoRoom(RuntimeError):
    """The cluster cannot hold the job: what it asks, what is there, and the settings that fit."""


def worker_ask(job: Job) -> Node:
    """The Ray resources of one of `job`'s workers."""
    ask = {"CPU": float(job.scaling.cpus_per_worker)}
    if job.scaling.use_gpu:
        ask["GPU"] = 1.0
    if job.scaling.memory_per_worker_gb:
        ask["memory"] = job.scaling.memory_per_worker_gb * 2**30
    return ask


def workers_needed(job: Job) -> int:
    """The workers a run cannot start without: all of them, or `min_workers` of an elastic run."""
    return job.scaling.min_workers or job.scaling.num_workers


def holds(nodes: Sequence[Node], ask: Node) -> int:
    """How many workers of `ask` the nodes hold at once (a worker lives on one node)."""
    return int(sum(min(node.get(key, 0.0) // need for key, need in ask.items()) for node in nodes))


def shortfall(jobs: Sequence[Job], nodes: Sequence[Node], where: str = "the cluster") -> str | None:
    """Why the nodes (of `where`) can never hold one of `jobs` (each on its own: a study runs the
    rest after it), with the settings that would fit; None when each fits."""
    for job in jobs:
        ask, needed = worker_ask(job), workers_needed(job)
        if holds(nodes, ask) >= needed:
            continue
        each = " each" if needed > 1 else ""
        have = "; ".join(_amounts(node, ask) for node in nodes)
        return (
            f"job '{job.name}' asks for {needed} worker{'s' * (needed > 1)} with {_amounts(ask, ask)}{each}, "
            f"and {where} ({have or 'no live node'}) can never hold {'them' if needed > 1 else 'it'}: "
            f"add {_advice(job, nodes)}"
        )
    return None


def _amounts(node: Node, keys: Node) -> str:
    """`{"CPU": 4, "GPU": 1}` as "4 CPUs and 1 GPU", in the keys of `keys`."""
    parts = []
    for key in keys:
        value = node.get(key, 0.0)
        parts.append(
            f"{value / 2**30:.1f} GiB of memory"
            if key == "memory"
            else f"{value:g} {key}{'s' * (value != 1)}"
        )
    return " and ".join(parts)


def _advice(job: Job, nodes: Sequence[Node]) -> str:
    """The settings that make `job` fit on `nodes`, as --set flags."""
    ask, needed, flags = worker_ask(job), workers_needed(job), []
    if "GPU" in ask and not any(node.get("GPU", 0.0) for node in nodes):
        flags.append("scaling.use_gpu=false")
        del ask["GPU"]
    if "memory" in ask and holds(nodes, ask) < needed:
        most = max((node.get("memory", 0.0) for node in nodes), default=0.0)
        flags.append(f"scaling.memory_per_worker_gb={most / 2**30 // max(needed, 1):g}")
        del ask["memory"]
    cpus = next((c for c in range(int(ask["CPU"]), 0, -1) if holds(nodes, ask | {"CPU": c}) >= needed), None)
    if cpus is not None:
        if cpus != job.scaling.cpus_per_worker:
            flags.append(f"scaling.cpus_per_worker={cpus}")
    else:  # fewer workers at one CPU each, the global batch kept where it splits evenly
        fit = max(holds(nodes, ask | {"CPU": 1.0}), 1)
        flags += [f"scaling.num_workers={fit}", "scaling.cpus_per_worker=1"]
        if job.global_batch_size % fit == 0:
            per = job.global_batch_size // fit // job.optim.accumulation_steps
            flags.append(f"scaling.batch_size_per_worker={per}")
        if job.scaling.min_workers:
            flags.append("scaling.min_workers=0")
    return " ".join(f"--set {flag}" for flag in flags)


def local_nodes() -> list[Node]:
    """This machine as the Ray that `submit` starts would see it, read without starting Ray: its
    usable CPUs, its CUDA devices, its memory."""
    import psutil
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return [{"CPU": float(cpus), "GPU": float(torch.cuda.device_count()),
             "memory": float(psutil.virtual_memory().total)}]  # fmt: skip


def cluster_nodes() -> list[Node]:
    """The total resources of each live node of the Ray this process is connected to."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]


def can_grow(setting: str = "auto") -> bool:
    """Whether the connected cluster may add nodes: `scaling.cluster_grows` says so ("yes",
    "no"), or with "auto", Ray's autoscaler (v1) says so in its report (`__autoscaling_status`).
    A cluster of `ray start` nodes runs the same monitor over a read-only provider, which names
    each node's type after the node's own id; an autoscaler with node types to launch names them
    from its config ("ray.worker.gpu", a KubeRay worker group). Ray's autoscaler v2 cannot be
    told apart from outside: on such a cluster set scaling.cluster_grows = "yes"."""
    if setting != "auto":
        return setting == "yes"
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = json.loads(status).get("autoscaler_report") if status else None
    if not report:
        return False
    types = report.get("node_type_mapping") or {}
    return any(node != kind for node, kind in types.items())


def wait_for_room(jobs: Sequence[Job], timeout_s: float, say: Callable[[str], None]) -> None:
    """On a connected cluster: returns when it holds each of `jobs`; where it cannot and will not
    grow, raises NoRoom at once; where an autoscaler may add nodes, asks it for them, says once
    what the jobs wait for, and raises NoRoom after `timeout_s`."""
    problem = shortfall(jobs, cluster_nodes())
    if problem is None:
        return
    if not can_grow(jobs[0].scaling.cluster_grows):
        where = "the cluster, which has no autoscaler to add nodes (scaling.cluster_grows=yes if it has)"
        raise NoRoom(shortfall(jobs, cluster_nodes(), where))
    from ray.autoscaler.sdk import request_resources

    bundles = [worker_ask(job) for job in jobs for _ in range(workers_needed(job))]
    request_resources(bundles=[{k: v for k, v in b.items() if k != "memory"} for b in bundles])
    say(f"waiting up to {timeout_s:g} s (scaling.wait_for_room_s) for the autoscaler: {problem}")
    deadline = time.monotonic() + timeout_s
    try:
        while (problem := shortfall(jobs, cluster_nodes())) is not None:
            if time.monotonic() > deadline:
                raise NoRoom(f"gave up after {timeout_s:g} s (scaling.wait_for_room_s): {problem}")
            time.sleep(POLL_S)
    finally:
        request_resources(bundles=[])  # the run's own placement keeps what it uses
