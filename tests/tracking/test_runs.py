"""Runs found by name in a real MLflow store (SQLite), whatever the name holds, and the registered
model's own checks: the pyfunc model refuses what serving refuses."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import save_file

from pipeline.config import load_job, to_dict
from pipeline.models import create_model
from pipeline.tracking import registry, runs, runs_named, tracking_uri
from pipeline.tracking.plots import accuracy_against_time

NAMES = ["plain", "it's", 'say "hi"', "both ' and \"", "back\\slash"]


@pytest.fixture
def store(workdir: Path) -> MlflowClient:
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.create_experiment("quoted")
    for name in NAMES:
        client.create_run(experiment, run_name=name)
    return client


@pytest.mark.parametrize("name", NAMES)
def test_a_run_is_found_by_its_name_whatever_quotes_it_holds(store: MlflowClient, name: str) -> None:
    (found,) = runs_named(store, name)
    assert found.info.run_name == name
    assert runs.find_run(store, name).info.run_id == found.info.run_id
    with pytest.raises(registry.RegistryError, match="neither MODEL/VERSION nor a run"):
        registry.resolve(store, name)  # found, but it registered no model: a clear error


def test_an_unknown_name_with_quotes_is_a_clear_error(store: MlflowClient) -> None:
    with pytest.raises(runs.RunsError, match="no run named"):
        runs.find_run(store, 'nobody\'s "run"')


def _thin_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (60_000, 1)).save(out, format="PNG")  # 256 x 15 million pixels once resized
    return out.getvalue()


def test_the_registered_model_refuses_what_serving_refuses(tmp_path: Path) -> None:
    import importlib.util

    job = load_job("quickstart")
    weights, job_file, classes = (
        tmp_path / "model.safetensors",
        tmp_path / "job.json",
        tmp_path / "classes.tsv",
    )
    save_file(create_model(job.model.arch, num_classes=2).state_dict(), weights)
    job_file.write_text(json.dumps(to_dict(job)))
    classes.write_text("0\tn01\tone\n1\tn02\ttwo\n")
    spec = importlib.util.spec_from_file_location("mlflow_model", registry.MODEL_CODE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.ResNetClassifier()
    artifacts = {"weights": str(weights), "job": str(job_file), "classes": str(classes)}
    model.load_context(type("Context", (), {"artifacts": artifacts})())

    small = io.BytesIO()
    Image.new("RGB", (90, 70), (200, 30, 30)).save(small, format="JPEG")
    answer = model.predict(None, pd.DataFrame({"image": [small.getvalue()]}))
    assert answer["wnid"].iloc[0] in ("n01", "n02")
    for bad, message in [
        (_thin_png(), "too long and thin"),
        (b"not an image", "not an image"),
        (b"", "empty"),
    ]:
        with pytest.raises(MlflowException, match=message) as refused:
            model.predict(None, pd.DataFrame({"image": [small.getvalue(), bad]}))
        assert refused.value.error_code == "INVALID_PARAMETER_VALUE" and "image 1" in str(refused.value)


def test_the_bench_models_registration_prints_nothing(prepared_dataset: Path, workdir: Path, capfd) -> None:
    from pipeline.bench.serve import _bench_model

    model = _bench_model(prepared_dataset)
    assert model == "resnet50/1"
    out, err = capfd.readouterr()
    for noise in ("registered", "Created version", "Downloading artifacts", "integer column"):
        assert noise not in out + err, (noise, out + err)


def test_runs_plot_draws_each_run_at_its_evaluations_wall_clock(workdir: Path) -> None:
    client = MlflowClient(tracking_uri())
    experiment = client.create_experiment("timed")
    drawn = {}
    for name, target, top1, clock in (
        ("fast", "0.876", {1: 0.70, 3: 0.88}, {0: 60.0, 1: 120.0, 2: 180.0, 3: 240.0}),
        ("paper", "0.9125", {0: 0.5, 2: 0.8}, {0: 600.0, 2: 1800.0}),
    ):
        run_id = client.create_run(experiment, run_name=name).info.run_id
        client.log_param(run_id, "target_top1", target)
        metrics = [Metric("val/top1", v, 0, s) for s, v in top1.items()]
        client.log_batch(run_id, metrics=metrics + [Metric("elapsed_s", v, 0, s) for s, v in clock.items()])
        drawn[name] = [(clock[s] / 60, v) for s, v in top1.items()]
    axis = accuracy_against_time(client, [runs.find_run(client, n).info.run_id for n in drawn]).axes[0]
    lines = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in axis.get_lines()}
    assert lines["fast"] == drawn["fast"] and lines["paper"] == drawn["paper"]  # minutes, by epoch
    assert {"target 0.876", "target 0.9125"} <= lines.keys()
    assert axis.get_xlim()[0] == 0  # the clock from the run's start, not from its first evaluation

    written = cli("runs", "plot", "fast", "paper", "--out", "time.png", cwd=workdir)
    assert written.returncode == 0, written.stderr
    assert (workdir / "time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    odd = cli("runs", "plot", "fast", "--out", "time.xyz", cwd=workdir)
    assert odd.returncode == 2 and ".png" in odd.stderr and not (workdir / "time.xyz").exists()
    unknown = cli("runs", "plot", "fast", "no-such-run", cwd=workdir)
    assert unknown.returncode == 2 and "no run named" in unknown.stderr and "Traceback" not in unknown.stderr
    client.create_run(experiment, run_name="started")  # nothing evaluated yet
    empty = cli("runs", "plot", "started", cwd=workdir)
    assert empty.returncode == 2 and "no evaluation" in empty.stderr
    bare = cli("runs", "plot", cwd=workdir)
    assert bare.returncode == 2 and "one or more runs" in bare.stderr
