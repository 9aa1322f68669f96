"""`resnet-pipe bench serve`: the Serve deployment in each runtime and precision against
`mlflow models serve` on the same model and cores, each with its own batched forward pass as its
ceiling, and PyTorch's raw eager fp32 forward pass as the common one.

The model is a registered version: MODEL@ALIAS or MODEL/VERSION from the user's store, or by
default a freshly initialised ResNet-50 registered in a temporary store with imagenet-r50's
evaluation transform (resize 256, center crop 224), so that the figures are the 224 px ones.
Both servers get the same JPEGs, one image per request, from `clients` concurrent clients on
loopback for `seconds` after a warm-up; requests/s counts answered requests (status 200). The
deployment's health endpoint, driven the same way, shows what the serving path alone allows.
The ceiling runs in two halves, one before the servers and one after the deployment, and
counts their mean: a shared machine's speed drifts within minutes (on the developers' 2-core VM
an empty GET went from 2,000 to 830 requests/s in ten minutes), and a ceiling measured only
before would judge the servers by the machine of another moment.
Each runtime and precision (`pipeline.serve.runtimes`: PyTorch fp32 and bf16, ONNX Runtime fp32
and int8) gets its bare forward pass (its ceiling, and its top-1 on the photos against fp32's),
then a deployment answering `/predict` and the Open Inference Protocol's binary requests.
On a machine with a GPU the same command serves on it (the replica, both forward passes and
MLflow's model); there the batch size decides the throughput: give `clients` at least twice it.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.bench.process import in_worker_process
from pipeline.data.layouts import IMAGE_SUFFIXES
from pipeline.system import free_port
from pipeline.tracking import tracking_at, tracking_uri

# (runtime, precision): every way a replica runs on a CPU; on a GPU the same code (docs/benchmarks.md)
KINDS = (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"))


@dataclass(frozen=True)
class Row:
    name: str
    per_s: float  # requests/s (images/s for a forward pass)
    p50_ms: float | None = None
    p99_ms: float | None = None
    failed: int = 0
    against_ceiling: bool = True  # False: a measure of the serving path, not of serving the model
    kind: tuple[str, str] | None = None  # (runtime, precision) of a forward pass or a replica
    ceiling: bool = False  # a bare forward pass
    agreement: float | None = None  # a forward pass's top-1 on the photos, against PyTorch fp32's
    top1: tuple[int, ...] = ()  # a forward pass's class per photo


def drive(send: Callable[[bytes], int], images: list[bytes], clients: int, seconds: float) -> Row:
    """`clients` threads each send one image at a time for `seconds` (after 2 requests each of
    warm-up); returns requests/s and latency percentiles of the answered ones."""
    latencies: list[float] = []
    failed = [0]
    lock = threading.Lock()
    start_gate = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(k: int) -> None:
        for i in range(2):
            send(images[(k + i) % len(images)])
        start_gate.wait()
        i = 0
        while time.perf_counter() < deadline[0]:
            began = time.perf_counter()
            status = send(images[(k * 7 + i) % len(images)])
            took = time.perf_counter() - began
            with lock:
                if status == 200:
                    latencies.append(took)
                else:
                    failed[0] += 1
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + 3600  # until every client is warm
    start_gate.wait()
    began = time.perf_counter()
    deadline[0] = began + seconds
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return Row("", len(latencies) / elapsed, 1000 * quantiles[49], 1000 * quantiles[98], failed[0])


class _Connections:
    """Requests over one kept-alive HTTP/1.1 connection per client thread, as load generators
    (wrk, hey, locust) do: a new TCP connection per request would cost the server and the
    clients, on the same cores, more than the request itself."""

    def __init__(self, url: str, content_type: str | None = None):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path
        self.headers = {"Content-Type": content_type} if content_type else {}
        self.local = threading.local()

    def post(self, body: bytes, headers: dict | None = None) -> int:
        return self._request("POST", body, headers)

    def get(self, _image: bytes) -> int:
        """A GET of the URL, called the way `drive` calls `post` (with an image, not sent)."""
        return self._request("GET", None)

    def _request(self, method: str, body: bytes | None, headers: dict | None = None) -> int:
        """The answer's status (0: no answer)."""
        for _ in range(2):  # a connection the server closed meanwhile: once more on a new one
            connection = getattr(self.local, "connection", None)
            if connection is None:
                connection = self.local.connection = http.client.HTTPConnection(
                    self.host, self.port, timeout=120
                )
            try:
                connection.request(method, self.path, body, self.headers | (headers or {}))
                answer = connection.getresponse()
                answer.read()
                if answer.will_close:
                    connection.close()
                    self.local.connection = None
                return answer.status
            except (OSError, http.client.HTTPException):
                connection.close()
                self.local.connection = None
        return 0


