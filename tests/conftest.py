"""Shared fixtures: tiny real-JPEG datasets with the odd files ImageNet has, and one local Ray."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.synth import write_dataset

# Odd files, as ImageNet has them: kept ones decode to RGB, broken ones are left out.
KEPT_ODD = {
    "grayscale": "train/dots/odd_grayscale.JPEG",
    "cmyk": "train/dots/odd_cmyk.JPEG",
    "png": "val/checkerboard/odd_png_named.JPEG",
}
BROKEN = {
    "truncated": "train/checkerboard/odd_truncated.JPEG",
    "empty": "val/dots/odd_empty.JPEG",
    "garbage": "train/stripes-vertical/odd_garbage.JPEG",
    "damaged marker": "train/dots/odd_damaged_marker.JPEG",  # PIL decodes it, DALI does not
}


def damaged_huffman_marker(jpeg: bytes) -> bytes:
    """`jpeg` with the marker of its first Huffman table (FF C4) broken: libjpeg (PIL) skips to
    the next marker and decodes with its standard tables; DALI's parser stops at it."""
    at = jpeg.index(b"\xff\xc4")
    return jpeg[:at] + b"\x3b" + jpeg[at + 1 :]


def add_odd_files(root: Path) -> None:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert("L").save(root / KEPT_ODD["grayscale"], format="JPEG")
    Image.fromarray(pixels).convert("CMYK").save(root / KEPT_ODD["cmyk"], format="JPEG")
    Image.fromarray(pixels).save(root / KEPT_ODD["png"], format="PNG")
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="JPEG")
    (root / BROKEN["truncated"]).write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    (root / BROKEN["empty"]).write_bytes(b"")
    (root / BROKEN["garbage"]).write_bytes(b"this is not an image" * 50)
    (root / BROKEN["damaged marker"]).write_bytes(damaged_huffman_marker(encoded.getvalue()))


