"""The product on a cluster as users have it: a head and two worker nodes that share only the
network, an object store and an MLflow server (`share_nothing`), driven from a folder outside
the cluster by the `resnet-pipe` commands a user types."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from share_nothing import BUCKET, Cluster, Services, User, share_nothing

from pipeline.data.shards import first_image

# with the injected faults (`make test-faults`): the cluster's three nodes take both cores
pytestmark = [pytest.mark.ray, pytest.mark.faults]
EPOCHS, STEPS_PER_EPOCH = 3, 3  # 50 training images, global batch 16
KILL_AFTER_STEP = 4  # the first step of epoch 1; the kill waits for a whole checkpoint too


@pytest.fixture(scope="module")
def share_nothing_cluster(tmp_path_factory: pytest.TempPathFactory):
    with share_nothing(tmp_path_factory.mktemp("share-nothing")) as (net, services, holder):
        yield net, services, holder["cluster"]


class Watcher:
    """A thread that waits until the run has logged step KILL_AFTER_STEP and a whole checkpoint is
    in the bucket, then kills the node that runs rank 0. What it met goes back to the test:
    the step seen, the node killed, or the error that stopped it."""

    def __init__(self, services: Services, cluster: Cluster, run_name: str, done: threading.Event):
        self.services, self.cluster, self.run_name, self.done = services, cluster, run_name, done
        self.step: int | None = None
        self.killed: str | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        try:
            client = _client(self.services)
            while not self.done.is_set():
                runs = client.search_runs(
                    [e.experiment_id for e in client.search_experiments()],
                    f"attributes.run_name = '{self.run_name}'",
                )
                if runs:
                    steps = [
                        m.step for m in client.get_metric_history(runs[0].info.run_id, "train/step_loss")
                    ]
                    saved = any(
                        k.endswith("/meta.json") for k in self.services.objects(f"runs/{self.run_name}/")
                    )
                    if steps and max(steps) >= KILL_AFTER_STEP and saved:
                        self.step, self.killed = max(steps), self._rank0_node()
                        self.cluster.kill(self.killed)
                        return
                time.sleep(0.5)
        except BaseException as e:  # noqa: BLE001 - handed to the test, which raises it
            self.error = e

    def _rank0_node(self) -> str:
        (attempt,) = [a for a in self.cluster.train_attempts(self.run_name) if a["status"] == "RUNNING"]
        (rank0,) = [w for w in attempt["workers"] if w["world_rank"] == 0]
        return self.cluster.node_of(rank0["node_ip"])

    def result(self) -> tuple[int, str]:
        self.thread.join(60)
        if self.error is not None:
            raise AssertionError(f"the watcher failed: {self.error!r}") from self.error
        assert self.step is not None, (
            "the node was never killed: the run ended before the watcher's condition"
        )
        return self.step, self.killed


def test_a_run_on_a_share_nothing_cluster_survives_a_lost_node_and_serves_from_the_registry(
    share_nothing_cluster, prepared_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net, services, cluster = share_nothing_cluster
    for key, value in services.client_env().items():  # for this test's own reads of the store
        monkeypatch.setenv(key, value)
    user = User(tmp_path / "user", services, cluster)  # the user's folder, outside the cluster
    user.upload(prepared_dataset, "odd")  # from here on the dataset exists only in the bucket

    settings = [
        f"data.root='s3://{BUCKET}/datasets/odd'", "data.source='shards'", "model.arch='resnet18'",
        f"run.storage_path='s3://{BUCKET}/runs'", f"epochs={EPOCHS}", "scaling.num_workers=2",
        "scaling.min_workers=1", "scaling.cpus_per_worker=1", "data.threads_per_worker=1",
        "scaling.batch_size_per_worker=8", "data.crop_px=32", "data.val_resize_px=36", "data.val_crop_px=32",
        "run.log_every_steps=1", "run.checkpoint_every_steps=2", "run.max_failures=3",
    ]  # fmt: skip
    sets = [word for setting in settings for word in ("--set", setting)]
    done = threading.Event()
    # rank 0's node: it writes the checkpoints and logs to MLflow, the harder loss of the two
    watcher = Watcher(services, cluster, "remote", done)
    started = time.monotonic()
    try:
        result = user.run(
            "submit", "quickstart", "--address", cluster.job_server, "--follow", "--name", "remote", *sets
        )
    finally:
        done.set()
    print(f"submit took {time.monotonic() - started:.0f} s")
    step, killed = watcher.result()
    print(f"killed {killed} (rank 0's node) after step {step}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert step < EPOCHS * STEPS_PER_EPOCH, "the node was not killed mid-run"
    # the outcome, read from MLflow after the job ended (not from the log's tail)
    assert "result of run 'remote' (from MLflow" in result.stdout, result.stdout[-3000:]
    assert "registered model resnet18 version 1" in result.stdout.split("result of run 'remote'")[1]
    attempts = cluster.train_attempts("remote")
    assert len(attempts) >= 2, f"Ray Train did not restart the run: {attempts}"
    survivors = {w["node_ip"] for w in attempts[-1]["workers"]}
    assert net.ip(killed) not in survivors and attempts[-1]["status"] == "FINISHED"
    assert "resuming at epoch" in result.stdout
    submission_id = result.stdout.split("submitted quickstart as ")[1].split()[0]
    status = user.run("status", submission_id, "--address", cluster.job_server)
    assert status.returncode == 0 and f"{submission_id}: SUCCEEDED" in status.stdout

    # one MLflow run, every epoch and every optimizer step exactly once across the restart
    client = _client(services)
    experiment = client.get_experiment_by_name("quickstart")
    (tracked,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'remote'")
    history = {key: [m.step for m in client.get_metric_history(tracked.info.run_id, key)]
               for key in ("val/top1", "train/step_loss")}  # fmt: skip
    assert sorted(history["val/top1"]) == list(range(EPOCHS))
    assert sorted(history["train/step_loss"]) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert tracked.info.status == "FINISHED"
    last = max(m.timestamp for m in client.get_metric_history(tracked.info.run_id, "val/top1"))
    registered = client.get_model_version("resnet18", "1").creation_timestamp
    trained_s, registered_s = (last - tracked.info.start_time) / 1000, (registered - last) / 1000
    print(f"trained in {trained_s:.0f} s, registered {registered_s:.0f} s later")

    # checkpoints and the registered weights are in the bucket
    assert any(key.endswith("/checkpoint.pt") for key in services.objects("runs/remote/"))
    version = client.get_model_version("resnet18", "1")
    weights = [key for key in services.objects("mlartifacts/") if key.endswith("model.safetensors")]
    assert any(tracked.info.run_id in key or version.model_id in key for key in weights), weights

    # served from the cluster, loaded through the tracking server and the object store
    image = first_image(f"s3://{BUCKET}/datasets/odd", "val")
    offline = _offline_prediction(services, image)
    deploy = user.start(
        "deploy",
        "resnet18/1",
        "--address",
        cluster.ray_client,
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--no-compile",
    )
    try:
        url = f"http://{net.ip('head')}:8000"
        started = time.monotonic()
        served = _predict_when_up(url, image, deploy, cluster)
        print(f"deploy answered after {time.monotonic() - started:.0f} s")
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already: its output is in the error
            os.killpg(deploy.pid, signal.SIGTERM)
        output = deploy.communicate(timeout=120)[0]
    best = served["predictions"][0]
    assert (served["model"], served["version"]) == ("resnet18", "1"), output[-3000:]
    assert best["class_index"] == offline[0]
    assert best["probability"] == pytest.approx(offline[1], abs=1e-4)

    # nothing of the run on any disk but the bucket's: the user's folder, the surviving nodes
    assert sorted(p.name for p in user.folder.iterdir()) == []
    for node in sorted({"head", "w1", "w2"} - {killed}):
        files = cluster.files(node)
        kinds = {path: _kind(path) for path in files}
        unexpected = {path for path, kind in kinds.items() if kind is None}
        assert not unexpected, f"{node}: {sorted(unexpected)}"
        counts = {kind: list(kinds.values()).count(kind) for kind in sorted(set(kinds.values()))}
        print(f"{node}: {len(files)} files: {counts}")
        assert counts.get("cache", 0) > 0  # the dataset's copy and the job's code, at least


RUN_FILES = re.compile(r"(checkpoint\.pt|meta\.json|\.safetensors|mlflow\.db|run_id\.txt|unsent_metrics)")


def _kind(path: str) -> str | None:
    """What a file on a node is: a log, a cache, Ray's own state, settings; None: anything else
    (a file of the run among them)."""
    if RUN_FILES.search(path):
        return None
    if path == "/tmp/ray-start.log" or re.match(r"/tmp/ray/session_[^/]+/logs/", path):
        return "log"
    if path.startswith(("/tmp/resnet-pipe/datasets/", "/tmp/home/.cache/")) or "/runtime_resources/" in path:
        return "cache"  # the dataset's copy, the job's code
    if re.match(r"/tmp/(__pycache__/)?__autograph_generated_file\w+\.(py|cpython-\d+\.pyc)$", path):
        return "cache"  # the code DALI generates for a pipeline's conditionals (auto_aug), never removed
    if path.startswith(("/tmp/ray/", "/tmp/_ray_lockfiles/")):
        return "Ray's own state"  # the cluster's address, ports, metrics configuration, locks
    if path.startswith("/tmp/home/.config/") or path == "/tmp/hosts":
        return "settings"  # MLflow's telemetry choice; the node's host name (this fixture's)
    return None


def _client(services: Services) -> MlflowClient:
    """The test cluster's tracking server and registry, whatever URI this process set before."""
    return MlflowClient(services.tracking_uri, registry_uri=services.tracking_uri)


