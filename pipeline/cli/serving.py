"""`resnet-pipe promote`, `ui`, `deploy` and `predict`: from the registry to a served model."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
from pathlib import Path

import click

from pipeline.cli.common import fail, print_table

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
_terminated = threading.Event()  # set by a SIGTERM (`_interrupt`)


@click.command()
@click.argument("target", metavar="RUN | MODEL/VERSION | MODEL")
@click.option("--force", is_flag=True, help="Promote even when it does not beat the current champion.")
@click.option("--rollback", is_flag=True, help="Give MODEL's champion alias back to the previous version.")
def promote(target: str, force: bool, rollback: bool) -> None:
    """Move MODEL's `champion` alias to a run's registered version, only when it beats the
    current champion's val/top1 on the same dataset hash."""
    from pipeline.tracking import registry

    try:
        outcome = registry.rollback(target) if rollback else registry.promote(target, force=force)
    except registry.RegistryError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo(outcome.message)


@click.command()
@click.option("--port", default=5000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen address (loopback by default).")
def ui(port: int, host: str) -> None:
    """Start the MLflow UI over the local store (mlflow.db and mlartifacts/ here); with a tracking
    server in MLFLOW_TRACKING_URI, say where its UI is (it serves one itself)."""
    from pipeline.tracking import DEFAULT_ARTIFACTS, tracking_uri

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        click.echo(f"MLflow UI: {uri}  (the tracking server in MLFLOW_TRACKING_URI; nothing to start)")
        return
    command = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
        "--default-artifact-root", str(Path.cwd() / DEFAULT_ARTIFACTS), "--host", host, "--port", str(port),
    ]  # fmt: skip
    click.echo(f"MLflow UI: http://{host}:{port}  (store {uri}; Ctrl-C stops it)")
    try:
        sys.exit(subprocess.call(command))
    except KeyboardInterrupt:
        sys.exit(0)


@click.command()
@click.argument("target", required=False, metavar="[MODEL@ALIAS | MODEL/VERSION | RUN]")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), help="Default: MODEL-vVERSION[-int8].onnx here."
)
@click.option(
    "--opset", type=int, default=None, help="The ONNX opset (default: 18, read by every current runtime)."
)
@click.option(
    "--precision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
    help="int8: ONNX Runtime's static quantization, calibrated on training images, measured on val images.",
)  # fmt: skip
@click.option(
    "--data", "data_root", default=None, help="The model's dataset, where data.root is not it here."
)
@click.option(
    "--val-images", type=int, default=None, help="Measure int8 on this many validation images (default: all)."
)
def export(
    target: str | None, fmt: str, out: Path | None, opset: int | None, precision: str,
    data_root: str | None, val_images: int | None,
) -> None:  # fmt: skip
    """Export a registered version as an ONNX graph (dynamic batch, fp32 NCHW input, logits out),
    checked with ONNX Runtime against PyTorch on the model's validation images; logged to the
    version's run in MLflow's onnx flavor and named by the version's tags."""
    from pipeline.serve import export as exporting
    from pipeline.tracking import registry

    try:
        version, _ = registry.serving_version(target)
        suffix = "" if precision == "fp32" else f"-{precision}"
        out = out or Path(f"{version.name}-v{version.version}{suffix}.onnx")
        exported = exporting.export(
            f"{version.name}/{version.version}", precision, out, opset or exporting.OPSET, data_root,
            val_images, say=click.echo,
        )  # fmt: skip
    except (registry.RegistryError, exporting.ExportError) as e:
        fail(str(e))
    click.echo(
        f"exported {exported.name}/{exported.version} ({exported.precision}, opset {exported.opset}) to "
        f"{exported.path}; in the registry: {exported.uri}"
    )


