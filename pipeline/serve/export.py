"""A registered version as an ONNX graph, checked against PyTorch before it counts, and its
lower precisions measured on the model's own validation images.

    exported = export("resnet50@champion")                     # fp32: checked, logged, tagged
    exported = export("resnet50/3", precision="int8")          # + the int8 graph, calibrated
    ensure(version, "onnxruntime", "int8", max_loss_points=0.5)   # what `deploy` asks first

The graph: input "input" (N x 3 x H x W float32, the evaluation transform's output; N dynamic),
output "logits" (N x classes), opset `OPSET`. Its metadata carries the preprocessing contract
(`pipeline.data.contract`, with the mean image's values for a pixel_mean model) and the classes,
so that a runtime without resnet-pipe can serve it (docs/deployment.md).

Where it goes: the version's run gets the graph in MLflow's own `onnx` flavor (artifact folder
`onnx-fp32` or `onnx-int8`, which `mlflow models serve -m runs:/RUN/onnx-fp32` serves), and the
version gets tags naming it (`onnx/fp32`, `onnx/int8`) and each lower precision's validation
top-1 beside fp32's on the same images (`accuracy/onnxruntime-int8`, `accuracy/torch-bf16`).
"""

from __future__ import annotations

import io
import json
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.serve.graph import OPSET, URI_TAG, metadata, to_onnx
from pipeline.serve.inference import Loaded, Preprocess
from pipeline.serve.runtimes import OnnxForward

PARITY = 1e-4  # fp32: the largest difference in probability allowed against PyTorch
CHECK_IMAGES = 64  # validation images the fp32 check runs on
CALIBRATION_IMAGES = 300  # training images that set int8's activation ranges
MAX_LOSS_POINTS = 0.5  # a lower precision's largest top-1 loss that `deploy` accepts, in points
BATCH = 16
ARTIFACT = "onnx-{precision}"  # the run's artifact folder of each graph, MLflow's onnx flavor
ACCURACY_TAG = "accuracy/{runtime}-{precision}"  # {"top1": ..., "fp32_top1": ..., "images": ...}
OPSET_TAG = "onnx/opset"


class ExportError(ValueError):
    """A version that cannot be exported or measured, with what to do."""


@dataclass(frozen=True)
class Accuracy:
    """A precision's validation top-1 beside fp32's, on the same images."""

    runtime: str
    precision: str
    top1: float
    fp32_top1: float
    images: int

    @property
    def loss_points(self) -> float:
        return 100 * (self.fp32_top1 - self.top1)

    def line(self) -> str:
        return (
            f"{self.runtime} {self.precision}: val top-1 {self.top1:.4f} against fp32's {self.fp32_top1:.4f} "
            f"on {self.images} validation images ({self.loss_points:+.2f} points lost)"
        )


@dataclass(frozen=True)
class Exported:
    name: str
    version: str
    precision: str
    uri: str  # runs:/RUN/onnx-PRECISION
    path: Path | None  # the copy written on this machine (--out)
    opset: int
    max_difference: float | None  # fp32: the largest probability difference against PyTorch
    checked_images: int
    accuracy: Accuracy | None  # the lower precisions


# ---- images: the model's own dataset --------------------------------------------------------


def dataset_images(job, split: str, count: int | None, root: str | None = None, seed: int = 0):
    """(encoded images, labels) of `split` of the job's dataset (`root` in place of
    data.root): its image files, or its pixel arrays as PNG; `count` of them (None: all), a
    random choice from `seed` when fewer than the split.

    Raises:
        ExportError: the dataset cannot be read from this machine.
    """
    from PIL import Image

    from pipeline.data.index import DatasetError, load_index
    from pipeline.data.memory import has_pixels, load_pixels

    where = root or job.data.root
    try:
        index = load_index(where)
    except DatasetError as e:
        raise ExportError(
            f"the model's dataset is needed here and cannot be read: {e}; give its folder with --data ROOT"
        ) from None
    rows = list(range(len(index.splits[split])))
    if count is not None and count < len(rows):
        rows = sorted(random.Random(seed).sample(rows, count))
    labels = [index.splits[split][row][1] for row in rows]
    if index.arrays_only or not (index.root / index.files(split)[0]).is_file():
        if not has_pixels(index.root, split):
            raise ExportError(
                f"the dataset at {index.root} holds its {split} images in shards only: prepare it "
                "with its image files here and give --data ROOT"
            )
        pixels = load_pixels(index.root, split, index.dataset_hash)
        images = []
        for row in rows:
            encoded = io.BytesIO()
            Image.fromarray(pixels[row]).save(encoded, format="PNG")  # lossless: the arrays' pixels
            images.append(encoded.getvalue())
        return images, labels
    return [(index.root / index.files(split)[row]).read_bytes() for row in rows], labels