# `make test` runs the suite in two processes (`pytest -n 2 --dist loadfile`), a module at a time
# each, taking modules in collection order. These take minutes each, measured with `--durations=0`
# under `-n 2` (loop 460 s, registry 405 s, serve 360 s, cli 270 s, faults
# 265 s), so they come first, longest first: started last, one would leave the other process idle.
SLOWEST_FIRST = (
    "train/test_loop.py", "tracking/test_registry.py", "serve/test_serve_app.py",
    "cli/test_cli.py", "cluster/test_faults.py", "study/test_study.py",
    "train/test_cifar_training.py", "serve/test_export.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        module = item.path.relative_to(Path(__file__).parent).as_posix()
        return SLOWEST_FIRST.index(module) if module in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def odd_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic classes (12 train, 5 val images each) plus every kind of odd file; not prepared."""
    root = tmp_path_factory.mktemp("odd") / "dataset"
    write_dataset(root, train_per_class=12, val_per_class=5, seed=1)
    add_odd_files(root)
    return root


@pytest.fixture(scope="session")
def prepared_dataset(odd_dataset: Path) -> Path:
    from pipeline.data.prepare import prepare

    prepare(odd_dataset, workers=2)
    return odd_dataset


@pytest.fixture(scope="session")
def _ray_stops_at_the_end():
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def ray_session(_ray_stops_at_the_end):
    """One local Ray for the session (it takes about 10 s to start on 2 cores), started again
    only for a module that comes after one with a cluster of its own (tests/cluster/test_faults.py
    shuts this one down to connect to its own)."""
    import ray

    from pipeline.cluster.launch import start_local_ray

    if not ray.is_initialized():
        os.environ.pop("RAY_ADDRESS", None)
        start_local_ray({}, num_cpus=2, log_to_driver=True)  # as `pipeline.cluster.launch.connect`, on 2 CPUs
    return ray


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder for a run: runs/, mlflow.db and mlartifacts/ land here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


# Runs the CLI and reports, after it exits, whether it imported Ray: bad input must fail before.
PROBE = (
    "import atexit, sys; "
    "atexit.register(lambda: print('RAY-IMPORTED' if 'ray' in sys.modules else 'NO-RAY')); "
    "from pipeline.cli import main; main()"
)


def cli(
    *args: str, cwd: Path | None = None, timeout_s: float = 120, env: dict | None = None
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", PROBE, *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout_s, env=env)


def small_job(root: Path, epochs: int, *overrides: str):
    """The quickstart job shrunk for tests: 8 images per worker at 32 px (3 steps per epoch on
    the 50 training images of `prepared_dataset` with 2 workers), a progress line every step."""
    from pipeline.config import load_job

    return load_job(
        "quickstart",
        [f"data.root='{root}'", f"epochs={epochs}", "scaling.batch_size_per_worker=8", "data.crop_px=32",
         "data.val_resize_px=36", "data.val_crop_px=32", "run.log_every_steps=1", *overrides],
    )  # fmt: skip


def build_layout(kind: str, source: Path, dest: Path) -> dict[str, str]:
    """Rewrites a folder-layout dataset `source` into layout `kind` at `dest`.

    Returns:
        For every image written, its path relative to `dest` -> the class it must get.
    """
    import shutil

    from scipy.io import savemat

    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    expected: dict[str, str] = {}
    train_dir = dest / ("ILSVRC/Data/CLS-LOC/train" if kind == "kaggle" else "train")
    for path in sorted((source / "train").rglob("*.JPEG")):
        target = train_dir / path.relative_to(source / "train")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        expected[str(target.relative_to(dest))] = path.parent.name
    val = sorted((source / "val").rglob("*.JPEG"))
    if kind == "folders":
        for path in val:
            target = dest / "val" / path.relative_to(source / "val")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            expected[str(target.relative_to(dest))] = path.parent.name
        return expected
    val_dir = dest / ("ILSVRC/Data/CLS-LOC/val" if kind == "kaggle" else "val")
    val_dir.mkdir(parents=True)
    rows = []
    for number, path in enumerate(val, start=1):
        name = f"ILSVRC2012_val_{number:08d}"
        shutil.copyfile(path, val_dir / f"{name}.JPEG")
        expected[str((val_dir / f"{name}.JPEG").relative_to(dest))] = path.parent.name
        rows.append((name, path.parent.name))
    if kind == "kaggle":
        lines = [f"{name},{cls} 10 20 30 40 {cls} 5 5 9 9" for name, cls in rows]
        (dest / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(lines) + "\n")
        (dest / "LOC_synset_mapping.txt").write_text("".join(f"{c} the {c}, a texture\n" for c in classes))
    else:  # devkit: ILSVRC2012_IDs in an order unlike the sorted one, to catch an index mix-up
        ids = {c: len(classes) - i for i, c in enumerate(classes)}
        data = dest / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[c]}\n" for _, c in rows))
        synsets = np.array(
            [(ids[c], c, f"the {c}") for c in classes],
            dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O")],
        )
        savemat(str(data / "meta.mat"), {"synsets": synsets})
    return expected


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """moto's standalone S3 server on loopback, as a separate process, with one bucket; yields
    the AWS settings that reach it (the product reads nothing else)."""
    import signal
    import time
    import urllib.request

    import boto3

    from pipeline.system import free_port

    port = free_port()
    settings = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    }  # fmt: skip
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        cwd=tmp_path_factory.mktemp("s3"),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(settings["AWS_ENDPOINT_URL"], timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                os.killpg(server.pid, signal.SIGKILL)
                raise
            time.sleep(0.3)
    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    s3 = boto3.client("s3", endpoint_url=settings["AWS_ENDPOINT_URL"], region_name="us-east-1", **credentials)
    s3.create_bucket(Bucket="bucket")
    yield settings
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


@pytest.fixture
def s3(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """The S3 server's settings in this test's environment; returns a fresh prefix's URI."""
    import uuid

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return f"s3://bucket/{uuid.uuid4().hex[:8]}"


def register_untrained(job, run_name: str, seed: int = 0):
    """Registers `job`'s network with freshly initialised weights as a model version, the way a
    finished run registers its best checkpoint (`pipeline.tracking.registry.register`), without
    training it: for tests of what comes after the registry (export, serving). Returns the
    ModelVersion; the MLflow store is the working folder's."""
    import torch
    from mlflow.tracking import MlflowClient

    from pipeline.data.index import load_index
    from pipeline.models import create_model
    from pipeline.tracking import registry, tracking_uri

    index = load_index(job.data.root)
    torch.manual_seed(seed)
    model = create_model(job.model.arch, num_classes=len(index.classes))
    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name(run_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(run_name)
    run = client.create_run(experiment_id, run_name=run_name)
    client.log_param(run.info.run_id, "data.normalize", job.data.normalize)
    state = {"model": model.state_dict(), "metrics": {"val/top1": 0.0}}
    version = registry.register(run.info.run_id, state, "untrained", job, index)
    client.set_terminated(run.info.run_id)
    return version


def open_inference_answers(url: str, model: str, images: list[bytes], tensors, headers: dict | None = None):
    """Class probabilities from a deployment through tritonclient.http with its defaults (the
    binary tensor extension both ways): for `images` as the BYTES input "image", and for
    `tensors` (N x 3 x H x W float32, preprocessed) as the FP32 input "input". Returns the two
    N x classes arrays."""
    import numpy as np
    import tritonclient.http as triton

    address = url.removeprefix("http://")
    client = triton.InferenceServerClient(address, connection_timeout=120, network_timeout=120)
    encoded = triton.InferInput("image", [len(images)], "BYTES")
    encoded.set_data_from_numpy(np.array(images, dtype=np.object_))
    # each call a dict of its own: tritonclient writes a binary request's header length into it
    by_image = client.infer(model, [encoded], headers=dict(headers or {})).as_numpy("probabilities")
    tensor = triton.InferInput("input", list(tensors.shape), "FP32")
    tensor.set_data_from_numpy(tensors)
    by_tensor = client.infer(model, [tensor], headers=dict(headers or {})).as_numpy("probabilities")
    return by_image, by_tensor