@click.command()
@click.argument("target", required=False, metavar="[MODEL@ALIAS | MODEL/VERSION | RUN]")
@click.option(
    "--runtime", type=click.Choice(["auto", "torch", "onnxruntime"]), default="auto", show_default=True,
    help="auto: ONNX Runtime on a CPU (the faster exact one there), PyTorch on a GPU.",
)  # fmt: skip
@click.option(
    "--precision", type=click.Choice(["fp32", "bf16", "int8"]), default="fp32", show_default=True,
    help="bf16: PyTorch autocast; int8: ONNX Runtime, quantized. Measured against fp32 before serving.",
)  # fmt: skip
@click.option(
    "--max-accuracy-loss", type=float, default=0.5, show_default=True,
    help="Refuse a lower precision that loses more validation top-1 than this, in points.",
)  # fmt: skip
@click.option(
    "--data", "data_root", default=None, help="The model's dataset, where data.root is not it here."
)
@click.option("--replicas", default="1", show_default=True, help="A number, or 'auto' (autoscaling).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen address (loopback by default).")
@click.option("--port", default=8000, show_default=True)
@click.option("--max-batch-size", default=8, show_default=True, help="Images per batched forward pass.")
@click.option("--batch-wait-ms", default=20.0, show_default=True, help="How long a batch waits to fill.")
@click.option(
    "--compile/--no-compile", "compile_model", default=True, show_default=True,
    help="torch.compile each version's forward pass as it loads (faster; seconds per batch size).",
)  # fmt: skip
@click.option(
    "--cpus-per-replica", type=float, default=None,
    help="Default: the CPUs of one GPU on the cluster's largest GPU node; without GPUs, its largest node's.",
)  # fmt: skip
@click.option("--gpus-per-replica", type=float, default=None, help="Default: 1 where the cluster has GPUs.")
@click.option("--address", default=None, help="A Ray cluster to deploy on (default: a local Ray).")
def deploy(
    target: str | None,
    replicas: str,
    host: str,
    port: int,
    max_batch_size: int,
    batch_wait_ms: float,
    compile_model: bool,
    cpus_per_replica: float | None,
    gpus_per_replica: float | None,
    address: str | None,
    runtime: str,
    precision: str,
    max_accuracy_loss: float,
    data_root: str | None,
) -> None:
    """Serve a registered model over HTTP with Ray Serve (default: the champion of the most
    recently updated model); it follows the alias: a promotion or rollback switches versions.
    Set RESNET_PIPE_SERVE_TOKEN to require `Authorization: Bearer <token>`."""
    import torch

    from pipeline.cluster import serving
    from pipeline.cluster.address import ClusterError, cluster_address
    from pipeline.serve import export as exporting
    from pipeline.serve.client import ServeError
    from pipeline.serve.runtimes import RuntimeChoiceError, choose
    from pipeline.serve.settings import Settings
    from pipeline.tracking import registry

    if replicas != "auto" and not replicas.isdigit():
        fail(f"--replicas {replicas}: give a number of replicas or 'auto'")
    # A service manager (systemd, Kubernetes, `docker stop`) stops with SIGTERM: the same clean
    # stop as Ctrl-C at any point, starting or serving. Ray's own handlers would end it with
    # exit code 15 (while ray.init runs) or a stack trace and an abort (while replicas load).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        joining = cluster_address(address)  # None: a local Ray, the replicas on this machine
        serving.check_address(joining)  # before anything starts
        version, alias = registry.serving_version(target)
        # the replicas' device: a cluster's is known once it is joined, so there "auto" stays for the
        # replica to choose (an fp32 graph it lacks, it exports itself)
        gpu = gpus_per_replica > 0 if gpus_per_replica is not None else torch.cuda.is_available()
        here = joining is None
        if runtime != "auto" or precision != "fp32" or here:
            runtime, precision = choose(runtime, precision, torch.device("cuda" if gpu else "cpu"), here)
            exporting.ensure(version, runtime, precision, max_accuracy_loss, data_root, say=click.echo)
        settings = Settings(
            model=f"{version.name}@{alias}" if alias else f"{version.name}/{version.version}",
            replicas=replicas if replicas == "auto" else int(replicas),
            cpus_per_replica=cpus_per_replica,  # None: sized from the cluster's nodes (serve_app.app)
            gpus_per_replica=gpus_per_replica,
            max_batch_size=max_batch_size,
            batch_wait_ms=batch_wait_ms,
            compile=compile_model,
            runtime=runtime,
            precision=precision,
        )
        if _terminated.is_set():  # its KeyboardInterrupt swallowed (`_interrupt`): no Ray to start
            raise KeyboardInterrupt
        url = serving.start(settings, host, port, address)
    except (registry.RegistryError, ServeError, exporting.ExportError, RuntimeChoiceError, ClusterError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        _stop(address)
        return
    except SystemExit as e:  # Ray's SIGTERM handler, in place while ray.init() runs
        if e.code != signal.SIGTERM:
            raise
        _stop(address)
        return
    if _terminated.is_set():  # a SIGTERM whose KeyboardInterrupt Python swallowed (below)
        _stop(address)
        return
    following = f", following {version.name}@{alias}" if alias else ""
    click.echo(
        f"serving {version.name} version {version.version}{following} at {url} ({runtime}, {precision})"
    )
    click.echo(
        f"  POST {url}/predict (an image), {url}/predict/batch (a form), "
        f"{url}/v2/models/{version.name}/infer (Open Inference Protocol), {url}/invocations (MLflow); "
        f"API: {url}/docs; Ctrl-C or SIGTERM stops"
    )
    try:
        while not _terminated.wait(3600):
            pass
    except KeyboardInterrupt:
        pass
    _stop(address)


def _stop(address: str | None) -> None:
    from pipeline.cluster import serving

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the stop short
    ray = sys.modules.get("ray")  # not imported here: an import that the signal cut short fails again
    if ray is not None and ray.is_initialized():
        serving.stop(address)
    else:  # a start cut short inside ray.init(): Ray does not stop the processes it had started,
        _end_descendants()  # and its agents outlived the process (seen: a SIGTERM 8 s into a start)
    click.echo("stopped")


def _end_descendants() -> None:
    """Ends every process this one started, and theirs. As this process's subreaper (Linux),
    the children of a process that ends come to it instead of init, to be ended in the next
    round (the dashboard's modules, forked while it started)."""
    import ctypes

    import psutil

    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    for _ in range(5):
        processes = psutil.Process().children(recursive=True)
        if not processes:
            return
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(processes, timeout=5)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()


def _interrupt(signum: int, frame) -> None:
    """SIGTERM: cuts short what runs (a start), as Ctrl-C does. Raised in a finalizer or a weakref
    callback, Python prints the KeyboardInterrupt and goes on (seen: SQLAlchemy's, 2 s into a
    start), so the request also stays in `_terminated` for deploy to find."""
    _terminated.set()
    raise KeyboardInterrupt


@click.command()
@click.argument(
    "images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="The deployment's address.")
def predict(images: tuple[Path, ...], url: str) -> None:
    """Classify IMAGES with a running deployment; prints a table (exit 1 if any was refused)."""
    from pipeline.serve import client

    rows, failed = [("image", "class", "name", "probability", "model")], 0
    for path in images:
        try:
            answer = client.predict_file(url, path)
        except client.ServeError as e:
            rows.append((str(path), "-", f"error {e}", "-", "-"))
            failed += 1
            continue
        best = answer["predictions"][0]
        model = f"{answer['model']}/{answer['version']}"
        rows.append((str(path), best["wnid"], best["name"], f"{best['probability']:.4f}", model))
    print_table(rows)
    sys.exit(1 if failed else 0)