def check_images(loaded: Loaded, data_root: str | None, say: Callable[[str], None]) -> list[bytes]:
    """What the fp32 check runs on: CHECK_IMAGES validation images of the model's dataset, or,
    where this machine cannot read it, the input example registered with the version (a
    validation image): a deployment needs no dataset."""
    try:
        return dataset_images(loaded.job, "val", CHECK_IMAGES, data_root)[0]
    except ExportError as e:
        import mlflow
        from mlflow.models import Model

        folder = mlflow.artifacts.download_artifacts(f"models:/{loaded.name}/{loaded.version}")
        example = Model.load(folder).load_input_example(folder)
        say(f"{e}; checking on the version's registered input example instead")
        return list(example["image"])


def batches(loaded: Loaded, images: list[bytes], threads: int) -> Iterator[torch.Tensor]:
    """The evaluation transform of `images` (serving's DALI preprocessing), BATCH at a time."""
    preprocess = Preprocess(loaded.job, BATCH, torch.device("cpu"), threads, loaded.mean_image)
    for start in range(0, len(images), BATCH):
        yield preprocess(images[start : start + BATCH])


# ---- int8 ----------------------------------------------------------------------------------------


def quantize_int8(fp32: bytes, calibration: Iterator[torch.Tensor]) -> bytes:
    """ONNX Runtime's static quantization in QDQ form: int8 weights per output channel, uint8
    activations with ranges from the calibration batches (min-max), the metadata kept."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def get_next(self):
            batch = next(calibration, None)
            return None if batch is None else {"input": batch.numpy()}

    with tempfile.TemporaryDirectory(prefix="resnet-pipe-int8-") as tmp:
        source, prepared, out = (Path(tmp) / n for n in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        source.write_bytes(fp32)
        quant_pre_process(str(source), str(prepared))  # shapes inferred, BN folded: what calibrates
        quantize_static(
            str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
        )  # fmt: skip
        graph = onnx.load(out)
    kept = onnx.load_from_string(fp32).metadata_props
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    for prop in graph.metadata_props:
        if prop.key == "resnet_pipe.precision":
            prop.value = "int8"
    return graph.SerializeToString()


# ---- checks and measurements --------------------------------------------------------------------


def torch_forward(loaded: Loaded, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The registered PyTorch model's logits, in fp32 or under bf16 autocast."""
    return torch_forward_of(loaded.model, precision)


def torch_forward_of(
    model: torch.nn.Module, precision: str = "fp32"
) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            return model(batch).float()

    return forward


def parity(reference: Callable, candidate: Callable, inputs: list[torch.Tensor]) -> tuple[float, int]:
    """The largest probability difference between two forward passes over `inputs`, and the
    number of images whose top-1 differs."""
    largest, differ = 0.0, 0
    for batch in inputs:
        a, b = reference(batch).softmax(1), candidate(batch).softmax(1)
        largest = max(largest, (a - b).abs().max().item())
        differ += (a.argmax(1) != b.argmax(1)).sum().item()
    return largest, differ


def top1(
    forwards: dict[str, Callable], inputs: Iterator[torch.Tensor], labels: list[int]
) -> dict[str, float]:
    """Each forward pass's top-1 over the same batches, one pass over the images."""
    right, seen = dict.fromkeys(forwards, 0), 0
    for batch in inputs:
        truth = torch.tensor(labels[seen : seen + len(batch)])
        for name, forward in forwards.items():
            right[name] += (forward(batch).argmax(1) == truth).sum().item()
        seen += len(batch)
    return {name: count / max(1, seen) for name, count in right.items()}


# ---- the registry --------------------------------------------------------------------------------


def export(
    target: str | None,
    precision: str = "fp32",
    out: Path | None = None,
    opset: int = OPSET,
    data_root: str | None = None,
    val_images: int | None = None,
    say: Callable[[str], None] = print,
) -> Exported:
    """Exports the registered version `target` (MODEL@ALIAS, MODEL/VERSION, a run; None: the newest
    champion): fp32 first, checked against PyTorch; for int8, then calibrated on the training images
    and measured on the validation images. Logs each graph to the version's run and tags the version.

    Raises:
        ExportError: the check failed, or the dataset cannot be read.
        RegistryError: no such version.
    """
    from pipeline.tracking import registry

    if precision not in ("fp32", "int8"):
        raise ExportError(f"--precision {precision}: ONNX graphs are exported in fp32 or int8")
    version, _ = registry.serving_version(target)
    loaded = Loaded.from_registry(version.name, str(version.version), torch.device("cpu"), raw=True)
    threads = torch.get_num_threads()
    images = check_images(loaded, data_root, say)
    inputs = list(batches(loaded, images, threads))
    fp32 = to_onnx(loaded.model, loaded.job.data.val_crop_px, metadata(loaded, "fp32"), opset)
    largest, differ = parity(
        torch_forward(loaded, "fp32"), OnnxForward(fp32, torch.device("cpu"), threads), inputs
    )
    say(
        f"checked on {len(images)} validation images with ONNX Runtime against PyTorch: largest "
        f"probability difference {largest:.2e}, top-1 differs on {differ}"
    )
    if largest > PARITY or differ:
        raise ExportError(
            f"the ONNX graph of {version.name}/{version.version} does not match PyTorch (largest "
            f"probability difference {largest:.2e}, allowed {PARITY:.0e}; top-1 differs on {differ} "
            f"images): nothing was logged"
        )
    graph, accuracy = fp32, None
    if precision == "int8":
        train, _ = dataset_images(loaded.job, "train", CALIBRATION_IMAGES, data_root)
        say(f"calibrating int8 on {len(train)} training images")
        graph = quantize_int8(fp32, batches(loaded, train, threads))
        accuracy = measure(loaded, "onnxruntime", "int8", data_root, val_images, fp32=fp32, low=graph)
        say(accuracy.line())
    uri = _log(version, precision, graph, opset, accuracy)
    written = None
    if out is not None:
        out.write_bytes(graph)
        written = out
    return Exported(
        version.name, str(version.version), precision, uri, written, opset, largest, len(images), accuracy
    )


