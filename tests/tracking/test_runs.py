"""Runs found by name in a real MLflow store (SQLite), whatever the name holds, and the registered
model's own checks: the pyfunc model refuses what serving refuses."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import save_file

from pipeline.config import load_job, to_dict
from pipeline.models import create_model
from pipeline.tracking import registry, runs, runs_named

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