def _offline_prediction(services: Services, image: bytes) -> tuple[int, float]:
    """The registered weights, fetched here from the tracking server, over the evaluation
    transform: the top class and its probability."""
    import mlflow
    import torch
    from safetensors.torch import load_file

    from pipeline.config import from_dict
    from pipeline.models import create_model
    from pipeline.serve.inference import Preprocess

    source = _client(services).get_model_version_download_uri("resnet18", "1")
    fetched = mlflow.artifacts.download_artifacts(source, tracking_uri=services.tracking_uri)
    folder = Path(fetched) / "artifacts"
    job = from_dict(json.loads((folder / "job.json").read_text()))
    classes = (folder / "classes.tsv").read_text().splitlines()
    model = create_model(job.model.arch, num_classes=len(classes))
    model.load_state_dict(load_file(folder / "model.safetensors"))
    model.eval()
    with torch.inference_mode():
        row = model(Preprocess(job, 1, torch.device("cpu"), 1)([image])).softmax(dim=1)[0]
    shutil.rmtree(folder.parent)
    return int(row.argmax()), float(row.max())


def _predict_when_up(url: str, image: bytes, deploy: subprocess.Popen, cluster: Cluster) -> dict:
    deadline = time.monotonic() + 300
    while True:
        try:
            request = urllib.request.Request(
                f"{url}/predict", data=image, headers={"Content-Type": "image/jpeg"}
            )
            with urllib.request.urlopen(request, timeout=30) as answer:
                return json.loads(answer.read())
        except OSError:
            if deploy.poll() is not None:
                logs = cluster.read_logs("head", "ray_client_server*")
                raise AssertionError(
                    f"deploy exited {deploy.returncode}:\n{deploy.stdout.read()[-4000:]}\n"
                    f"the head's Ray client server logs:\n{logs[-6000:]}"
                ) from None
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def test_a_storage_folder_the_nodes_do_not_share_is_refused_before_training(
    share_nothing_cluster, prepared_dataset: Path, tmp_path: Path
) -> None:
    _, services, cluster = share_nothing_cluster
    user = User(tmp_path / "user", services, cluster)
    root = user.upload(prepared_dataset, "unshared")
    (user.folder / "shared").mkdir()  # exists and is writable here, and on no node
    settings = [f"data.root='{root}'", "data.source='shards'", f"run.storage_path='{user.folder / 'shared'}'"]
    sets = [word for setting in settings for word in ("--set", setting)]
    result = user.run(
        "submit", "quickstart", "--address", cluster.job_server, "--follow", "--name", "unshared", *sets
    )
    assert result.returncode != 0
    assert "does not see the file the driver wrote there" in result.stdout
    assert "every node must reach the same storage" in result.stdout
    client = _client(services)
    experiment = client.get_experiment_by_name("quickstart")
    runs = (
        client.search_runs([experiment.experiment_id], "attributes.run_name = 'unshared'")
        if experiment
        else []
    )
    assert runs == []  # refused before its MLflow run was made


def test_a_job_no_node_can_hold_is_refused_at_once_on_a_cluster_without_an_autoscaler(
    share_nothing_cluster, prepared_dataset: Path, tmp_path: Path
) -> None:
    # `ray start` nodes and no autoscaler: Ray Train would wait for the worker for ever
    _, services, cluster = share_nothing_cluster
    user = User(tmp_path / "user", services, cluster)
    root = user.upload(prepared_dataset, "too-big")
    settings = [f"data.root='{root}'", "data.source='shards'",
                f"run.storage_path='s3://{BUCKET}/runs'", "scaling.cpus_per_worker=64"]  # fmt: skip
    started = time.monotonic()  # from the submission
    sets = [word for setting in settings for word in ("--set", setting)]
    result = user.run(
        "submit", "quickstart", "--address", cluster.job_server, "--follow", "--name", "too-big", *sets
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 120
    assert "can never hold them" in result.stdout and "has no autoscaler" in result.stdout
    assert "--set scaling.cpus_per_worker=" in result.stdout
