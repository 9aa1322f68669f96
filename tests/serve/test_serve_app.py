"""Serving with Ray Serve over real HTTP: a model trained by a short job answers real JPEGs with
the same top-1 class and probability as offline evaluation of the same files (train/serve
parity); every bad input gets its 4xx JSON error while the replica stays healthy; overload gets
a quick 503; a promotion during a stream of requests switches versions without failing one; the
`deploy` command itself refuses a taken port and stops cleanly on SIGTERM, loading or serving."""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pytest
import timm
import torch
from conftest import damaged_huffman_marker, open_inference_answers, small_job
from PIL import Image
from safetensors.torch import load_file

from pipeline.cluster import serving
from pipeline.cluster.launch import submit
from pipeline.data.index import load_index
from pipeline.data.loader import build_loader
from pipeline.serve.client import TOKEN_ENV, post
from pipeline.serve.settings import Settings
from pipeline.system import free_port
from pipeline.tracking import registry
from pipeline.train import checkpoint

pytestmark = pytest.mark.ray
TOKEN = "a-test-token"


@pytest.fixture(scope="module")
def served(ray_session, prepared_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """A short job's model, promoted and deployed (bearer token on); yields (url, job, run)."""
    from ray import serve

    folder = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setenv(TOKEN_ENV, TOKEN)
        job = small_job(prepared_dataset, 2, "optim.warmup_epochs=0", "optim.lr_per_256=2.0")
        run = submit(job, "served")
        assert run.finished, run.error
        registry.promote("served")
        port = free_port()
        settings = Settings(
            model="resnet50@champion", cpus_per_replica=1, max_batch_size=4, batch_wait_ms=10,
            max_ongoing_requests=4, max_queued_requests=4, max_body_bytes=2 * 2**20, max_pixels=4_000_000,
            reload_check_s=0.5,
        )  # fmt: skip
        url = serving.start(settings, port=port)
        yield url, job, run
        serve.shutdown()


def _post(url: str, body: bytes, content_type: str = "image/jpeg") -> tuple[int, dict]:
    return post(url, body, content_type)  # with the bearer token from TOKEN_ENV


def _multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "resnet-pipe-test-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + body
        + b"\r\n"
        for name, body in files
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _champion() -> str:
    """The version resnet50@champion points at now: what the served app answers with, whichever
    tests ran before (the promotion test moves it, then moves it back)."""
    return str(registry.serving_version("resnet50@champion")[0].version)


def _healthy(url: str) -> dict:
    request = urllib.request.Request(f"{url}/health", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200
        return json.loads(answer.read())


def _ports_shared_by_ray_processes() -> dict[int, set[int]]:
    """Listening ports that more than one of Ray's processes (`ray::` in their title: Serve's
    proxies and replicas among them) holds, with their pids."""
    import psutil

    holders: dict[int, set[int]] = {}
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid:
            try:
                if psutil.Process(c.pid).cmdline()[0].startswith("ray::"):
                    holders.setdefault(c.laddr.port, set()).add(c.pid)
            except (psutil.NoSuchProcess, IndexError):
                pass
    return {port: pids for port, pids in holders.items() if len(pids) > 1}


def test_served_answers_match_offline_evaluation(served, prepared_dataset: Path) -> None:
    url, job, _ = served
    index = load_index(prepared_dataset)
    champion = _champion()

    # offline: the registered weights over the validation loader, per file
    folder = Path(mlflow.artifacts.download_artifacts("models:/resnet50@champion")) / "artifacts"
    model = timm.create_model(job.model.arch, num_classes=len(index.classes))
    model.load_state_dict(load_file(folder / "model.safetensors"))
    model.eval()
    offline = {}
    with torch.inference_mode():
        for images, _, ids in build_loader(job, index, "val"):
            for sample, row in zip(ids.tolist(), model(images).softmax(dim=1)):
                offline[index.files("val")[sample]] = (int(row.argmax()), float(row.max()))

    files = index.files("val")
    for name in files:
        status, answer = _post(f"{url}/predict", (prepared_dataset / name).read_bytes())
        assert status == 200, answer
        best = answer["predictions"][0]
        assert best["class_index"] == offline[name][0]
        assert (answer["model"], answer["version"]) == ("resnet50", champion)
        assert best["probability"] == pytest.approx(offline[name][1], abs=1e-4)
        assert best["wnid"] == index.classes[best["class_index"]]

    body, kind = _multipart([(name, (prepared_dataset / name).read_bytes()) for name in files[:6]])
    status, answer = _post(f"{url}/predict/batch", body, kind)
    assert status == 200, answer
    batched = [r["predictions"][0]["class_index"] for r in answer["results"]]
    assert batched == [offline[name][0] for name in files[:6]]

    # the same through `resnet-pipe predict`: a table, and exit 1 when a file is refused
    garbage = prepared_dataset.parent / "not-an-image.jpg"
    garbage.write_bytes(b"not an image")
    good_file = str(prepared_dataset / files[0])
    command = [sys.executable, "-m", "pipeline.cli", "predict", good_file, str(garbage)]
    shown = subprocess.run([*command, "--url", url], capture_output=True, text=True, timeout=120)
    lines = shown.stdout.splitlines()
    assert shown.returncode == 1 and lines[1].split()[1] == index.classes[offline[files[0]][0]], shown
    assert "415" in lines[2] and f"resnet50/{champion}" in lines[1]

    described = json.loads(urllib.request.urlopen(f"{url}/openapi.json", timeout=30).read())
    assert {"/predict", "/predict/batch", "/health"} <= set(described["paths"])


def test_bad_requests_get_4xx_and_the_replica_stays_healthy(served, prepared_dataset: Path) -> None:
    url, _, _ = served
    good = (prepared_dataset / load_index(prepared_dataset).files("val")[0]).read_bytes()
    huge = io.BytesIO()
    Image.new("L", (2500, 2000)).save(huge, format="PNG")  # 5 M pixels in a few kB
    thin = io.BytesIO()
    Image.new("RGB", (60_000, 1)).save(thin, format="PNG")  # 73 px high once resized: 320 M pixels
    gif = io.BytesIO()
    Image.new("RGB", (40, 30)).save(gif, format="GIF")
    empty_form, form_kind = _multipart([])
    cases = {
        "not an image": (b"this is not an image" * 20, "image/jpeg", 415),
        "truncated": (good[: len(good) // 2], "image/jpeg", 400),
        "empty": (b"", "image/jpeg", 400),
        "wrong content type": (good, "text/plain", 415),
        "too many bytes": (np.random.default_rng(0).bytes(3 * 2**20), "image/jpeg", 413),
        "too many pixels": (huge.getvalue(), "image/png", 413),
        "too many pixels once resized": (thin.getvalue(), "image/png", 413),
        "unaccepted format": (gif.getvalue(), "image/gif", 415),
        "form without a file": (empty_form, form_kind, 400),
    }
    for case, (body, kind, expected) in cases.items():
        status, answer = _post(f"{url}/predict", body, kind)
        assert status == expected and answer["error"], (case, status, answer)

    body, kind = _multipart([("good.jpg", good), ("bad.jpg", good[:100])])  # one bad image in a batch
    status, answer = _post(f"{url}/predict/batch", body, kind)
    assert status == 200 and answer["results"][0]["predictions"] and answer["results"][1]["status"] == 400

    # passes every check (PIL decodes it) but DALI rejects it, and a DALI pipeline that failed
    # once fails every later call: the replica must answer the others, and the next requests
    damaged = damaged_huffman_marker(good)
    files = [("good.jpg", good), ("damaged.jpg", damaged), ("good-too.jpg", good)]
    status, answer = _post(f"{url}/predict/batch", *_multipart(files))
    assert status == 200 and [r.get("status") for r in answer["results"]] == [None, 400, None], answer
    assert "could not be decoded" in answer["results"][1]["error"]
    status, answer = _post(f"{url}/predict", good)
    assert status == 200 and answer["predictions"], answer

    no_token = urllib.request.Request(f"{url}/predict", data=good, headers={"Content-Type": "image/jpeg"})
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(no_token, timeout=30)

    # beyond the ongoing and queued requests the front takes (4 + 4): quick 503s, the rest answered
    def one(_) -> tuple[int, float]:
        start = time.monotonic()
        status, _ = _post(f"{url}/predict", good)
        return status, time.monotonic() - start

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(32)))
    statuses = [status for status, _ in answers]
    assert set(statuses) == {200, 503} and statuses.count(200) >= 8, statuses
    assert max(seconds for status, seconds in answers if status == 503) < 5.0

    assert _healthy(url)["status"] == "ok"
    status, answer = _post(f"{url}/predict", good)
    assert status == 200 and answer["version"] == _champion()


def test_a_promotion_mid_stream_switches_versions_without_failing_a_request(served, prepared_dataset) -> None:
    url, job, run = served
    image = (prepared_dataset / load_index(prepared_dataset).files("val")[0]).read_bytes()
    answers, stop = [], threading.Event()

    def stream() -> None:
        while not stop.is_set():
            answers.append(_post(f"{url}/predict", image))

    streaming = threading.Thread(target=stream)
    streaming.start()
    try:
        time.sleep(2)
        first = _champion()
        best = checkpoint.best(run.run_dir)
        state = checkpoint.load(best)
        second = str(
            registry.register(run.mlflow_run_id, state, str(best), job, load_index(prepared_dataset)).version
        )
        registry.promote(f"resnet50/{second}", force=True)  # the same weights: forced
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(a[1].get("version") == second for a in answers[-3:]):
            time.sleep(0.2)
        time.sleep(1)
    finally:
        stop.set()
        streaming.join()
    assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
    versions = [answer["version"] for _, answer in answers]
    switch = versions.index(second)
    assert switch > 0 and set(versions[:switch]) == {first} and set(versions[switch:]) == {second}
    assert _healthy(url)["version"] == second

    # and back, so that the tests after this one find the fixture as it was
    registry.rollback("resnet50")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _healthy(url)["version"] != first:
        time.sleep(0.2)
    assert _healthy(url)["version"] == first


def test_the_port_is_haproxys_in_front_of_replicas_that_answer_http(served) -> None:
    # Ray Serve's HAProxy mode (pipeline.cluster.launch.LOCAL_RAY_ENV), not its Python proxy, which relays
    # each request and its body to the replica through Ray calls
    import psutil

    url, _, _ = served
    port = int(url.rsplit(":", 1)[1])
    listening = {
        c.laddr.port: (psutil.Process(c.pid).name(), c.laddr.ip)
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.pid
    }
    assert listening[port] == ("haproxy", "127.0.0.1")  # loopback, as deploy's --host defaults
    assert _healthy(url)["status"] == "ok"


def test_the_cluster_config_builds_the_same_app_and_requires_a_token(monkeypatch) -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from deploy.serve_app import app

    config = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "serve-config.yaml").read_text())
    ServeDeploySchema(**config)  # what `serve deploy` validates
    (spec,) = config["applications"]
    assert spec["import_path"] == "deploy.serve_app:app"
    # it listens beyond loopback, so it asks for a token and refuses to start without one
    assert config["http_options"]["host"] == "0.0.0.0" and spec["args"]["require_token"] is True
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match=f"{TOKEN_ENV} is not in the environment"):
        app(spec["args"])
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    deployment = app(spec["args"])._bound_deployment
    assert deployment._deployment_config.autoscaling_config.max_replicas == spec["args"]["max_replicas"]
    assert deployment.ray_actor_options["num_gpus"] == spec["args"]["gpus_per_replica"]
    assert deployment.ray_actor_options["runtime_env"]["env_vars"][TOKEN_ENV] == TOKEN