def _bench_model(root: Path) -> str:
    """Registers a freshly initialised ResNet-50 (imagenet-r50's evaluation transform, the
    classes of the dataset at `root`) in the current tracking store; returns MODEL/VERSION."""
    from pipeline import tracking
    from pipeline.config import load_job
    from pipeline.data.index import load_index
    from pipeline.models import create_model
    from pipeline.storage import Location
    from pipeline.tracking import registry

    index = load_index(root)
    job = load_job("imagenet-r50", [f"data.root='{root.resolve()}'", "scaling.num_workers=1"])
    run_dir = Location(Path.cwd() / "runs" / "bench-serve")
    run_id = tracking.open_run(job, "bench-serve", run_dir, index.dataset_hash)
    model = create_model(job.model.arch, num_classes=len(index.classes))
    state = {"model": model.state_dict(), "metrics": {"val/top1": 0.0}}  # a checkpoint's, as far as needed
    version = registry.register(run_id, state, "none: freshly initialised", job, index)
    tracking.close_run(run_id, succeeded=True)
    return f"{version.name}/{version.version}"


def _device() -> torch.device:
    """Where the replica serves: its GPU when there is one (`resnet-pipe deploy`'s default)."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _forward_pass(
    model: str, images: list[bytes], batch: int, seconds: float, raw: bool, kind: tuple[str, str] = KINDS[0]
) -> Row:
    """The model's batched forward pass over already-preprocessed images, all cores (or the
    GPU): `raw`, PyTorch eager fp32 in its default memory format (the common ceiling); else as a
    replica of `kind` runs it (PyTorch in the job's memory format, compiled; or ONNX Runtime's
    graph of that precision). Also its class for each photo."""
    from pipeline.serve.inference import Loaded, Preprocess

    name, _, version = model.partition("/")
    device = _device()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    runtime, precision = kind
    loaded = Loaded.from_registry(
        name, version, device, raw=raw, runtime=runtime, precision=precision, threads=threads
    )  # fmt: skip
    compiled = not raw and loaded.compile(batch, threads)
    preprocess = Preprocess(loaded.job, batch, device, threads, loaded.mean_image)
    inputs = preprocess((images * batch)[:batch])
    with torch.inference_mode():
        top1 = [
            c for i in range(0, len(images), batch)
            for c in loaded.probabilities(preprocess(images[i : i + batch])).argmax(1).tolist()
        ]  # fmt: skip
        loaded.probabilities(inputs)  # warm-up
        done, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            loaded.probabilities(inputs)
            done += batch
    if raw:
        label = "PyTorch fp32 eager, raw forward pass (common ceiling)"
    else:
        traits = [t for t, on in (("channels_last", loaded.channels_last), ("compiled", compiled)) if on]
        how = f" ({', '.join(traits)})" if runtime == "torch" else ""
        label = f"{_kind_name(kind)}{how}: bare forward pass"
    rate = done / (time.perf_counter() - began)
    return Row(f"{label}, batch {batch}", rate, kind=kind, ceiling=True, top1=tuple(top1))


def _kind_name(kind: tuple[str, str]) -> str:
    return f"{'ONNX Runtime' if kind[0] == 'onnxruntime' else 'PyTorch'} {kind[1]}"


def _v2_bodies(images: list[bytes]) -> dict[bytes, tuple[bytes, dict]]:
    """Each image as tritonclient sends it by default: the binary tensor extension both ways."""
    from pipeline.serve.protocols import HEADER_LENGTH

    bodies = {}
    for image in images:
        header = json.dumps({
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "parameters": {"binary_data_size": len(image) + 4}}],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }).encode()  # fmt: skip
        bodies[image] = (header + len(image).to_bytes(4, "little") + image, {HEADER_LENGTH: str(len(header))})
    return bodies


def _resnet_pipe(
    model: str, images: list[bytes], clients: int, seconds: float, batch: int, wait_ms: float,
    kinds: tuple[tuple[str, str], ...],
) -> list[Row]:  # fmt: skip
    """For each kind, a deployment answering images over /predict, then over the Open Inference
    Protocol (binary); then the last one's health endpoint, the same way: the requests/s that the
    proxy, the replica's web app and the clients alone allow on these cores."""
    import ray
    from ray import serve

    from pipeline.cluster import serving
    from pipeline.serve.settings import Settings

    cores = len(os.sched_getaffinity(0))
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # "Application ... is ready": not the bench's
    rows, bodies, url = [], _v2_bodies(images), None
    try:
        for kind in kinds:
            settings = Settings(
                model=model, cpus_per_replica=cores, gpus_per_replica=float(_device().type == "cuda"),
                max_batch_size=batch, batch_wait_ms=wait_ms, runtime=kind[0], precision=kind[1],
                max_ongoing_requests=4 * clients, max_queued_requests=4 * clients,
            )  # fmt: skip
            if url is None:
                url = serving.start(settings, port=free_port(), log_to_driver=False)  # not a line per request
            else:
                serving.run(settings)  # the same Serve and port, the new kind's replica
            name = model.partition("/")[0]
            predict = drive(_Connections(f"{url}/predict", "image/jpeg").post, images, clients, seconds)
            v2 = _Connections(f"{url}/v2/models/{name}/infer", "application/octet-stream")
            binary = drive(lambda image, v2=v2: v2.post(*bodies[image]), images, clients, seconds)
            for route, row in (("/predict", predict), ("v2 binary", binary)):
                rows.append(Row(
                    f"resnet-pipe deploy, {_kind_name(kind)}, {route} (batch {batch})", row.per_s,
                    row.p50_ms, row.p99_ms, row.failed, kind=kind,
                ))  # fmt: skip
        bare = drive(_Connections(f"{url}/health").get, images, clients, seconds)
    finally:
        serve.shutdown()
        ray.shutdown()
    rows.append(
        Row("its GET /health (no image, no model)", bare.per_s, bare.p50_ms, bare.p99_ms, bare.failed, False)
    )
    return rows


