"""Starting the Serve application (deploy/serve_app.py) and talking to it over HTTP.

url = start(Settings(model="resnet50@champion"), host="127.0.0.1", port=8000)
answer = predict_file(url, Path("cat.jpg"))     # {"model", "version", "predictions": [...]}
"""

from __future__ import annotations

import importlib
import json
import mimetypes
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

APP_NAME = "resnet-pipe"
# the application's builder, named the way deploy/serve-config.yaml names it: the library does
# not import deploy/, the app imports the library
APP_IMPORT_PATH = "deploy.serve_app:app"
TOKEN_ENV = "RESNET_PIPE_SERVE_TOKEN"  # set: requests need "Authorization: Bearer <token>"


@dataclass(frozen=True)
class Settings:
    """How the app serves; `resnet-pipe deploy` flags and the `args` of deploy/serve-config.yaml
    set them."""

    model: str | None = None  # MODEL@ALIAS, MODEL, MODEL/VERSION or a run; None: newest champion
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else ./mlflow.db
    tracking_env: dict = field(default_factory=dict)  # MLflow credentials for the replicas
    replicas: int | str = 1  # a number, or "auto": autoscaling between min and max_replicas
    max_replicas: int = 4
    cpus_per_replica: float = 2.0  # also the replica's torch threads
    gpus_per_replica: float = 0.0
    max_batch_size: int = 8
    batch_wait_ms: float = 20.0  # how long a batch waits to fill
    compile: bool = True  # torch.compile each version's forward pass as it loads (Loaded.compile)
    max_ongoing_requests: int = 32  # per replica; beyond it requests queue ...
    max_queued_requests: int = 64  # ... and beyond this the proxy answers 503 at once
    max_body_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    top_k: int = 5
    reload_check_s: float = 2.0  # how often the followed alias is looked up


def build_app(settings: Settings):
    """The Serve application of APP_IMPORT_PATH for `settings`."""
    module, _, builder = APP_IMPORT_PATH.partition(":")
    return getattr(importlib.import_module(module), builder)(asdict(settings))


class ServeError(RuntimeError):
    """The server answered with an error (its JSON message), or could not be reached."""


def start(settings: Settings, host: str = "127.0.0.1", port: int = 8000, address: str | None = None) -> str:
    """Deploys the app on Ray Serve (a local Ray unless `address`), answering on host:port;
    returns its URL once every replica has loaded the model."""
    from ray import serve

    from pipeline import tracking
    from pipeline.launch import cluster_address, connect

    if cluster_address(address) is None:  # a Ray of our own: the port is on this machine
        check_port_free(host, port)
    connect(address)
    settings = replace(
        settings,
        tracking_uri=settings.tracking_uri or tracking.tracking_uri(),
        tracking_env=tracking.credentials(),
    )
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop(address: str | None = None) -> None:
    """Takes the app down; on a Ray of our own, all of Serve, so that its HAProxy stops too
    (HAProxy outlives a Ray that dies under it, still holding the port)."""
    from ray import serve

    from pipeline.launch import cluster_address

    if cluster_address(address) is None:
        serve.shutdown()
    else:
        serve.delete(APP_NAME)


def check_port_free(host: str, port: int) -> None:
    """Raises ServeError, naming what holds it where it can, unless host:port is free to listen on
    (as a server binds: with SO_REUSEADDR, so that the closed connections of a deployment just
    stopped, a minute in TIME_WAIT, do not count; a listener does)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return
        except OSError as e:
            problem = e.strerror or str(e)
    import psutil

    holder = ""
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
                holder = f" (by {psutil.Process(c.pid).name()}, pid {c.pid})"
                break
    except (psutil.Error, OSError):  # another user's process: its name stays unknown
        pass
    raise ServeError(
        f"cannot listen on {host}:{port}: {problem}{holder}. Choose another --port, or stop what "
        "holds it (an earlier `resnet-pipe deploy` that was killed leaves its HAProxy behind)"
    )


def post(url: str, body: bytes, content_type: str, timeout_s: float = 60.0) -> tuple[int, dict]:
    """POSTs `body`; returns the status and the JSON answer (errors included)."""
    headers = {"Content-Type": content_type}
    token = os.environ.get(TOKEN_ENV)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"error": text.decode(errors="replace") or e.reason}
    except OSError as e:
        raise ServeError(f"no answer from {url}: {e} (is `resnet-pipe deploy` running?)") from None


def predict_file(url: str, path: Path) -> dict:
    """One image file's answer from the server at `url`.

    Raises:
        ServeError: the server refused it (with its message) or is not there.
    """
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    status, answer = post(f"{url.rstrip('/')}/predict", path.read_bytes(), content_type)
    if status != 200:
        raise ServeError(f"{status}: {answer.get('error', answer)}")
    return answer


def wait_until_up(
    url: str, process: subprocess.Popen, log: Callable[[], str], timeout_s: float = 180
) -> None:
    """Waits until GET `url` answers 200 (a server `process` starting up).

    Raises:
        RuntimeError: the process ended or `timeout_s` passed first; with the end of its `log()`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            ended = f"exited with {process.returncode}" if process.poll() is not None else "no answer"
            raise RuntimeError(f"the server for {url} did not start ({ended}): {log()[-2000:]}")
        time.sleep(0.5)