class _Deploy:
    """`resnet-pipe deploy` as a process, its output (stdout and stderr) read as it comes."""

    def __init__(self, *args: str) -> None:
        command = [sys.executable, "-m", "pipeline.cli", "deploy", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.seen: dict[str, threading.Event] = {}
        self.reader = threading.Thread(target=self._read)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            for text, event in list(self.seen.items()):
                if text in line:
                    event.set()

    def wait_for(self, text: str, timeout_s: float) -> None:
        event = self.seen.setdefault(text, threading.Event())
        if not any(text in line for line in self.lines):
            assert event.wait(timeout_s), self.tail()

    def sigterm(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self.reader.join()
        return code

    def close(self) -> None:  # after a failure: nothing left running
        if self.process.poll() is None:
            self.process.kill()
        self.reader.join()

    def tail(self) -> str:
        return "".join(self.lines[-20:])


def test_the_deploy_command_serves_until_sigterm_then_stops_cleanly(served) -> None:
    # `resnet-pipe deploy` as a user (or systemd, Kubernetes, `docker stop`) runs and stops it: a
    # process of its own that starts its own local Ray (HAProxy and all, beside the fixture's);
    # the fixture's store is in this folder
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["resnet50/1", "--no-compile", "--port", str(port), "--cpus-per-replica", "1"]

    # SIGTERM while the replica loads: a clean stop as well, HAProxy and all (it used to end in
    # Ray's sys.exit, the app never shut down)
    starting = _Deploy(*args)
    try:
        starting.wait_for("Adding 1 replica to Deployment(name='Classifier'", 240)
        code = starting.sigterm()
    finally:
        starting.close()
    assert code == 0, starting.tail()
    assert "stopped\n" in starting.lines, starting.tail()
    assert not any("SIGTERM received" in line for line in starting.lines), starting.tail()  # Ray's abort
    assert not any(line.startswith("serving resnet50") for line in starting.lines)
    serving.check_port_free("127.0.0.1", port)  # raises if anything still holds it

    taken = served[0].rsplit(":", 1)[1]  # the fixture's HAProxy holds it: refused before Ray starts
    refused = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "deploy", "resnet50/1", "--port", taken],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and f"cannot listen on 127.0.0.1:{taken}" in refused.stderr
    assert "(by haproxy, pid" in refused.stderr

    deployed = _Deploy(*args)
    try:
        deployed.wait_for("serving resnet50 version 1", 240)
        # Two deployments side by side, each answered by its own model only. Serve's fallback
        # proxy, where HAProxy sends a request while no replica is up, once listened on 8500 in
        # every Ray, with SO_REUSEPORT: the two shared it, and the first answer here came from
        # the fixture's replica (version 2, after the promotion test)
        assert not _ports_shared_by_ray_processes()
        assert _healthy(url)["version"] == "1"
        ours = {_healthy(url)["replica"] for _ in range(20)}
        theirs = {_healthy(served[0])["replica"] for _ in range(5)}
        assert len(ours) == 1 and not ours & theirs, (ours, theirs)
        code = deployed.sigterm()
    finally:
        deployed.close()
    assert code == 0, deployed.tail()
    assert "stopped\n" in deployed.lines and not any("SIGTERM received" in line for line in deployed.lines)
    with pytest.raises(OSError):  # nothing answers on the port any more
        urllib.request.urlopen(f"{url}/health", timeout=5)
    # and a new deploy may take it at once: the requests' closed connections (TIME_WAIT, a
    # minute) once made the check refuse it
    serving.check_port_free("127.0.0.1", port)


def _preprocessed(job, images: list[bytes]) -> np.ndarray:
    """The evaluation transform of `images` on this machine: what a client that preprocesses
    itself sends as the FP32 input."""
    from pipeline.serve.inference import Preprocess

    return Preprocess(job, len(images), torch.device("cpu"), threads=1)(images).numpy()


def test_tritonclient_and_mlflows_client_get_the_answers_of_predict(served, prepared_dataset: Path) -> None:
    import pandas as pd
    import tritonclient.http as triton
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    url, job, _ = served
    index = load_index(prepared_dataset)
    images = [(prepared_dataset / f).read_bytes() for f in index.files("val")[:8]]
    direct = [_post(f"{url}/predict", image)[1]["predictions"][0] for image in images]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("resnet50")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    described = client.get_model_metadata("resnet50", _champion())
    assert described["outputs"][0]["shape"] == [-1, len(index.classes)]
    assert described["platform"] == "onnxruntime_onnx"  # a CPU's default runtime

    for count in (1, 8):  # one image, and a batch
        by_image, by_tensor = open_inference_answers(
            url, "resnet50", images[:count], _preprocessed(job, images[:count]), auth
        )  # fmt: skip
        for answers in (by_image, by_tensor):
            assert answers.argmax(1).tolist() == [d["class_index"] for d in direct[:count]]
            assert np.allclose(answers.max(1), [d["probability"] for d in direct[:count]], atol=1e-4)

    encoded = triton.InferInput("image", [2], "BYTES")  # in JSON: base64 text, an image being no UTF-8
    as_text = [base64.b64encode(i).decode() for i in images[:2]]
    encoded.set_data_from_numpy(np.array(as_text, dtype=np.object_), binary_data=False)
    top = triton.InferRequestedOutput("probabilities", binary_data=False, class_count=2)
    # a dict of its own: tritonclient writes the binary requests' header length into the one it is given
    labels = client.infer("resnet50", [encoded], outputs=[top], headers=dict(auth)).as_numpy("probabilities")
    assert [str(row[0]).split(":")[1] for row in labels] == [str(d["class_index"]) for d in direct[:2]]

    scoring = ScoringServerClient("127.0.0.1", int(url.rsplit(":", 1)[1]))
    scoring.ping()
    frame = pd.DataFrame({"image": [base64.b64encode(i).decode() for i in images[:3]]})
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps({"dataframe_split": frame.to_dict(orient="split")}).encode(),
        headers={"Content-Type": "application/json"} | auth,
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as answer:
        rows = json.loads(answer.read())["predictions"]
    assert [r["class_index"] for r in rows] == [d["class_index"] for d in direct[:3]]
    assert json.loads(rows[0]["top_k"])[0]["name"] == direct[0]["name"]


# KServe's Python SDK in a virtual environment of its own (`make test` builds it): its pins
# (psutil<6, pandas<3) would downgrade what Ray and MLflow need in the project's
KSERVE_PYTHON = Path(__file__).resolve().parents[2] / ".venv-kserve" / "bin" / "python"


@pytest.mark.skipif(not KSERVE_PYTHON.exists(), reason="no .venv-kserve: `make test` builds it")
def test_kserves_rest_client_gets_predicts_answers(served, prepared_dataset: Path, tmp_path: Path) -> None:
    """KServe's `InferenceRESTClient` (v2): FP32 tensors in the binary extension and in JSON, and
    encoded images as BYTES, each with /predict's class and probability."""
    url, job, _ = served
    index = load_index(prepared_dataset)
    files = [prepared_dataset / f for f in index.files("val")[:4]]
    images = [f.read_bytes() for f in files]
    direct = [_post(f"{url}/predict", image)[1]["predictions"][0] for image in images]
    np.save(tmp_path / "tensors.npy", _preprocessed(job, images))
    client = Path(__file__).with_name("kserve_client.py")
    result = subprocess.run(
        [str(KSERVE_PYTHON), str(client), url, "resnet50", str(tmp_path / "tensors.npy"), *map(str, files)],
        capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", TOKEN_ENV: TOKEN},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout)
    assert sorted(answers) == ["image_binary", "tensor_binary", "tensor_json"]
    for kind, rows in answers.items():
        rows = np.array(rows)
        assert rows.argmax(1).tolist() == [d["class_index"] for d in direct], kind
        assert np.allclose(rows.max(1), [d["probability"] for d in direct], atol=1e-4), kind


def _raw(url: str, body: bytes, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Authorization": f"Bearer {TOKEN}"} | headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_bad_requests_to_the_new_routes_get_4xx_json_and_the_replica_stays_healthy(served) -> None:
    url, job, _ = served
    model = f"{url}/v2/models/resnet50"
    crop = job.data.val_crop_px
    as_json = {"Content-Type": "application/json"}

    def tensor(datatype="FP32", shape=(1, 3, crop, crop), data=None) -> bytes:
        data = data if data is not None else [0.0] * int(np.prod(shape))
        return json.dumps(
            {"inputs": [{"name": "input", "datatype": datatype, "shape": list(shape), "data": data}]}
        ).encode()

    header = json.dumps(
        {
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 99}}
            ]
        }
    ).encode()

    def length(size: int) -> dict:
        return {"Inference-Header-Content-Length": str(size)}

    many = json.dumps(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [10_000], "data": ["AA=="] * 10_000}]}
    )
    many, scoring_many = many.encode(), json.dumps({"inputs": ["AA=="] * 10_000}).encode()
    cases = {
        "wrong datatype": (f"{model}/infer", tensor("INT8"), as_json, 400),
        "wrong shape": (f"{model}/infer", tensor(shape=(1, 3, crop + 1, crop)), as_json, 400),
        "NaN": (f"{model}/infer", tensor(data=[float("nan")] * 3 * crop * crop), as_json, 400),
        "a lying binary_data_size": (f"{model}/infer", header + b"\x03\0\0\0abc", length(len(header)), 400),
        "a header length past the body": (f"{model}/infer", header, length(100_000), 400),
        "no item": (f"{model}/infer", tensor(shape=(0, 3, crop, crop)), as_json, 400),
        "10,000 items": (f"{model}/infer", many, as_json, 413),
        "unknown model": (f"{url}/v2/models/resnet9/infer", tensor(), as_json, 404),
        "unknown version": (f"{model}/versions/999/infer", tensor(), as_json, 404),
        "a body over the limit": (f"{model}/infer", b"{" + b" " * (16 * 2**20 + 10) + b"}", as_json, 413),
        "scoring: not JSON": (f"{url}/invocations", b"<xml/>", as_json, 400),
        "scoring: no input": (f"{url}/invocations", b'{"inputs": []}', as_json, 400),
        "scoring: 10,000 items": (f"{url}/invocations", scoring_many, as_json, 413),
        "scoring: a wrong content type": (f"{url}/invocations", b"x", {"Content-Type": "text/csv"}, 415),
        "scoring: not an image": (f"{url}/invocations", b'{"instances": ["bm90IGFu"]}', as_json, 415),
    }  # fmt: skip
    for case, (where, body, headers, expected) in cases.items():
        status, answer = _raw(where, body, headers)
        assert status == expected and answer.get("error"), (case, status, answer)
    assert _healthy(url)["status"] == "ok"
    status, _ = _raw(f"{model}/infer", tensor(), as_json)
    assert status == 200