def _mlflow_serve(model: str, images: list[bytes], clients: int, seconds: float) -> Row:
    from pipeline.serve.client import wait_until_up

    port = free_port()
    log = tempfile.TemporaryFile()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{model}",
         "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # it runs `uvicorn` by name: this environment's, also when its bin/ is not on PATH
        env=os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/ping", server, lambda: _read_all(log))
        bodies = {
            image: json.dumps(
                {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]}}
            ).encode()
            for image in images
        }
        connections = _Connections(f"{url}/invocations", "application/json")
        row = drive(lambda body: connections.post(bodies[body]), images, clients, seconds)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
    return Row("mlflow models serve (1 worker)", row.per_s, row.p50_ms, row.p99_ms, row.failed)


def _read_all(file) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")


def bench_serve(
    root: Path,
    images_from: Path | None = None,
    model: str | None = None,
    seconds: float = 20.0,
    clients: int = 8,
    batch: int = 8,
    wait_ms: float = 20.0,
    kinds: tuple[tuple[str, str], ...] = KINDS,
) -> list[Row]:
    """The common ceiling (PyTorch's raw fp32 forward pass: the mean of half a run before
    everything else and half after the deployments), then each kind's bare forward pass, each
    kind's deployment over /predict and over v2 binary, the last deployment's health endpoint,
    and mlflow models serve. `root`: a prepared dataset (the bench model's classes, and int8's
    calibration images); `images_from`: the JPEGs to send (default: those of `root`)."""
    root = root.resolve()  # the bench works in a folder of its own
    images = images_to_send(images_from or root)
    with served_model(root, model) as model:
        _graphs(model, kinds, str(root))
        # The common ceiling in two halves, before and after the deployments, so that a machine
        # whose speed drifts during the bench moves the ceiling as it moves the servers.
        before = in_worker_process(_forward_pass, model, images, batch, seconds / 2, True)
        passes = [
            in_worker_process(_forward_pass, model, images, batch, seconds, False, kind) for kind in kinds
        ]
        served = _resnet_pipe(model, images, clients, seconds, batch, wait_ms, kinds)
        after = in_worker_process(_forward_pass, model, images, batch, seconds / 2, True)
        ceiling = Row(
            f"{before.name} (mean of {before.per_s:.2f} before, {after.per_s:.2f} after)",
            (before.per_s + after.per_s) / 2, ceiling=True, top1=before.top1,
        )  # fmt: skip
        passes = [
            Row(**{**p.__dict__, "agreement": sum(a == b for a, b in zip(p.top1, before.top1)) / len(images)})
            for p in passes
        ]
        rows = [ceiling, *passes, *served, _mlflow_serve(model, images, clients, seconds)]
    return rows


def images_to_send(folder: Path) -> list[bytes]:
    """The bytes of the first 64 images under `folder`, in name order; ValueError if none."""
    folder = folder.resolve()
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:64]
    if not files:
        raise ValueError(f"no images under {folder}")
    return [p.read_bytes() for p in files]


@contextlib.contextmanager
def served_model(root: Path, model: str | None) -> Iterator[str]:
    """MODEL/VERSION for a bench to serve, with the tracking store it is in made current: `model`
    (MODEL@ALIAS or MODEL/VERSION) fixed to its version in the user's store, or by default a
    freshly initialised one registered in a store of the bench's own, in a folder of its own,
    so that the user's runs and registry stay untouched."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as scope:
        if model is None:
            scope.enter_context(contextlib.chdir(tmp))
            scope.enter_context(tracking_at(f"sqlite:///{tmp}/mlflow.db"))
            yield _bench_model(root)
        else:
            scope.enter_context(tracking_at(tracking_uri()))  # the user's store, absolute
            yield _fixed_version(model)


def _graphs(model: str, kinds: tuple[tuple[str, str], ...], root: str) -> None:
    """The ONNX graphs the kinds need, exported (and int8 calibrated) before any timing."""
    from mlflow.tracking import MlflowClient

    from pipeline.serve import export

    name, _, version = model.partition("/")
    for runtime, precision in kinds:
        if runtime == "onnxruntime":
            found = MlflowClient(tracking_uri()).get_model_version(name, version)
            if export.URI_TAG.format(precision=precision) not in found.tags:
                export.export(model, precision, data_root=root, say=lambda _: None)


def ceiling_of(row: Row, rows: list[Row]) -> Row | None:
    """The bare forward pass of a replica's kind."""
    return next((r for r in rows[1:] if r.ceiling and r.kind == row.kind), None)


def _fixed_version(target: str) -> str:
    from pipeline.tracking import registry

    version, _ = registry.serving_version(target)
    return f"{version.name}/{version.version}"
