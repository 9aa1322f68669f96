"""Faults on the share-nothing cluster (`share_nothing`), each injected for real into a short run
that a user submits from a folder outside the cluster: a killed `submit`, a half-written
checkpoint on a node that dies, the tracking server restarted, the object store refused at the
end of a run, the tracking server gone at the end of a run. Each test measures its figure and
prints it (docs/reliability.md has them); `make test-faults` runs this module.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import boto3
import pytest
from conftest import register_untrained, small_job
from mlflow.tracking import MlflowClient
from share_nothing import (
    BUCKET,
    CREDENTIALS,
    Cluster,
    Services,
    User,
    blocked,
    share_nothing,
    slowed,
    wait_until,
)

from pipeline.cluster.launch import SERVE_RETRY_ENV

pytestmark = [pytest.mark.ray, pytest.mark.faults]
EPOCHS, STEPS_PER_EPOCH = 3, 3  # 50 training images, global batch 16


@pytest.fixture(scope="module")
def faults_cluster(tmp_path_factory: pytest.TempPathFactory, prepared_dataset: Path):
    folder = tmp_path_factory.mktemp("faults")
    # Serve as docs/reliability.md sets it up on a cluster: HAProxy in front of the replicas, sending
    # a request that a dying replica dropped to another one
    serving = {"RAY_SERVE_ENABLE_HA_PROXY": "1", **SERVE_RETRY_ENV}
    with share_nothing(folder, node_env=serving) as (net, services, holder):
        user = User(folder / "uploader", services, holder["cluster"])
        root = user.upload(prepared_dataset, "faults")
        yield net, services, holder, root


def _settings(root: str, *more: str) -> list[str]:
    """A run of EPOCHS x STEPS_PER_EPOCH steps on the two workers, a checkpoint every 2 steps."""
    settings = [
        f"data.root='{root}'", "data.source='shards'", "model.arch='resnet18'",
        f"run.storage_path='s3://{BUCKET}/runs'", f"epochs={EPOCHS}", "scaling.num_workers=2",
        "scaling.min_workers=1", "scaling.cpus_per_worker=1", "data.threads_per_worker=1",
        "scaling.batch_size_per_worker=8", "data.crop_px=32", "data.val_resize_px=36", "data.val_crop_px=32",
        "run.log_every_steps=1", "run.checkpoint_every_steps=2", "run.max_failures=3", *more,
    ]  # fmt: skip
    return [word for setting in settings for word in ("--set", setting)]


def _client(services: Services) -> MlflowClient:
    return MlflowClient(services.tracking_uri, registry_uri=services.tracking_uri)


def _tracked(services: Services, run_name: str):
    """The MLflow run named `run_name` (exactly one), or None."""
    client = _client(services)
    experiment = client.get_experiment_by_name("quickstart")
    if experiment is None:
        return None
    found = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'")
    assert len(found) <= 1, f"{len(found)} MLflow runs named {run_name}"
    return found[0] if found else None


def _steps(services: Services, run_name: str, key: str = "train/step_loss") -> list[int]:
    run = _tracked(services, run_name)
    return [m.step for m in _client(services).get_metric_history(run.info.run_id, key)] if run else []


def _until_step(user: User, submit: subprocess.Popen, cluster: Cluster, run_name: str, step: int) -> None:
    """Waits for step `step` of run `run_name` in MLflow, up to 400 s. On a timeout the failure
    says why: `ray status` (what holds the cluster's CPUs, what waits for them) and what the
    user's `submit --follow` printed, which it is stopped to give."""
    try:
        wait_until(lambda: len(_steps(user.services, run_name)) >= step, 400, f"step {step} in MLflow")
    except AssertionError as e:
        status = cluster.status()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(submit.pid, signal.SIGTERM)
        said = user.output(submit, 120)
        raise AssertionError(f"{e}\n--- ray status\n{status}\n--- submit\n{said[-6000:]}") from None


def _assert_every_step_once(services: Services, run_name: str, epochs: int = EPOCHS) -> None:
    assert sorted(_steps(services, run_name, "val/top1")) == list(range(epochs))
    assert sorted(_steps(services, run_name)) == list(range(1, epochs * STEPS_PER_EPOCH + 1))


@functools.cache
def _s3():
    keys = {"aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}  # fmt: skip
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1", **keys)


def _whole_checkpoints(services: Services, run_name: str) -> list[tuple[int, str]]:
    """(step, folder key) of the run's checkpoints in the bucket whose meta.json is there."""
    found = []
    for key in services.objects(f"runs/{run_name}/"):
        if key.endswith("/meta.json"):
            meta = json.loads(_s3().get_object(Bucket=BUCKET, Key=key)["Body"].read())
            found.append((meta["step"], key.rsplit("/", 1)[0]))
    return sorted(found)


def _latest_recorded(run_name: str) -> str | None:
    """The folder name of the checkpoint that Ray Train has recorded as the run's latest (its
    checkpoint manager's snapshot in the run's storage), or None."""
    try:
        snapshot = _s3().get_object(Bucket=BUCKET, Key=f"runs/{run_name}/checkpoint_manager_snapshot.json")
    except _s3().exceptions.NoSuchKey:
        return None
    latest = json.loads(snapshot["Body"].read()).get("latest_checkpoint_result")
    return latest["checkpoint_dir_name"] if latest else None


def _submission_id(output: str) -> str:
    return output.split("submitted quickstart as ")[1].split()[0]


@pytest.fixture(autouse=True)
def _store_env(faults_cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """This test's own reads of the bucket go to the test's S3 server."""
    _, services, _, _ = faults_cluster
    for key, value in services.client_env().items():
        monkeypatch.setenv(key, value)


def test_a_killed_submit_leaves_the_job_training_and_submit_resume_attaches_to_it(
    faults_cluster, tmp_path: Path
) -> None:
    _, services, holder, root = faults_cluster
    cluster: Cluster = holder["cluster"]
    user = User(tmp_path / "user", services, cluster)
    sets = _settings(root)
    driver = user.start(
        "submit", "quickstart", "--address", cluster.job_server, "--follow", "--name", "orphan", *sets
    )
    _until_step(user, driver, cluster, "orphan", 2)
    os.killpg(driver.pid, signal.SIGKILL)  # the user's terminal gone: `submit --follow` and its group
    driver.wait(30)
    submission_id = _submission_id(driver.stdout.read())

    # the job trains on in the cluster, and `status`, `list` and `logs` find it
    status = user.run("status", submission_id, "--address", cluster.job_server)
    assert status.returncode == 0 and f"{submission_id}: RUNNING" in status.stdout, status.stdout
    listed = user.run("list", "--address", cluster.job_server)
    assert any(line.split()[:2] == [submission_id, "RUNNING"] for line in listed.stdout.splitlines())
    logs = user.run("logs", submission_id, "--address", cluster.job_server)
    assert logs.returncode == 0 and "MLflow run" in logs.stdout
    steps_before = len(_steps(services, "orphan"))

    # the same command with --resume follows the running job instead of submitting a second copy
    started = time.monotonic()
    attached = user.run(
        "submit", "quickstart", "--address", cluster.job_server, "--follow", "--resume", "orphan", *sets
    )
    print(f"attached {time.monotonic() - started:.0f} s before the job ended; {steps_before} steps were in")
    assert attached.returncode == 0, attached.stdout[-3000:] + attached.stderr[-2000:]
    assert f"run 'orphan' is running already as {submission_id}" in attached.stdout
    assert "submitted quickstart as" not in attached.stdout
    assert f"{submission_id}: SUCCEEDED" in attached.stdout
    assert "registered model resnet18 version" in attached.stdout.split("result of run 'orphan'")[1]
    jobs = [line for line in user.run("list", "--address", cluster.job_server).stdout.splitlines()]
    assert len([line for line in jobs if line.split()[-1:] == ["orphan"]]) == 1, jobs
    assert _tracked(services, "orphan").info.status == "FINISHED"
    _assert_every_step_once(services, "orphan")


class _KillThenHalfWrite:
    """Once Ray Train has recorded a second checkpoint (its snapshot in the bucket says which is
    the latest), kills the node that runs rank 0, then cuts the checkpoint that Ray recorded last
    to half its bytes: what a node that died mid-upload leaves, met by the restart. What it did,
    or the error that stopped it, goes back to the test."""

    def __init__(self, services: Services, cluster: Cluster, run_name: str, done: threading.Event):
        self.services, self.cluster, self.run_name, self.done = services, cluster, run_name, done
        self.cut: str | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        try:
            rank0 = _rank0_node(self.cluster, self.run_name)
            while not self.done.is_set():
                whole = [
                    folder.rsplit("/", 1)[1] for _, folder in _whole_checkpoints(self.services, self.run_name)
                ]
                if _latest_recorded(self.run_name) in whole[1:]:
                    self.cluster.kill(rank0)  # no checkpoint is written or recorded after this
                    latest = _latest_recorded(self.run_name)
                    weights = f"runs/{self.run_name}/{latest}/checkpoint.pt"
                    data = _s3().get_object(Bucket=BUCKET, Key=weights)["Body"].read()
                    _s3().put_object(Bucket=BUCKET, Key=weights, Body=data[: len(data) // 2])
                    self.cut = weights
                    return
                time.sleep(0.5)
        except BaseException as e:  # noqa: BLE001 - handed to the test, which raises it
            self.error = e

    def result(self) -> str:
        self.thread.join(60)
        if self.error is not None:
            raise AssertionError(f"the fault thread failed: {self.error!r}") from self.error
        assert self.cut is not None, "no checkpoint was cut: the run ended before the condition"
        return self.cut


def test_a_half_written_checkpoint_is_named_and_the_run_resumes_from_the_one_before(
    faults_cluster, tmp_path: Path
) -> None:
    net, services, holder, root = faults_cluster
    cluster: Cluster = holder["cluster"]
    user = User(tmp_path / "user", services, cluster)
    done = threading.Event()
    fault = _KillThenHalfWrite(services, cluster, "half-written", done)
    try:
        result = user.run(
            "submit", "quickstart", "--address", cluster.job_server, "--follow", "--name", "half-written",
            *_settings(root),
        )  # fmt: skip
    finally:
        done.set()
    cut = fault.result()
    holder["cluster"] = cluster.restart_lost_nodes()  # the next test gets two workers again
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    folder = cut.rsplit("/", 1)[0]
    named = [
        line for line in result.stdout.splitlines() if f"s3://{BUCKET}/{folder}: checkpoint.pt has" in line
    ]
    said = [
        line for line in result.stdout.splitlines() if "state-dump" not in line and "(raylet)" not in line
    ]
    assert named and "it is truncated; resuming from the checkpoint before it" in named[0], (cut, said[-60:])
    print(named[0])
    resumed = [line for line in result.stdout.splitlines() if "resuming at epoch" in line]
    assert resumed, result.stdout[-3000:]
    print(resumed[-1])
    assert _tracked(services, "half-written").info.status == "FINISHED"
    _assert_every_step_once(services, "half-written")


def test_a_tracking_server_restarted_mid_run_loses_no_metric_step(faults_cluster, tmp_path: Path) -> None:
    _, services, holder, root = faults_cluster
    cluster: Cluster = holder["cluster"]
    user = User(tmp_path / "user", services, cluster)
    run = user.start(
        "submit", "quickstart", "--address", cluster.job_server, "--follow", "--name", "tracking-restart",
        *_settings(root),
    )  # fmt: skip
    _until_step(user, run, cluster, "tracking-restart", 2)
    stopped = time.monotonic()
    services.stop_mlflow()
    time.sleep(15)  # the outage: the run trains on, its metrics wait in memory
    services.start_mlflow()
    print(f"MLflow was down {time.monotonic() - stopped:.0f} s")
    output = user.output(run, 600)
    assert run.returncode == 0, output[-4000:]
    assert "MLflow is unreachable" in output and "MLflow answers again" in output
    tracked = _tracked(services, "tracking-restart")
    assert tracked.info.status == "FINISHED"
    _assert_every_step_once(services, "tracking-restart")
    assert _client(services).search_model_versions(f"run_id = '{tracked.info.run_id}'")


def test_a_store_refused_at_registration_ends_the_run_finished_and_register_completes_it(
    faults_cluster, tmp_path: Path
) -> None:
    net, services, holder, root = faults_cluster
    cluster: Cluster = holder["cluster"]
    user = User(tmp_path / "user", services, cluster)
    run = user.start(
        "submit", "quickstart", "--address", cluster.job_server, "--follow", "--name", "store-at-end",
        *_settings(root),
    )  # fmt: skip
    _until_step(user, run, cluster, "store-at-end", 1)
    # the tracking server's artifact store refuses it from now on (the nodes still reach the
    # bucket: checkpoints go on); the registration at the end uploads through the server
    with blocked(services.s3_port, source=net.host_ip):
        output = user.output(run, 600)
    assert run.returncode == 1, output[-4000:]
    assert "SUCCEEDED" not in output or "not registered" in output
    lines = [line for line in output.splitlines() if "its model is not registered" in line]
    assert lines and "`resnet-pipe register store-at-end` registers it" in lines[0], output[-4000:]
    tracked = _tracked(services, "store-at-end")
    assert tracked.info.status == "FINISHED"
    assert tracked.data.tags["resnet_pipe.registration"].startswith("failed: ")
    assert not _client(services).search_model_versions(f"run_id = '{tracked.info.run_id}'")
    _assert_every_step_once(services, "store-at-end")

    registered = user.run("register", "store-at-end")
    assert registered.returncode == 0, registered.stdout + registered.stderr
    assert "registered model resnet18 version" in registered.stdout
    tracked = _tracked(services, "store-at-end")
    assert tracked.info.status == "FINISHED" and tracked.data.tags["resnet_pipe.registration"].startswith(
        "registered"
    )
    again = user.run("register", "store-at-end")  # registered once, whatever is run again
    assert again.returncode == 0 and "registered resnet18 version" in again.stdout
    assert len(_client(services).search_model_versions(f"run_id = '{tracked.info.run_id}'")) == 1


def test_a_tracking_server_gone_at_the_end_leaves_a_stored_result_and_register_completes_it(
    faults_cluster, tmp_path: Path
) -> None:
    _, services, holder, root = faults_cluster
    cluster: Cluster = holder["cluster"]
    user = User(tmp_path / "user", services, cluster)
    run = user.start(
        "submit", "quickstart", "--address", cluster.job_server, "--follow", "--name", "tracking-at-end",
        *_settings(root),
    )  # fmt: skip
    last = EPOCHS * STEPS_PER_EPOCH
    # the last step's checkpoint wait is the last metric rank 0 logs: then the server goes
    wait_until(
        lambda: last in _steps(services, "tracking-at-end", "train/checkpoint_s"), 400, "the last step"
    )
    services.stop_mlflow()
    try:
        output = user.output(run, 600)
    finally:
        services.start_mlflow()
    assert run.returncode == 1, output[-4000:]
    assert "could not be told that run" in output and "`resnet-pipe register tracking-at-end`" in output
    assert "Traceback" not in output
    stored = json.loads(
        _s3().get_object(Bucket=BUCKET, Key="runs/tracking-at-end/result.json")["Body"].read()
    )
    assert (
        stored["status"] == "FINISHED" and stored["mlflow_closed"] is False and stored["registered"] is None
    )
    assert "result of run 'tracking-at-end' (from s3://" in output  # MLflow did not answer `--follow`

    tracked = _tracked(services, "tracking-at-end")
    assert tracked.info.status == "RUNNING"  # as the warning said
    registered = user.run("register", "tracking-at-end")
    assert registered.returncode == 0, registered.stdout + registered.stderr
    tracked = _tracked(services, "tracking-at-end")
    assert tracked.info.status == "FINISHED"
    assert _client(services).search_model_versions(f"run_id = '{tracked.info.run_id}'")
    _assert_every_step_once(services, "tracking-at-end")


def _rank0_node(cluster: Cluster, run_name: str) -> str:
    def running() -> str | None:
        attempts = [a for a in cluster.train_attempts(run_name) if a["status"] == "RUNNING"]
        ranks = [w for a in attempts for w in a["workers"] if w["world_rank"] == 0]
        return cluster.node_of(ranks[0]["node_ip"]) if ranks else None

    return wait_until(running, 120, f"rank 0 of {run_name} in Ray Train's state")


def _assert_whole_in_bucket(services: Services, run_name: str) -> int:
    """Every checkpoint of the run whose meta.json is in the bucket reads whole (its recorded
    size and SHA-256); returns how many there are."""
    from pipeline.storage import Location
    from pipeline.train import checkpoint

    whole = _whole_checkpoints(services, run_name)
    for _, folder in whole:
        checkpoint.load(Location(f"s3://{BUCKET}/{folder}"))
    return len(whole)


def test_a_full_staging_disk_on_one_node_is_refused_in_one_line_naming_it(
    faults_cluster, tmp_path: Path
) -> None:
    _, services, holder, root = faults_cluster
    cluster: Cluster = holder["cluster"]
    user = User(tmp_path / "user", services, cluster)
    cache = "/tmp/resnet-pipe/datasets"  # data.cache_dir's default, on w2 a 64 kB volume
    with cluster.small_disk("w2", cache, "64k"):
        result = user.run(
            "submit", "quickstart", "--address", cluster.job_server, "--follow", "--name", "full-disk",
            *_settings(root, "run.max_failures=0", f"data.cache_dir='{cache}'"),
        )  # fmt: skip
    assert result.returncode != 0
    failed = [line for line in result.stdout.splitlines() if line.startswith("error: training failed:")]
    assert failed, result.stdout[-3000:]
    assert re.search(
        rf"the dataset cache {cache} on rp-w2 has [\d.]+ MB free; staging needs [\d.]+ MB", failed[0]
    )
    print(failed[0])
    assert not _steps(services, "full-disk")  # no step trained on a part of the dataset
    assert _tracked(services, "full-disk").info.status == "FAILED"


def test_an_object_store_down_60_s_then_slowed_to_1_mb_s_costs_the_run_nothing(
    faults_cluster, tmp_path: Path
) -> None:
    net, services, holder, root = faults_cluster
    cluster: Cluster = holder["cluster"]
    user = User(tmp_path / "user", services, cluster)
    # ResNet-20's 3 MB checkpoints: a few seconds each at 1 MB/s
    sets = _settings(root, "model.arch='cifar_resnet20'", "epochs=8")
    run = user.start(
        "submit", "quickstart", "--address", cluster.job_server, "--follow", "--name", "store-out", *sets
    )
    wait_until(lambda: _whole_checkpoints(services, "store-out"), 300, "the run's first whole checkpoint")
    rank0 = _rank0_node(cluster, "store-out")
    with blocked(services.s3_port):  # every node, the tracking server's artifact store too
        down_at = time.time()
        time.sleep(60)
    up_at = time.time()
    with slowed(net, rank0, services.s3_port, "8mbit"):  # rank 0's uploads at 1 MB/s, to the end
        output = user.output(run, 900)
    assert run.returncode == 0, output[-4000:]
    outage = [line for line in output.splitlines() if "the object store did not take" in line]
    back = [line for line in output.splitlines() if "the object store answers again" in line]
    assert len(outage) == len(back) == 1, output[-4000:]  # one outage: two lines, whatever the retries
    assert "Traceback" not in output
    print(outage[0].strip(), back[0].strip(), sep="\n")
    history = _client(services).get_metric_history(
        _tracked(services, "store-out").info.run_id, "train/step_loss"
    )
    during = [m.step for m in history if down_at * 1000 <= m.timestamp <= up_at * 1000]
    assert during, "no step was trained while the store was down"
    uploads = _client(services).get_metric_history(
        _tracked(services, "store-out").info.run_id, "train/checkpoint_upload_s"
    )
    print(f"{len(during)} steps trained during the 60 s outage; uploads took " +
          ", ".join(f"{m.value:.1f} s" for m in sorted(uploads, key=lambda m: m.step)))  # fmt: skip
    assert _assert_whole_in_bucket(services, "store-out") >= 1
    assert _tracked(services, "store-out").info.status == "FINISHED"
    assert sorted(_steps(services, "store-out")) == list(range(1, 8 * STEPS_PER_EPOCH + 1))


def test_an_object_store_down_past_its_limit_fails_the_run_in_one_line_keeping_its_checkpoint(
    faults_cluster, tmp_path: Path
) -> None:
    _, services, holder, root = faults_cluster
    cluster: Cluster = holder["cluster"]
    user = User(tmp_path / "user", services, cluster)
    sets = _settings(
        root, "model.arch='cifar_resnet20'", "epochs=8", "run.storage_outage_s=15", "run.max_failures=0"
    )
    run = user.start(
        "submit", "quickstart", "--address", cluster.job_server, "--follow", "--name", "store-gone", *sets
    )
    wait_until(lambda: _whole_checkpoints(services, "store-gone"), 300, "the run's first whole checkpoint")
    with blocked(services.s3_port):
        output = user.output(run, 600)
    assert run.returncode != 0, output[-4000:]
    failed = [line for line in output.splitlines() if line.startswith("error: training failed:")]
    assert failed and "the object store did not take" in failed[0] and "run.storage_outage_s" in failed[0], (
        output[-4000:]
    )
    print(failed[0])
    assert _assert_whole_in_bucket(services, "store-gone") >= 1  # the last whole checkpoint is intact
    assert _tracked(services, "store-gone").info.status == "FAILED"


def test_no_secret_reaches_the_jobs_settings_logs_or_mlflow(faults_cluster, tmp_path: Path) -> None:
    _, services, holder, root = faults_cluster
    cluster: Cluster = holder["cluster"]
    password = (
        f"planted-mlflow-password-{os.urandom(8).hex()}"  # the server ignores it; it must travel nowhere
    )
    user = User(tmp_path / "user", services, cluster, {"MLFLOW_TRACKING_USERNAME": "someone",
                                                       "MLFLOW_TRACKING_PASSWORD": password})  # fmt: skip
    result = user.run(
        "submit", "quickstart", "--address", cluster.job_server, "--follow", "--name", "secrets",
        *_settings(root, "epochs=1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    tracked = _tracked(services, "secrets")
    places = {
        "submit's output": result.stdout + result.stderr,
        "the dashboard's jobs (entrypoint, runtime environment, metadata)": json.dumps(
            cluster.get("/api/jobs/")
        ),
        "Ray Train's runs in the dashboard (their settings)": json.dumps(
            cluster.get("/api/train/v2/runs/v1")
        ),
        "the MLflow run's params and tags": json.dumps([tracked.data.params, tracked.data.tags]),
    }
    for node in ("head", "w1", "w2"):
        places[f"the Ray logs of {node}"] = cluster.read_logs(node)
    assert all(places.values()), [place for place, text in places.items() if not text]  # each was read
    secrets = {"the S3 secret key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"], "the MLflow password": password}
    leaks = [f"{name} in {place}" for place, text in places.items() for name, secret in secrets.items()
             if secret in text]  # fmt: skip
    assert not leaks, leaks
    print(f"searched {sum(len(text) for text in places.values()) / 1e6:.1f} MB in {len(places)} places")


class _ClosedLoop:
    """`clients` threads, each sending the image and waiting for the answer before the next, on a
    new connection each time; every request kept as (sent at, seconds, status or error). A
    connection closed with no answer is asked once more, as `resnet-pipe predict` does
    (`pipeline.serve.client.post`), and counted in `asked_again`; any other failure is kept."""

    def __init__(self, url: str, image: bytes, clients: int):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.image, self.stop = image, threading.Event()
        self.requests: list[tuple[float, float, int | str]] = []
        self.asked_again: list[float] = []  # when each request that was asked twice was sent
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _client(self) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            outcome = self._ask()
            if outcome == "closed with no answer":
                self.asked_again.append(sent)
                outcome = self._ask()
            self.requests.append((sent, time.monotonic() - sent, outcome))

    def _ask(self) -> int | str:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            connection.request("POST", "/predict", self.image, {"Content-Type": "image/jpeg"})
            answer = connection.getresponse()
            answer.read()
            return answer.status
        except ConnectionResetError:  # http.client's RemoteDisconnected among them
            return "closed with no answer"
        except (OSError, http.client.HTTPException) as e:
            return f"{type(e).__name__}: {e}"
        finally:
            connection.close()

    def answered(self) -> int:
        return sum(outcome == 200 for _, _, outcome in self.requests)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=150)


def _replicas(cluster: Cluster) -> list[dict]:
    """The serving app's replicas (Serve's REST API): replica_id, state, pid, node_ip, ..."""
    applications = cluster.get("/api/serve/applications/").get("applications") or {}
    app = applications.get("resnet-pipe")
    if not app:
        return []
    return [replica for deployment in app["deployments"].values() for replica in deployment["replicas"]]


def test_a_replica_killed_under_load_fails_no_request(
    faults_cluster, prepared_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net, services, holder, _ = faults_cluster
    cluster: Cluster = holder["cluster"]
    user = User(tmp_path / "user", services, cluster)
    monkeypatch.chdir(tmp_path)  # registered here, through the tracking server, into the bucket
    version = register_untrained(small_job(prepared_dataset, 1, "model.arch='resnet18'"), "replica-kill")
    image = next((prepared_dataset / "val").rglob("*.JPEG")).read_bytes()
    deploy = user.start(
        "deploy", f"{version.name}/{version.version}", "--address", cluster.ray_client, "--host", "0.0.0.0",
        "--port", "8000", "--replicas", "2", "--no-compile",
    )  # fmt: skip
    url = f"http://{net.ip('head')}:8000"
    load = None
    try:

        def serving(count: int, without: str | None = None) -> bool:
            assert deploy.poll() is None, f"deploy exited {deploy.returncode}: {deploy.stdout.read()[-3000:]}"
            replicas = _replicas(cluster)
            return sum(r["state"] == "RUNNING" and r["replica_id"] != without for r in replicas) == count

        wait_until(lambda: serving(2), 300, "2 replicas serving")
        load = _ClosedLoop(url, image, clients=4)
        wait_until(lambda: load.answered() >= 40, 120, "40 answers before the kill")
        victim = _replicas(cluster)[0]
        os.kill(victim["pid"], signal.SIGKILL)  # the replica's process, mid-stream
        killed = time.monotonic()
        wait_until(lambda: serving(2, without=victim["replica_id"]), 180, "2 replicas serving again")
        back_s = time.monotonic() - killed
        wait_until(lambda: time.monotonic() - killed >= 60, 90, "a minute of load after the kill")
    finally:
        if load is not None:
            load.finish()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(deploy.pid, signal.SIGTERM)
        said = user.output(deploy, 120)
    # deploy's SIGTERM took the app down: its replicas gave their CPUs back, for the next run
    assert "stopped" in said.splitlines(), said[-3000:]
    wait_until(lambda: not _replicas(cluster), 60, "no replica left once deploy stopped")
    failed = [(round(at - killed, 2), outcome) for at, _, outcome in load.requests if outcome != 200]
    recovery = [took for at, took, _ in load.requests if killed <= at < killed + 60]
    p99 = statistics.quantiles(recovery, n=100)[98] * 1000
    before = [took for at, took, _ in load.requests if at < killed]
    again = [round(at - killed, 2) for at in load.asked_again]
    print(
        f"replica {victim['replica_id']} killed on {cluster.node_of(victim['node_ip'])}: {len(failed)} of "
        f"{len(load.requests)} requests failed, {len(again)} asked twice (sent at {again} s from the kill, "
        f"closed with no answer the first time); p99 {p99:.0f} ms in the minute after the kill "
        f"({statistics.quantiles(before, n=100)[98] * 1000:.0f} ms before it, {len(recovery)} requests); "
        f"2 replicas serving again after {back_s:.1f} s"
    )
    assert not failed, (failed[:20], said[-3000:])
    # only what the dying replica held is asked twice: the requests in flight when it was killed
    assert all(-5 <= at <= 5 for at in again), again


def test_a_lost_head_and_a_new_cluster_go_on_with_the_same_run(faults_cluster, tmp_path: Path) -> None:
    net, services, holder, root = faults_cluster
    cluster: Cluster = holder["cluster"]
    user = User(tmp_path / "user", services, cluster)
    # ResNet-20: its checkpoints upload within a step, as a large model's do within the hundreds
    # of steps between its checkpoints
    sets = _settings(root, "model.arch='cifar_resnet20'", "epochs=8")
    run = user.start(
        "submit", "quickstart", "--address", cluster.job_server, "--follow", "--name", "headless", *sets
    )
    _until_step(user, run, cluster, "headless", 10)
    # the head goes (Ray, the job's driver, Ray Train's controller), and with it the cluster, as
    # KubeRay replaces a RayJob's cluster on a retry (backoffLimit)
    for node in ("head", "w1", "w2"):
        cluster.kill(node)
    lost_at = max(_steps(services, "headless"))
    follow = user.output(run, 120)
    assert run.returncode != 0, follow[-2000:]  # the user's `submit --follow` lost its job
    cluster.stop()
    started = time.monotonic()
    holder["cluster"] = cluster = Cluster.start(net, services, cluster.node_env)
    new_head_s = time.monotonic() - started
    new_head_at = time.time()
    user = User(tmp_path / "user", services, cluster)  # the new cluster's token
    result = user.run(
        "submit", "quickstart", "--address", cluster.job_server, "--follow", "--name", "headless", *sets
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "resuming run 'headless' from" in result.stdout
    resumed_from = int(re.search(r"resuming at epoch \d+, step (\d+)", result.stdout).group(1))
    tracked = _tracked(services, "headless")  # one MLflow run, as before the loss
    assert tracked.info.status == "FINISHED"
    _assert_every_step_once(services, "headless", epochs=8)
    history = _client(services).get_metric_history(tracked.info.run_id, "train/step_loss")
    first_new = min(m.timestamp for m in history if m.step > lost_at) / 1000
    repeated = lost_at - resumed_from
    print(
        f"head lost after step {lost_at}; resumed from the checkpoint of step {resumed_from}: {repeated} "
        f"steps trained again (a checkpoint every 2); new cluster up in {new_head_s:.0f} s, first new "
        f"step {first_new - new_head_at:.0f} s after it"
    )
    assert 0 <= repeated <= 2
