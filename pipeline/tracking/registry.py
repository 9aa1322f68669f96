"""The MLflow model registry: a finished run's best weights become a model version, and the
`champion` alias moves only to a version that beats the current champion.

    version = register(run_id, state, source, job, index)  # a scored checkpoint (the driver)
    promote("resnet50/3")                              # the gate: better val/top1, same dataset hash
    promote("my-run", force=True)                      # past the gate, and says so
    rollback("resnet50")                               # the previous champion again

Model name = the architecture (`resnet50`). Each version carries the tags `val/top1`,
`dataset_hash`, `run_id` and `checkpoint` (the full training checkpoint it came from). The
registered model's tag `champion_history` lists the versions that held the alias, oldest
first, so that a rollback knows where to go back to.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, Schema
from PIL import Image
from safetensors.torch import save_file

from pipeline.config import Job, to_dict
from pipeline.data.contract import MEAN_IMAGE, contract
from pipeline.data.index import Index
from pipeline.data.memory import has_pixels, load_pixels, training_mean
from pipeline.data.shards import first_image
from pipeline.tracking import quiet_mlflow, runs_named, tracking_at, tracking_uri
from pipeline.tracking.plots import log_class_errors, log_plots

CHAMPION = "champion"
PREPROCESSING_TAG = "preprocessing"  # the version's evaluation transform (pipeline.data.contract), JSON
HISTORY_TAG = "champion_history"
WEIGHTS_TAG = "weights_sha256"  # of the version's model.safetensors: a corrupt copy is refused
MODEL_CODE = Path(__file__).resolve().parents[2] / "deploy" / "mlflow_model.py"


class RegistryError(ValueError):
    """A promotion or rollback that cannot be done: unknown run or version, refused by the gate."""


@dataclass(frozen=True)
class Promotion:
    name: str
    version: str
    previous: str | None
    message: str


def publish(run_id: str, state: dict, source: str, job: Job, index: Index) -> ModelVersion:
    """The end of a finished run: its plots, then `register`.

    Raises:
        RegistryError: MLflow refused or could not be reached (the trained run stands).
    """
    try:
        log_plots(run_id)
        return register(run_id, state, source, job, index)
    except MlflowException as e:
        raise RegistryError(str(e)) from e


# What the registered model answers per image (deploy/mlflow_model.py), declared rather than
# inferred from an example: inference warns about integer columns, a warning the user can do
# nothing about.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.binary, "image")]),
    outputs=Schema([
        ColSpec(DataType.long, "class_index"), ColSpec(DataType.string, "wnid"),
        ColSpec(DataType.string, "name"), ColSpec(DataType.double, "probability"),
        ColSpec(DataType.string, "top_k"),
    ]),
)  # fmt: skip


# What the registered model needs to load and answer (deploy/mlflow_model.py and the `pipeline`
# package it carries), at the versions that trained it. Declared: MLflow's inference loads the
# model in a subprocess to see what it imports (9 s a registration on 2 cores) and, the model's
# code being a file of its own, found mlflow, numpy and pandas but neither torch nor timm.
SERVING_PACKAGES = ("mlflow", "torch", "torchvision", "timm", "safetensors", "pillow", "numpy", "pandas")


def pip_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in SERVING_PACKAGES]


def register(run_id: str, state: dict, source: str, job: Job, index: Index) -> ModelVersion:
    """Registers a scored training checkpoint under the architecture's name.

    Logs its weights (`weights/model.safetensors`; the EMA's when they scored better) to the
    run, then the same as a pyfunc model (weights as safetensors, the job, the classes;
    `deploy/mlflow_model.py`) with its signature and an input example.

    Args:
        state: the checkpoint, as `pipeline.train.checkpoint.load` reads it (its "metrics" hold
            val/top1).
        source: where the checkpoint lives, for the tag `checkpoint` (the full training state).
    """
    top1, chosen = state["metrics"]["val/top1"], "model"
    if state.get("ema") is not None and state["metrics"].get("val/ema_top1", -1.0) > top1:
        top1, chosen = state["metrics"]["val/ema_top1"], "ema"  # the EMA model scored better
    weights = state[chosen]
    per_class = state.get("per_class") or {}  # absent from mid-epoch checkpoints
    if chosen in per_class:
        log_class_errors(run_id, per_class[chosen], index.classes, index.names)
    with tempfile.TemporaryDirectory() as tmp, tracking_at(tracking_uri()):
        artifacts = {
            "weights": Path(tmp) / "model.safetensors",
            "job": Path(tmp) / "job.json",
            "classes": Path(tmp) / "classes.tsv",
        }
        save_file({k: v.contiguous() for k, v in weights.items()}, artifacts["weights"])
        client = MlflowClient(tracking_uri())
        client.log_artifact(run_id, str(artifacts["weights"]), artifact_path="weights")  # plain tensors
        client.set_tag(run_id, "checkpoint", source)  # the full training state they came from
        artifacts["job"].write_text(json.dumps(to_dict(job), indent=1))
        classes = (index.root / "index" / "classes.tsv").read_text()
        artifacts["classes"].write_text(classes, encoding="utf-8")
        preprocessing = contract(job.data)
        if job.data.normalize == "pixel_mean":  # the mean the model was trained against travels with it
            artifacts["mean_image"] = Path(tmp) / MEAN_IMAGE
            np.save(artifacts["mean_image"], training_mean(job.data, index))
        example = pd.DataFrame({"image": [_example_image(index)]})
        with quiet_mlflow(), mlflow.start_run(run_id=run_id, log_system_metrics=False):
            logged = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                artifacts={k: str(v) for k, v in artifacts.items()},
                code_paths=[str(Path(__file__).resolve().parents[1])],  # the `pipeline` package
                signature=SIGNATURE,
                input_example=example,
                pip_requirements=pip_requirements(),
            )
        tags = {"val/top1": f"{top1:.6f}", "dataset_hash": index.dataset_hash, "run_id": run_id,
                "checkpoint": source, PREPROCESSING_TAG: json.dumps(preprocessing),
                WEIGHTS_TAG: hashlib.sha256(artifacts["weights"].read_bytes()).hexdigest()}  # fmt: skip
        with quiet_mlflow():  # "Successfully registered model ...": the caller says what happened
            return mlflow.register_model(logged.model_uri, job.model.arch, tags=tags)


def _example_image(index: Index) -> bytes:
    """A validation image: its file; where the dataset has no image files (CIFAR's python
    release, or pixel arrays uploaded to an object store), its first validation image as a PNG;
    where it holds shards only, the first image of the first validation shard."""
    image = index.root / index.files("val")[0]
    if image.is_file():
        return image.read_bytes()
    if has_pixels(index.root, "val"):
        encoded = io.BytesIO()
        Image.fromarray(load_pixels(index.root, "val", index.dataset_hash)[0]).save(encoded, format="PNG")
        return encoded.getvalue()
    return first_image(index.root, "val")


def version_of_run(run_id: str) -> ModelVersion | None:
    """The newest model version that run `run_id` registered; None when it registered none."""
    versions = MlflowClient(tracking_uri()).search_model_versions(f"run_id = '{run_id}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def resolve(client: MlflowClient, target: str) -> ModelVersion:
    """`MODEL/VERSION`, or a run (name or id) whose registered version is wanted."""
    name, _, number = target.partition("/")
    if number:
        try:
            return client.get_model_version(name, number)
        except MlflowException:
            raise RegistryError(f"no model version {target} in the registry") from None
    runs = [target] if _is_run_id(client, target) else _run_ids_named(client, target)
    for run_id in runs:
        versions = client.search_model_versions(f"run_id = '{run_id}'")
        if versions:
            return max(versions, key=lambda v: int(v.version))
    raise RegistryError(
        f"'{target}' is neither MODEL/VERSION nor a run with a registered model version "
        "(a run registers its best checkpoint when it finishes)"
    )


def promote(target: str, force: bool = False) -> Promotion:
    """Moves `champion` of the target's model to it when it beats the current champion's
    val/top1 on the same dataset hash, or whatever the comparison when `force`.

    Raises:
        RegistryError: unknown target, or refused by the gate (the message says why).
    """
    client = MlflowClient(tracking_uri())
    candidate = resolve(client, target)
    name, label = candidate.name, f"{candidate.name}/{candidate.version}"
    current = champion(client, name)
    if current is not None and str(current.version) == str(candidate.version):
        raise RegistryError(f"{label} is already the {CHAMPION}")
    forced = ""
    if current is not None:
        verdict = _gate(candidate, current)
        if verdict and not force:
            raise RegistryError(f"{label} not promoted: {verdict} (--force promotes it anyway)")
        forced = f" (forced past the gate: {verdict})" if verdict else ""
    client.set_registered_model_alias(name, CHAMPION, candidate.version)
    history = _history(client, name) + [str(candidate.version)]
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))
    previous = current.version if current is not None else None
    was = f", was version {previous}" if previous else ""
    message = f"{label} is now {name}@{CHAMPION} (val/top1 {candidate.tags.get('val/top1')}{was}){forced}"
    return Promotion(name, candidate.version, previous, message)


def rollback(name: str) -> Promotion:
    """Moves `champion` back to the version that held it before the current one."""
    client = MlflowClient(tracking_uri())
    history = _history(client, name)
    if len(history) < 2:
        raise RegistryError(f"{name} has no previous {CHAMPION} to roll back to")
    current, previous = history[-1], history[-2]
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[:-1]))
    message = f"{name}@{CHAMPION} is version {previous} again (was {current})"
    return Promotion(name, previous, current, message)


def serving_version(target: str | None) -> tuple[ModelVersion, str | None]:
    """The model version to serve, and the alias it follows (None: a fixed version).

    `target`: MODEL@ALIAS, MODEL (its champion), MODEL/VERSION, or a run (name or id); None: the
    champion of the most recently updated model that has one.

    Raises:
        RegistryError: nothing to serve (says what to do).
    """
    client = MlflowClient(tracking_uri())
    if target is None:
        models = sorted(client.search_registered_models(), key=lambda m: -(m.last_updated_timestamp or 0))
        name = next((m.name for m in models if CHAMPION in (m.aliases or {})), None)
        if name is None:
            raise RegistryError(
                f"no registered model has a {CHAMPION}: train a job (it registers its model), "
                "then `resnet-pipe promote RUN`, or name a version: MODEL/VERSION"
            )
        target = f"{name}@{CHAMPION}"
    name, at, alias = target.partition("@")
    if not at and "/" not in target and _is_model(client, target):
        alias = CHAMPION
    if alias:
        try:
            version = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            raise RegistryError(
                f"model '{name}' has no alias '{alias}' (resnet-pipe promote sets {CHAMPION})"
            ) from None
    else:
        version = resolve(client, target)
    _check_servable(client, version)
    return version, alias or None


def check_weights(name: str, version: str, weights: bytes, tags: dict[str, str]) -> None:
    """Raises RegistryError when `weights` (the version's model.safetensors) differ from the
    SHA-256 recorded when it was registered (versions from before the digest pass)."""
    recorded = tags.get(WEIGHTS_TAG)
    if recorded and hashlib.sha256(weights).hexdigest() != recorded:
        raise RegistryError(
            f"{name}/{version}: its weights (model.safetensors, {len(weights):,} bytes) do not match the "
            "SHA-256 recorded when it was registered: the artifact store holds a corrupt copy; register the "
            "run again (`resnet-pipe register RUN` after deleting this version) or serve another version"
        )


def _check_servable(client: MlflowClient, version: ModelVersion) -> None:
    """A model trained on images less their mean image (`data.normalize = "pixel_mean"`, the
    paper's CIFAR recipe) answers rightly only with that mean image, which versions registered
    before it was stored with them (no `preprocessing` tag) lack. A version whose weights in the
    artifact store differ from those registered is refused (`check_weights`)."""
    if WEIGHTS_TAG in version.tags:
        with tempfile.TemporaryDirectory(prefix="resnet-pipe-check-") as tmp:
            where = client.get_model_version_download_uri(version.name, version.version)
            source = f"{where}/artifacts/model.safetensors"
            try:
                fetched = Path(mlflow.artifacts.download_artifacts(source, dst_path=tmp))
            except (MlflowException, OSError) as e:
                raise RegistryError(
                    f"{version.name}/{version.version}: its weights could not be fetched ({e}): the artifact "
                    "store is unreachable, or the version's files are gone"
                ) from None
            check_weights(version.name, version.version, fetched.read_bytes(), version.tags)
    stored = PREPROCESSING_TAG in version.tags
    if not stored and client.get_run(version.run_id).data.params.get("data.normalize") == "pixel_mean":
        raise RegistryError(
            f"{version.name}/{version.version} was trained with data.normalize = 'pixel_mean' (the "
            "training set's mean image subtracted) and registered without that mean image, by an older "
            "resnet-pipe: register the run again (resubmit it under a new --name)"
        )


def _is_model(client: MlflowClient, name: str) -> bool:
    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False


def champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _gate(candidate: ModelVersion, current: ModelVersion) -> str:
    """Why `candidate` may not replace `current`; empty when it may."""
    if candidate.tags.get("dataset_hash") != current.tags.get("dataset_hash"):
        return (
            f"it was validated on another dataset (hash {candidate.tags.get('dataset_hash', '?')[:12]}) "
            f"than the {CHAMPION} ({current.tags.get('dataset_hash', '?')[:12]})"
        )
    new, old = float(candidate.tags.get("val/top1", "nan")), float(current.tags.get("val/top1", "nan"))
    if not new > old:
        return f"val/top1 {new:.4f} does not beat the {CHAMPION}'s {old:.4f} (version {current.version})"
    return ""


def _history(client: MlflowClient, name: str) -> list[str]:
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException:
        raise RegistryError(f"no registered model '{name}'") from None
    return [v for v in tags.get(HISTORY_TAG, "").split(",") if v]


def _is_run_id(client: MlflowClient, text: str) -> bool:
    try:
        client.get_run(text)
        return True
    except MlflowException:
        return False


def _run_ids_named(client: MlflowClient, run_name: str) -> list[str]:
    """The ids of the runs named `run_name`, newest first, in every experiment."""
    return [run.info.run_id for run in runs_named(client, run_name)]
