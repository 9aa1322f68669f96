"""Every file of `deploy/` passes the validator of its kind, offline, and a misspelt key in each
kind of file fails it:

- KubeRay's RayJob, RayService and RayCluster: KubeRay's own CRD schemas (kuberay-v1.7.0/, made
  strict: unknown fields refused), the enums they leave open, and the operator's rules;
- the standard kinds (Deployment, StatefulSet, Service): `kubernetes-validate` in strict mode;
- the cluster launcher's file: Ray's own `validate_config(prepare_config(...))`;
- the Serve config (and the RayService's copy of it): Ray Serve's schema, and the app's Settings;
- the Dockerfile: hadolint.
"""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipeline.cli.main import submit
from pipeline.config import load_job
from pipeline.serve.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SCHEMAS = Path(__file__).resolve().parent / "kuberay-v1.7.0"
KUBERAY = {"RayJob": "rayjob", "RayService": "rayservice", "RayCluster": "raycluster"}
KUBERNETES_VERSION = "1.37.0"
MAX_NAME = 47  # KubeRay's validation.go: names of Ray resources, for the names derived from them


def _documents() -> list[tuple[str, dict]]:
    found = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        found += [(f"{path.name}:{doc['kind']}", doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever an object lists its properties."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        open_ended = "additionalProperties" in schema or schema.get("x-kubernetes-preserve-unknown-fields")
        if "properties" in schema and not open_ended:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


STRICT = {
    kind: _strict(json.loads((SCHEMAS / f"{name}.v1.json").read_text())) for kind, name in KUBERAY.items()
}


def _operator_rules(doc: dict) -> list[str]:
    """What KubeRay's operator refuses that its schemas let through, and this project's own rules."""
    problems, spec = [], doc["spec"]
    if len(doc["metadata"]["name"]) > MAX_NAME:
        problems.append(f"name longer than {MAX_NAME} characters")
    if doc["kind"] == "RayJob":
        if "ttlSecondsAfterFinished" in spec and not spec.get("shutdownAfterJobFinishes"):
            problems.append("ttlSecondsAfterFinished without shutdownAfterJobFinishes: true")
        if spec.get("submissionMode", "K8sJobMode") not in (
            "K8sJobMode",
            "HTTPMode",
            "InteractiveMode",
            "SidecarMode",
        ):
            problems.append(f"submissionMode {spec['submissionMode']}")
    if doc["kind"] == "RayService":
        strategy = spec.get("upgradeStrategy", {}).get("type", "NewCluster")
        if strategy not in ("NewCluster", "NewClusterWithIncrementalUpgrade", "None"):
            problems.append(f"upgradeStrategy.type {strategy}")
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    for group in cluster.get("workerGroupSpecs", []):
        if not group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", 2**31):
            problems.append(f"group {group['groupName']}: replicas outside minReplicas..maxReplicas")
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            resources = container.get("resources", {})
            gpus = resources.get("requests", {}).get("nvidia.com/gpu")
            if gpus is not None and resources.get("limits", {}).get("nvidia.com/gpu") != gpus:
                problems.append(f"{container['name']}: nvidia.com/gpu requested but not the same in limits")
    if cluster.get("rayVersion", "").split(".")[:2] != _installed_ray().split(".")[:2]:
        problems.append(
            f"rayVersion {cluster.get('rayVersion')} is not the Ray we test with ({_installed_ray()})"
        )
    return problems


def _installed_ray() -> str:
    import ray

    return ray.__version__


def validate(name: str, doc: dict) -> None:
    """Raises for a document its validator refuses."""
    if doc["kind"] in KUBERAY:
        assert doc["apiVersion"] == "ray.io/v1"
        jsonschema.Draft7Validator(STRICT[doc["kind"]]).validate(doc)
        problems = _operator_rules(doc)
        if problems:
            raise ValueError(f"{name}: {'; '.join(problems)}")
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name, doc", _documents(), ids=[n for n, _ in _documents()])
def test_every_kubernetes_document_passes_its_validator(name: str, doc: dict) -> None:
    validate(name, doc)


def test_the_manifests_cover_every_kind_the_cluster_needs() -> None:
    kinds = {doc["kind"] for _, doc in _documents()}
    assert {"RayJob", "RayService", "RayCluster", "Deployment", "Service", "StatefulSet"} <= kinds


def _check_serve_config(config: dict) -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    for application in config["applications"]:
        Settings(**application["args"])  # the app's own settings: unknown ones are a TypeError


def test_the_serve_config_passes_serves_schema_and_the_rayservice_holds_it_word_for_word() -> None:
    config = yaml.safe_load((DEPLOY / "serve-config.yaml").read_text())
    _check_serve_config(config)
    (service,) = [doc for _, doc in _documents() if doc["kind"] == "RayService"]
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == config


def test_the_rayjob_trains_a_job_that_loads() -> None:
    (job,) = [doc for _, doc in _documents() if doc["kind"] == "RayJob"]
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:4] == ["python", "-m", "pipeline.cli", "submit"]
    context = submit.make_context("submit", words[4:])  # the command's own parser
    loaded = load_job(context.params["job_name"], context.params["overrides"])
    assert loaded.name == "imagenet-r152" and loaded.data.root.startswith("s3://")
    assert loaded.run.storage_path.startswith("s3://") and loaded.scaling.use_gpu
    assert loaded.scaling.cluster_grows == "yes"  # its worker pods may join after the job starts
    gpus = sum(
        int(group["replicas"])
        * int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert gpus == loaded.scaling.num_workers  # one GPU a Ray Train worker


def test_a_rayjob_retry_resumes_its_run_instead_of_starting_another() -> None:
    # KubeRay retries a failed RayJob (a lost head) on a new cluster up to backoffLimit times; each
    # retry runs the same entrypoint, whose fixed run name, the RayJob's own, resumes the run
    (job,) = [doc for _, doc in _documents() if doc["kind"] == "RayJob"]
    assert job["spec"]["backoffLimit"] >= 1
    context = submit.make_context("submit", shlex.split(job["spec"]["entrypoint"])[4:])
    assert context.params["run_name"] == job["metadata"]["name"]
    assert context.params["resume"] is None  # --resume would fail the first try, which has no checkpoint


def _launcher_check(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_the_cluster_launcher_file_passes_rays_own_validation() -> None:
    _launcher_check(yaml.safe_load((DEPLOY / "ray-cluster-aws.yaml").read_text()))


def _hadolint(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(text)
    hadolint = Path(sys.executable).parent / "hadolint"
    return subprocess.run([str(hadolint), str(dockerfile)], capture_output=True, text=True)


def test_the_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    result = _hadolint((DEPLOY / "Dockerfile").read_text(), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def _rename(tree: Any, path: tuple, new: str) -> None:
    """Renames the key at `path` (keys and list indexes) to `new`, in place."""
    *parents, key = path
    for step in parents:
        tree = tree[step]
    tree[new] = tree.pop(key)


def _kube(file: str, kind: str) -> dict:
    return copy.deepcopy(next(doc for name, doc in _documents() if name == f"{file}:{kind}"))


# kind -> (file, kind of document, the key's path, a misspelling)
MISSPELT = {
    "RayJob": ("rayjob-imagenet-r152.yaml", "RayJob",
               ("spec", "shutdownAfterJobFinishes"), "shutdownAfterJobsFinish"),
    "RayService": ("rayservice.yaml", "RayService",
                   ("spec", "rayClusterConfig", "headGroupSpec", "rayStartParams"), "rayStartParam"),
    "RayCluster": ("raycluster.yaml", "RayCluster",
                   ("spec", "enableInTreeAutoscaling"), "enableInTreeAutoScaling"),
    "pod template": ("raycluster.yaml", "RayCluster",
                     ("spec", "workerGroupSpecs", 0, "template", "spec", "volumes", 0, "emptyDir"),
                     "emptydir"),
    "Deployment": ("mlflow.yaml", "Deployment",
                   ("spec", "template", "spec", "containers", 0, "readinessProbe"), "readinesProbe"),
    "StatefulSet": ("mlflow.yaml", "StatefulSet", ("spec", "serviceName"), "servicename"),
    "Service": ("mlflow.yaml", "Service", ("spec", "selector"), "selecter"),
}  # fmt: skip


@pytest.mark.parametrize("case", MISSPELT, ids=list(MISSPELT))
def test_a_misspelt_key_fails_each_kind_of_kubernetes_document(case: str) -> None:
    file, kind, path, new = MISSPELT[case]
    doc = _kube(file, kind)
    validate(file, doc)  # as written, it passes
    _rename(doc, path, new)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError, ValueError)):
        validate(file, doc)


def test_a_misspelt_key_fails_the_serve_config() -> None:
    config = yaml.safe_load((DEPLOY / "serve-config.yaml").read_text())
    for path, new in [(("applications", 0, "import_path"), "import_paths"),
                      (("applications", 0, "args", "max_batch_size"), "max_batch_sise")]:  # fmt: skip
        wrong = copy.deepcopy(config)
        _rename(wrong, path, new)
        with pytest.raises((ValueError, TypeError)):  # pydantic's ValidationError is a ValueError
            _check_serve_config(wrong)


def test_a_misspelt_key_fails_the_cluster_launcher_file() -> None:
    config = yaml.safe_load((DEPLOY / "ray-cluster-aws.yaml").read_text())
    for path, new in [
        (("max_workers",), "max_worker"),
        (("available_node_types", "gpu", "min_workers"), "min_worker"),
    ]:
        wrong = copy.deepcopy(config)
        _rename(wrong, path, new)
        with pytest.raises(jsonschema.ValidationError):
            _launcher_check(wrong)


def test_a_misspelt_instruction_or_flag_fails_the_dockerfile(tmp_path: Path) -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    for wrong in (text.replace("\nWORKDIR ", "\nWRKDIR "), text.replace("COPY --chown=", "COPY --chwn=")):
        assert wrong != text
        assert _hadolint(wrong, tmp_path).returncode != 0


def test_every_node_of_the_rayservice_serves_behind_haproxy_with_the_retries_of_a_local_deploy() -> None:
    from pipeline.cluster.launch import LOCAL_RAY_ENV, SERVE_RETRY_ENV

    service = _kube("rayservice.yaml", "RayService")["spec"]["rayClusterConfig"]
    groups = [service["headGroupSpec"], *service["workerGroupSpecs"]]
    wanted = {"RAY_SERVE_ENABLE_HA_PROXY": LOCAL_RAY_ENV["RAY_SERVE_ENABLE_HA_PROXY"], **SERVE_RETRY_ENV}
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {item["name"]: item.get("value") for item in container.get("env", [])}
            assert {key: env.get(key) for key in wanted} == wanted, container["name"]
