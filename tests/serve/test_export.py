"""`resnet-pipe export`: every network we build becomes an ONNX graph that ONNX Runtime answers
as PyTorch does (option A's zero-padding shortcut among them); a registered version's graph
carries its preprocessing, so that a runtime without resnet-pipe answers as the registered pyfunc
does, for channel normalisation and for the CIFAR recipes' mean image; the graph is logged in
MLflow's onnx flavor, which `mlflow models serve` answers; int8 is measured against fp32 and
refused past the limit."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from cifar_release import write_cifar10
from conftest import register_untrained, small_job
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.config import load_job
from pipeline.data.index import load_index
from pipeline.data.memory import load_pixels
from pipeline.data.prepare import prepare
from pipeline.models import create_model
from pipeline.serve import export, runtimes
from pipeline.serve.inference import Loaded
from pipeline.serve.runtimes import OnnxForward, RuntimeChoiceError, choose
from pipeline.system import free_port


@pytest.mark.parametrize(
    "arch, px",
    [
        ("cifar_resnet20", 32), ("cifar_resnet20_b", 32), ("cifar_resnet20_c", 32), ("cifar_plain20", 32),
        ("cifar_preact_resnet164", 32), ("cifar_resnet1202", 32), ("resnet34_a", 64), ("plain18", 64),
        ("preact_resnet18", 64), ("resnet50", 64), ("resnet101", 64), ("resnet152", 64),
    ],
)  # fmt: skip
def test_every_network_we_build_exports_and_onnx_runtime_answers_as_pytorch(arch: str, px: int) -> None:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10).eval()
    with torch.no_grad():  # BN statistics of a trained net, not the identity of a new one
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    graph = export.to_onnx(model, px, {"resnet_pipe.model": arch})
    onnx_forward = OnnxForward(graph, torch.device("cpu"), threads=2)
    batch = torch.randn(3, 3, px, px)  # a batch size other than the export's example (2)
    largest, differ = export.parity(export.torch_forward_of(model), onnx_forward, [batch])
    assert largest < export.PARITY and differ == 0, (arch, largest, differ)
    loaded = onnx.load_from_string(graph)
    assert loaded.opset_import[0].version == export.OPSET
    assert loaded.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch axis is named: dynamic


def test_runtime_and_precision_go_together_or_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(runtimes, "bf16_units", lambda device: True)  # a CPU with AVX-512 BF16
    assert choose("auto", "fp32", cpu) == ("onnxruntime", "fp32")
    assert choose("auto", "fp32", gpu) == ("torch", "fp32")
    assert choose("auto", "int8", gpu) == ("onnxruntime", "int8")
    assert choose("auto", "bf16", cpu) == ("torch", "bf16")
    with pytest.raises(RuntimeChoiceError, match="int8 runs on onnxruntime only"):
        choose("torch", "int8", cpu)
    with pytest.raises(RuntimeChoiceError, match="bf16 runs on torch only"):
        choose("onnxruntime", "bf16", cpu)


def test_bf16_is_refused_where_the_replica_has_no_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU with AVX2 alone (this project's machines include AMD EPYCs), bf16 autocast takes
    PyTorch's reference path, slower than fp32: deploy refuses it for a replica here, and names
    what to serve instead; a cluster's replica (here=False) is checked on its own node."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtimes, "bf16_units", lambda device: False)
    with pytest.raises(RuntimeChoiceError, match=r"--precision bf16: this machine's CPU has no bf16 units .*"
                       r"serve --precision fp32 or int8"):  # fmt: skip
        choose("auto", "bf16", cpu)
    assert choose("auto", "bf16", cpu, here=False) == ("torch", "bf16")
    assert choose("auto", "int8", cpu) == ("onnxruntime", "int8")  # int8 needs no bf16


def _contract_tensor(encoded: bytes, preprocessing: dict) -> np.ndarray:
    """The evaluation transform from the graph's metadata alone, with PIL and numpy: what a
    serving stack without resnet-pipe does (docs/deployment.md)."""
    with Image.open(io.BytesIO(encoded)) as image:
        image = image.convert("RGB")
        short = preprocessing["resize_shorter_px"]
        scale = short / min(image.size)
        size = (max(short, round(image.width * scale)), max(short, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
        crop = preprocessing["crop_px"]
        left, top = (image.width - crop) // 2, (image.height - crop) // 2
        pixels = np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.float32)
    if preprocessing["normalize"] == "pixel_mean":
        pixels = (pixels - np.asarray(preprocessing["mean_image"], dtype=np.float32)) / preprocessing["scale"]
    else:
        pixels = (pixels / preprocessing["scale"] - preprocessing["mean"]) / np.asarray(preprocessing["std"])
    return pixels.transpose(2, 0, 1).astype(np.float32)


def _check_exported_version(version, images: list[bytes], tolerance: float) -> dict:
    """Exports `version`, then answers `images` three ways: the registered pyfunc (MLflow's
    loader), and the exported file through ONNX Runtime with the preprocessing of its metadata."""
    exported = export.export(f"{version.name}/{version.version}", out=Path("model.onnx"), say=print)
    assert exported.max_difference < export.PARITY
    graph = onnx.load("model.onnx")
    properties = {p.key: p.value for p in graph.metadata_props}
    preprocessing = json.loads(properties["resnet_pipe.preprocessing"])
    import onnxruntime as ort

    session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
    batch = np.stack([_contract_tensor(i, preprocessing) for i in images])
    probabilities = torch.from_numpy(session.run(["logits"], {"input": batch})[0]).softmax(1)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}")
    answers = pyfunc.predict(pd.DataFrame({"image": images}))
    assert probabilities.argmax(1).tolist() == answers["class_index"].tolist()
    assert np.allclose(probabilities.max(1).values.numpy(), answers["probability"], atol=tolerance)
    tags = MlflowClient().get_model_version(version.name, version.version).tags
    assert tags["onnx/fp32"] == exported.uri and tags["onnx/opset"] == str(export.OPSET)
    return preprocessing


def test_a_registered_version_exports_with_its_channel_normalisation(
    workdir: Path, prepared_dataset: Path
) -> None:
    version = register_untrained(small_job(prepared_dataset, 1), "exported")
    index = load_index(prepared_dataset)
    images = [(prepared_dataset / f).read_bytes() for f in index.files("val")[:12]]
    # PIL's resize against DALI's: pixels differ by a rounding, so probabilities agree to 1e-3
    preprocessing = _check_exported_version(version, images, tolerance=1e-3)
    assert preprocessing["normalize"] == "channel" and preprocessing["crop_px"] == 32

    # where the dataset cannot be read (a machine that only deploys), the check runs on the
    # version's registered input example; int8 needs the dataset and says so
    elsewhere = export.export(f"{version.name}/{version.version}", data_root=str(workdir / "gone"), say=print)
    assert elsewhere.checked_images == 1 and elsewhere.max_difference < export.PARITY
    with pytest.raises(export.ExportError, match="give its folder with --data ROOT"):
        export.export(f"{version.name}/{version.version}", "int8", data_root=str(workdir / "gone"), say=print)

    # int8: calibrated, measured against fp32 on the validation images, kept beside it
    exported = export.export(f"{version.name}/{version.version}", precision="int8", say=print)
    accuracy = exported.accuracy
    assert accuracy.images == len(index.files("val")) and 0 <= accuracy.top1 <= 1
    version = MlflowClient().get_model_version(version.name, version.version)
    assert export.stored_accuracy(version, "onnxruntime", "int8") == accuracy
    assert set(version.tags) >= {"onnx/fp32", "onnx/int8"}
    int8 = Loaded.from_registry(
        version.name, str(version.version), torch.device("cpu"), runtime="onnxruntime", precision="int8"
    )
    assert int8.forward.session.get_inputs()[0].name == "input"
    with pytest.raises(export.ExportError, match="over the limit of"):
        export.ensure(version, "onnxruntime", "int8", max_loss_points=accuracy.loss_points - 0.01, say=print)
    assert (
        export.ensure(version, "onnxruntime", "int8", max_loss_points=accuracy.loss_points, say=print)
        == accuracy
    )

    # MLflow's own onnx flavor, served by MLflow's own server
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", version.tags["onnx/fp32"], "--env-manager",
         "local", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},  # its uvicorn
    )  # fmt: skip
    try:
        from mlflow.pyfunc.scoring_server.client import ScoringServerClient

        client = ScoringServerClient("127.0.0.1", port)
        client.wait_server_ready(timeout=120, scoring_server_proc=server)
        tensor = np.stack([_contract_tensor(i, preprocessing) for i in images[:3]])
        got = np.asarray(
            client.invoke(tensor)["predictions"]["logits"]
        )  # {"inputs": tensor}, as MLflow sends
        expected = OnnxForward(Path("model.onnx").read_bytes(), torch.device("cpu"), 1)(
            torch.from_numpy(tensor)
        )
        assert np.allclose(got, expected.numpy(), atol=1e-5)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_cifar_version_exports_with_its_mean_image(workdir: Path) -> None:
    root = workdir / "cifar"
    write_cifar10(root, train=60, test=20)
    prepare(root)
    job = load_job("cifar10-resnet20", [f"data.root='{root}'", "scaling.use_gpu=false"])
    version = register_untrained(job, "exported-cifar")
    index = load_index(root)
    images = []
    for pixels in load_pixels(index.root, "val", index.dataset_hash)[:8]:  # the test images, as PNG
        encoded = io.BytesIO()
        Image.fromarray(pixels).save(encoded, format="PNG")
        images.append(encoded.getvalue())
    preprocessing = _check_exported_version(version, images, tolerance=1e-5)  # 32 px: no resize, exact
    assert preprocessing["normalize"] == "pixel_mean" and np.asarray(preprocessing["mean_image"]).shape == (
        32,
        32,
        3,
    )


def test_export_names_what_is_wrong_and_exits_2(workdir: Path) -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "export", "no-such-model/1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shown.returncode == 2 and shown.stderr.startswith("error: ") and "Traceback" not in shown.stderr, (
        shown
    )
