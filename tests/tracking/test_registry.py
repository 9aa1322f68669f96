"""MLflow as the system of record, against a real `mlflow server` on loopback: two short runs
leave complete records and registered versions, the `champion` alias moves only to a better
version (unless forced), a rollback restores the previous one, and the champion loads and
predicts through MLflow's own pyfunc loader. A run whose tracking server goes away and comes
back finishes with every metric in it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import timm
import torch
from conftest import small_job
from mlflow.tracking import MlflowClient

from pipeline.cluster.launch import submit
from pipeline.data.index import load_index
from pipeline.serve.client import wait_until_up
from pipeline.system import free_port
from pipeline.tracking import registry, tracking_uri

pytestmark = pytest.mark.ray
EPOCHS = 3


USER, PASSWORD = "admin", "a-test-password"


class Server:
    """`mlflow server` on 127.0.0.1 with MLflow's basic authentication, a SQLite store and a
    remote artifact store (artifacts go through the server to a folder of its own), stoppable and
    restartable on the same port and stores. One worker process: four (MLflow's default) took a
    minute to start again beside the other half of `pytest -n 2`, longer than the outage meant."""

    def __init__(self, folder: Path):
        self.folder = folder
        (folder / "auth.ini").write_text(
            f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{folder}/auth.db\n"
            f"admin_username = {USER}\nadmin_password = {PASSWORD}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 600\n"  # else every request pays a PBKDF2 hash
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = (self.folder / "server.log").open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
             "--backend-store-uri", f"sqlite:///{self.folder}/store.db",
             "--serve-artifacts", "--artifacts-destination", str(self.folder / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=os.environ | {"MLFLOW_AUTH_CONFIG_PATH": str(self.folder / "auth.ini"),
                              "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-test-secret"},
        )  # fmt: skip
        wait_until_up(f"{self.url}/health", self.process, (self.folder / "server.log").read_text)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)  # the server and its uvicorn workers
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # uvicorn waits on keep-alive connections to close
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    server = Server(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_server: Server) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    return tmp_path


def _job(root: Path, *overrides: str):
    return small_job(root, EPOCHS, "optim.warmup_epochs=0", *overrides)


def test_runs_are_recorded_registered_and_promoted_only_forward(
    ray_session, prepared_dataset, workdir, mlflow_server
) -> None:
    frozen = submit(_job(prepared_dataset, "optim.lr_per_256=0.0"), "frozen")  # learns nothing
    trained = submit(_job(prepared_dataset, "optim.lr_per_256=2.0"), "trained")
    assert frozen.finished and trained.finished, (frozen.error, trained.error)
    client = MlflowClient(mlflow_server.url)

    # the run record: params, tags, metric histories, artifacts
    run = client.get_run(trained.mlflow_run_id)
    dataset_hash = load_index(prepared_dataset).dataset_hash
    assert run.data.params["optim.lr_per_256"] == "2.0" and run.data.params["dataset_hash"] == dataset_hash
    assert run.data.tags["versions.torch"] and run.data.tags["hardware.cpus"] == "2"
    assert run.data.tags["checkpoint"].startswith(str(workdir))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")] == list(range(EPOCHS))
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/step_loss"))
    assert steps == list(range(1, 3 * EPOCHS + 1))
    folders = ("", "weights", "job", "plots")
    artifacts = {a.path for d in folders for a in client.list_artifacts(run.info.run_id, d)}
    assert {"weights/model.safetensors", "job/quickstart.toml", "job/resolved.json"} <= artifacts
    assert {"plots/curves.png", "plots/learning_rate.png", "plots/class_errors.png"} <= artifacts
    per_class = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/plots/class_errors.json")
    # the remote artifact store: uploads went through the server, which wrote them where it keeps them
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert list((mlflow_server.folder / "artifacts").rglob("model.safetensors"))
    # and the server does check credentials
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(f"{mlflow_server.url}/api/2.0/mlflow/experiments/search?max_results=1")
    usage = [k for k in run.data.metrics if k.startswith("system/")]
    assert {k.rsplit("/", 1)[1] for k in usage} >= {"cpu_percent", "memory_percent", "worker_rss_gb"}
    assert 0 < run.data.metrics[next(k for k in usage if k.endswith("/memory_percent"))] <= 100

    # two registered versions of resnet50, tagged with their accuracy and dataset
    versions = {v.tags["run_id"]: v for v in client.search_model_versions("name = 'resnet50'")}
    weak, strong = versions[frozen.mlflow_run_id], versions[trained.mlflow_run_id]
    assert weak.tags["dataset_hash"] == strong.tags["dataset_hash"] == dataset_hash
    assert float(strong.tags["val/top1"]) > float(weak.tags["val/top1"])
    # every class's validation errors, as many as the registered weights' top-1 says
    samples, errors = sum(r["samples"] for r in per_class), sum(r["errors"] for r in per_class)
    assert samples == len(load_index(prepared_dataset).files("val"))
    assert float(strong.tags["val/top1"]) == pytest.approx(1 - errors / samples, abs=1e-6)
    model_version = client.get_model_version("resnet50", strong.version)
    assert model_version.run_id == trained.mlflow_run_id

    def champion() -> str:
        return client.get_model_version_by_alias("resnet50", registry.CHAMPION).version

    # the gate: the first champion, then only a better one; --force passes and says so; rollback
    registry.promote("frozen")
    assert champion() == weak.version
    registry.promote("trained")
    assert champion() == strong.version
    with pytest.raises(registry.RegistryError, match="does not beat"):
        registry.promote(f"resnet50/{weak.version}")
    assert champion() == strong.version
    forced = registry.promote(f"resnet50/{weak.version}", force=True)
    assert "forced past the gate" in forced.message and champion() == weak.version
    registry.rollback("resnet50")
    assert champion() == strong.version

    # the same through the command line: the table, the comparison, a refusal (exit 1)
    def cli(*args: str) -> subprocess.CompletedProcess:
        env = os.environ | {"MLFLOW_TRACKING_URI": mlflow_server.url}
        command = [sys.executable, "-m", "pipeline.cli", *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)

    table = cli("runs", "quickstart")
    assert table.returncode == 0
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert rows["trained"][2:4] == ["FINISHED", str(EPOCHS)] and rows["frozen"][2] == "FINISHED"
    compared = cli("runs", "compare", "frozen", "trained")
    assert compared.returncode == 0
    assert any(line.split() == ["optim.lr_per_256", "0.0", "2.0"] for line in compared.stdout.splitlines())
    refused = cli("promote", f"resnet50/{weak.version}")
    assert refused.returncode == 1 and "does not beat" in refused.stderr
    assert champion() == strong.version
    unknown = cli("runs", "compare", "frozen", "no-such-run")
    assert unknown.returncode == 2 and "no run named" in unknown.stderr
    os.environ["MLFLOW_TRACKING_PASSWORD"] = "not-the-password"  # monkeypatch restores it
    refused = cli("submit", "quickstart", "--set", f"data.root='{prepared_dataset}'", "--name", "denied")
    assert refused.returncode != 0 and "MLFLOW_TRACKING_PASSWORD" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and not (workdir / "runs" / "denied").exists()
    os.environ["MLFLOW_TRACKING_PASSWORD"] = PASSWORD

    # the champion loads through MLflow and answers for real images
    loaded = mlflow.pyfunc.load_model("models:/resnet50@champion")
    index = load_index(prepared_dataset)
    images = [(prepared_dataset / f).read_bytes() for f in index.files("val")[:3]]
    answer = loaded.predict(pd.DataFrame({"image": images}))
    assert list(answer.columns[:4]) == ["class_index", "wnid", "name", "probability"]
    assert len(answer) == 3 and answer["wnid"].isin(index.classes).all()
    assert answer["probability"].between(0, 1).all()
    # with what it needs to load elsewhere, at the versions that trained it
    needs = Path(mlflow.artifacts.download_artifacts("models:/resnet50@champion/requirements.txt"))
    pinned = dict(line.split("==") for line in needs.read_text().split())
    assert pinned["torch"] == torch.__version__.split("+")[0] and pinned["timm"] == timm.__version__


def test_a_tracking_outage_mid_run_costs_neither_the_run_nor_a_metric(
    ray_session, prepared_dataset, workdir, mlflow_server
) -> None:
    epochs = 5  # steps 3 to 15 take longer than the outage, even on a busy machine
    samples = workdir / "runs" / "outage" / "samples" / "rank0.jsonl"
    outage = {}

    def take_the_server_down_for_a_while() -> None:  # from step 2 (epoch 0) for 15 s
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if samples.is_file() and any(json.loads(line)["step"] >= 2 for line in samples.open()):
                outage["down_at_step"] = max(json.loads(line)["step"] for line in samples.open())
                mlflow_server.stop()
                time.sleep(15)
                mlflow_server.start()
                outage["back_at_step"] = max(json.loads(line)["step"] for line in samples.open())
                return
            time.sleep(0.05)

    chaos = threading.Thread(target=take_the_server_down_for_a_while)
    chaos.start()
    done = submit(_job(prepared_dataset, f"epochs={epochs}", "run.sample_log=true"), "outage")
    chaos.join()
    assert done.finished, done.error
    assert outage["back_at_step"] > outage["down_at_step"]  # training went on while it was down

    client = MlflowClient(mlflow_server.url)
    assert [m.step for m in client.get_metric_history(done.mlflow_run_id, "val/top1")] == list(range(epochs))
    steps = sorted(m.step for m in client.get_metric_history(done.mlflow_run_id, "train/step_loss"))
    assert steps == list(range(1, 3 * epochs + 1))
    assert not (done.run_dir / "unsent_metrics.jsonl").exists()


def test_a_mean_subtracted_model_registered_without_its_mean_image_is_not_served(workdir: Path) -> None:
    # the paper's CIFAR recipes subtract the mean image: a version without it would answer wrongly
    client = MlflowClient(tracking_uri())
    run = client.create_run(client.create_experiment("cifar10-resnet20"))
    client.log_param(run.info.run_id, "data.normalize", "pixel_mean")
    client.create_registered_model("cifar_resnet20")
    client.create_model_version(
        "cifar_resnet20", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    with pytest.raises(
        registry.RegistryError, match="pixel_mean.*registered without that mean image.*register the run again"
    ):
        registry.serving_version("cifar_resnet20/1")