def measure(
    loaded: Loaded,
    runtime: str,
    precision: str,
    data_root: str | None,
    val_images: int | None,
    fp32: bytes | None = None,
    low: bytes | None = None,
) -> Accuracy:
    """`precision`'s validation top-1 and fp32's on the same images (`val_images` of them, all
    when None), in one pass; int8 from the graph `low`, bf16 as PyTorch's autocast."""
    images, labels = dataset_images(loaded.job, "val", val_images, data_root)
    threads = torch.get_num_threads()
    forwards = {"fp32": torch_forward(loaded, "fp32")}
    if precision == "int8":
        forwards["low"] = OnnxForward(low, torch.device("cpu"), threads)
    else:
        forwards["low"] = torch_forward(loaded, precision)
    scores = top1(forwards, batches(loaded, images, threads), labels)
    return Accuracy(runtime, precision, scores["low"], scores["fp32"], len(images))


def _log(version, precision: str, graph: bytes, opset: int, accuracy: Accuracy | None) -> str:
    """The graph into the version's run in MLflow's onnx flavor, and the version's tags."""
    import mlflow.onnx
    import onnx
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import quiet_mlflow, tracking_uri

    client = MlflowClient(tracking_uri())
    folder = ARTIFACT.format(precision=precision)
    with tempfile.TemporaryDirectory(prefix="resnet-pipe-onnx-") as tmp, quiet_mlflow():
        saved = Path(tmp) / folder
        mlflow.onnx.save_model(
            onnx.load_from_string(graph), saved, save_as_external_data=False,
            onnx_execution_providers=["CPUExecutionProvider"],
        )  # fmt: skip
        client.log_artifacts(version.run_id, str(saved), artifact_path=folder)
    uri = f"runs:/{version.run_id}/{folder}"
    client.set_model_version_tag(version.name, version.version, URI_TAG.format(precision=precision), uri)
    client.set_model_version_tag(version.name, version.version, OPSET_TAG, str(opset))
    if accuracy is not None:
        _tag_accuracy(client, version, accuracy)
    return uri


def _tag_accuracy(client, version, accuracy: Accuracy) -> None:
    value = {
        "top1": accuracy.top1,
        "fp32_top1": accuracy.fp32_top1,
        "images": accuracy.images,
    }
    key = ACCURACY_TAG.format(runtime=accuracy.runtime, precision=accuracy.precision)
    client.set_model_version_tag(version.name, version.version, key, json.dumps(value))


def stored_accuracy(version, runtime: str, precision: str) -> Accuracy | None:
    text = version.tags.get(ACCURACY_TAG.format(runtime=runtime, precision=precision))
    if not text:
        return None
    value = json.loads(text)
    return Accuracy(runtime, precision, value["top1"], value["fp32_top1"], value["images"])


def ensure(
    version,
    runtime: str,
    precision: str,
    max_loss_points: float = MAX_LOSS_POINTS,
    data_root: str | None = None,
    val_images: int | None = None,
    say: Callable[[str], None] = print,
) -> Accuracy | None:
    """What `deploy --runtime R --precision P` needs before a replica starts: the ONNX graph of
    the precision in the registry (exported now if it is not), and a lower precision's measured
    top-1 (measured now if it is not), within `max_loss_points` of fp32's.

    Raises:
        ExportError: the precision loses more than `max_loss_points`, or cannot be made here.
    """
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    if runtime == "onnxruntime" and URI_TAG.format(precision=precision) not in version.tags:
        say(f"{version.name}/{version.version} has no {precision} ONNX graph yet: exporting it")
        export(
            f"{version.name}/{version.version}",
            precision,
            data_root=data_root,
            val_images=val_images,
            say=say,
        )
        version = client.get_model_version(version.name, version.version)
    if precision == "fp32":
        return None
    accuracy = stored_accuracy(version, runtime, precision)
    if accuracy is None:  # bf16: measured once, then read from the tag
        loaded = Loaded.from_registry(version.name, str(version.version), torch.device("cpu"), raw=True)
        accuracy = measure(loaded, runtime, precision, data_root, val_images)
        _tag_accuracy(client, version, accuracy)
    say(accuracy.line())
    if accuracy.loss_points > max_loss_points:
        raise ExportError(
            f"{version.name}/{version.version} in {precision} loses {accuracy.loss_points:.2f} points of "
            f"validation top-1 (over the limit of {max_loss_points}): serve it in fp32, or raise the limit "
            f"with --max-accuracy-loss"
        )
    return accuracy
