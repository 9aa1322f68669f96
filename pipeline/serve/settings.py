"""How the Serve app (deploy/serve_app.py) serves: `Settings`, set by `resnet-pipe deploy`'s
flags and by the `args` of deploy/serve-config.yaml, and the app's import path.

    app = build_app(Settings(model="resnet50@champion", replicas=2))
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field

APP_NAME = "resnet-pipe"
# the application's builder, named the way deploy/serve-config.yaml names it: the library does
# not import deploy/, the app imports the library
APP_IMPORT_PATH = "deploy.serve_app:app"


@dataclass(frozen=True)
class Settings:
    """How the app serves; `resnet-pipe deploy` flags and the `args` of deploy/serve-config.yaml
    set them."""

    model: str | None = None  # MODEL@ALIAS, MODEL, MODEL/VERSION or a run; None: newest champion
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else ./mlflow.db
    tracking_env: dict = field(default_factory=dict)  # MLflow credentials for the replicas
    replicas: int | str = 1  # a number, or "auto": autoscaling between min and max_replicas
    max_replicas: int = 4
    cpus_per_replica: float | None = None  # also the replica's torch threads; None: `replica_resources`
    gpus_per_replica: float | None = None  # None: 1 where the cluster has GPUs, else 0
    max_batch_size: int = 8
    batch_wait_ms: float = 20.0  # how long a batch waits to fill
    compile: bool = True  # torch.compile each version's forward pass as it loads (Loaded.compile)
    runtime: str = "auto"  # torch | onnxruntime | auto (pipeline.serve.runtimes.choose)
    precision: str = "fp32"  # bf16 (torch) | int8 (onnxruntime, a graph exported first)
    max_items: int = 64  # images or tensor rows in one /v2 or /invocations request
    max_ongoing_requests: int = 32  # per replica; beyond it requests queue ...
    max_queued_requests: int = 64  # ... and beyond this the proxy answers 503 at once
    max_body_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    top_k: int = 5
    reload_check_s: float = 2.0  # how often the followed alias is looked up
    # refuse to start unless RESNET_PIPE_SERVE_TOKEN is set (deploy/serve-config.yaml: on a
    # cluster the app listens beyond loopback)
    require_token: bool = False


def build_app(settings: Settings):
    """The Serve application of APP_IMPORT_PATH for `settings`."""
    module, _, builder = APP_IMPORT_PATH.partition(":")
    return getattr(importlib.import_module(module), builder)(asdict(settings))


def replica_resources(nodes: list[dict], cpus: float | None, gpus: float | None) -> tuple[float, float]:
    """The CPUs and GPUs of one replica, the ones not given (None) sized from the cluster's alive
    nodes (`ray.nodes()`), wherever the command runs: one GPU a replica where the cluster has
    GPUs, and the CPUs that come with one GPU on the largest such node (its CPUs over its GPUs);
    on a cluster without GPUs, all the CPUs of its largest node."""
    alive = [node["Resources"] for node in nodes if node.get("Alive")]
    if gpus is None:
        gpus = 1.0 if any(r.get("GPU", 0) >= 1 for r in alive) else 0.0
    if cpus is None:
        hosts = [r for r in alive if r.get("GPU", 0) >= gpus] if gpus else alive
        shares = [r.get("CPU", 0) / (r["GPU"] / gpus if gpus else 1) for r in hosts]
        cpus = float(max(1, int(max(shares, default=1))))
    return cpus, gpus
