"""Starting and stopping the Serve application on Ray (a local Ray of our own, or a cluster).

url = start(Settings(model="resnet50@champion"), host="127.0.0.1", port=8000)
stop()
"""

from __future__ import annotations

import socket
from dataclasses import replace

from pipeline.cluster.address import cluster_address, is_job_server
from pipeline.serve.client import ServeError
from pipeline.serve.settings import APP_NAME, Settings, build_app


def start(
    settings: Settings,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    log_to_driver: bool = True,
) -> str:
    """Deploys the app on Ray Serve (a local Ray unless `address`), answering on host:port;
    returns its URL once every replica has loaded the model."""
    from ray import serve

    from pipeline.cluster.launch import connect

    address = check_address(cluster_address(address))
    if address is None:  # a Ray of our own: the port is on this machine
        check_port_free(host, port)
    connect(address, log_to_driver)  # deploy shows Serve's lines; a benchmark, only its table
    serve.start(http_options={"host": host, "port": port})
    run(settings)
    return f"http://{host}:{port}"


def run(settings: Settings) -> None:
    """(Re)deploys the app on the Serve that `start` started, at the same address: a new
    setting replaces the replicas once the new ones have loaded."""
    from ray import serve

    from pipeline import tracking

    settings = replace(
        settings,
        tracking_uri=settings.tracking_uri or tracking.tracking_uri(),
        tracking_env=tracking.credentials(),
    )
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")


def check_address(address: str | None) -> str | None:
    """`address` if deploy can join it; raises ServeError for a job server's (http://HEAD:8265)."""
    if is_job_server(address):
        raise ServeError(
            f"{address} is a job server (the Ray dashboard), which deploy cannot join: give the cluster's "
            "Ray address (ray://HEAD:10001 from another machine, or `auto` on a node of the cluster), "
            f"or deploy its Serve config: serve deploy deploy/serve-config.yaml --address {address}"
        )
    return address


def stop(address: str | None = None) -> None:
    """Takes the app down; on a Ray of our own, all of Serve, so that its HAProxy stops too
    (HAProxy outlives a Ray that dies under it, still holding the port)."""
    from ray import serve

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
