"""A registered model version loaded for inference, and what serving needs around it:
checking an encoded image before it joins a batch, preprocessing batches with the evaluation
transform, and the answer for one image. The Serve app (deploy/serve_app.py) and
`resnet-pipe bench serve` both use these.

    loaded = Loaded.from_registry("resnet50", "3", torch.device("cpu"))
    preprocess = Preprocess(loaded.job, max_batch=8, device=loaded.device, threads=2,
                            mean_image=loaded.mean_image)  # pixel_mean models: their training mean
    check_image(body, max_body_bytes=20 * 2**20, max_pixels=40_000_000, resize_px=256)  # or BadImage
    answers = [prediction(loaded, row, top_k=5) for row in loaded.probabilities(preprocess([body]))]
    loaded.compile(max_batch=8, threads=2)  # optional: a faster forward pass, compiled now
"""

import functools
import io
import json
import logging
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.data.contract import MEAN_IMAGE
from pipeline.train.step import autocast, autocast_dtype

FORMATS = ("JPEG", "PNG", "BMP", "WEBP")  # what both PIL (the checks) and DALI (the decode) read

log = logging.getLogger(__name__)


class BadImage(Exception):
    """An image the server will not classify, with the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(status, message)
        self.status, self.message = status, message

    def __str__(self) -> str:
        return self.message


def check_image(body: bytes, max_body_bytes: int, max_pixels: int, resize_px: int | None = None) -> None:
    """Raises BadImage (with its HTTP status) unless `body` is a whole image this app accepts.

    `resize_px`: the shorter side the evaluation transform resizes to. A long thin image is
    small until then: 16,000 x 1 pixels in a few hundred bytes resize to 256 x 4,096,000 (7 GB of
    memory and 19 s on 2 cores, measured), so the resized size must be within `max_pixels` too.
    """
    if not body:
        raise BadImage(400, "empty body: send the image's bytes")
    if len(body) > max_body_bytes:
        raise BadImage(413, f"image of {len(body)} bytes is over the limit of {max_body_bytes}")
    try:
        with Image.open(io.BytesIO(body)) as image:
            if image.format not in FORMATS:
                raise BadImage(
                    415, f"image format {image.format} is not accepted; send one of {', '.join(FORMATS)}"
                )
            pixels = image.width * image.height
            if pixels > max_pixels:
                raise BadImage(
                    413,
                    f"image of {image.width} x {image.height} pixels is over the limit of {max_pixels}",
                )
            if resize_px and resize_px**2 * max(image.size) > max_pixels * min(image.size):
                raise BadImage(
                    413,
                    f"image of {image.width} x {image.height} pixels is too long and thin: resizing its "
                    f"shorter side to {resize_px} would make it over {max_pixels} pixels; crop it first",
                )
            image.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale, every byte still read
            image.load()
    except UnidentifiedImageError:
        raise BadImage(415, f"not an image: send one of {', '.join(FORMATS)}") from None
    except Image.DecompressionBombError as e:
        raise BadImage(413, f"image rejected as a decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(400, f"truncated or corrupt image: {e}") from None


@dataclass
class Loaded:
    """One model version, ready to answer."""

    name: str
    version: str
    model: torch.nn.Module
    classes: list[tuple[str, str]]  # (wnid, name) per class index
    job: object  # pipeline.config.Job: its data settings give the evaluation transform
    device: torch.device
    channels_last: bool
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # None: the model, eager
    sizes: tuple[int, ...] = ()  # the batch sizes `forward` was compiled for
    mean_image: np.ndarray | None = None  # data.normalize = "pixel_mean": the training images' mean
    runtime: str = "torch"  # or "onnxruntime" (pipeline.serve.runtimes)
    precision: str = "fp32"  # "bf16": torch's autocast; "int8": ONNX Runtime's quantized graph

    @classmethod
    def from_registry(
        cls, name: str, version: str, device: torch.device, raw: bool = False,
        runtime: str = "torch", precision: str = "fp32", threads: int | None = None,
    ) -> "Loaded":  # fmt: skip
        """The version's model in the job's memory format (`raw`: in PyTorch's default one,
        for `resnet-pipe bench serve`'s raw row), run by `runtime` in `precision`: ONNX
        Runtime runs the version's graph of that precision from the registry
        (`pipeline.serve.export`), an fp32 graph not yet exported is exported here.

        Raises:
            ValueError: an int8 graph that was never exported, or bf16 on a CPU without bf16 units.
        """
        import mlflow
        from mlflow.tracking import MlflowClient
        from safetensors.torch import load_file

        from pipeline.config import from_dict
        from pipeline.models import create_model
        from pipeline.serve.runtimes import check_precision
        from pipeline.tracking.registry import check_weights

        check_precision(precision, device, f"{socket.gethostname()}'s {device.type.upper()}")
        # fetched into a folder that goes once the weights are in memory: a replica leaves no copy
        # of the model on its node's disk
        with tempfile.TemporaryDirectory(prefix="resnet-pipe-model-") as tmp:
            uri = f"models:/{name}/{version}"
            folder = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tmp)) / "artifacts"
            job = from_dict(json.loads((folder / "job.json").read_text()))
            rows = [
                row.split("\t") for row in (folder / "classes.tsv").read_text(encoding="utf-8").splitlines()
            ]
            model = create_model(job.model.arch, num_classes=len(rows))
            tags = MlflowClient().get_model_version(name, version).tags
            check_weights(name, str(version), (folder / "model.safetensors").read_bytes(), tags)
            model.load_state_dict(load_file(folder / "model.safetensors"))
            mean_file = folder / MEAN_IMAGE
            mean_image = np.load(mean_file) if mean_file.is_file() else None
        classes = [(wnid, label) for _, wnid, label in rows]
        model.eval()
        loaded = cls(
            name, str(version), model, classes, job, device, False, mean_image=mean_image,
            runtime=runtime, precision=precision,
        )  # fmt: skip
        if runtime == "onnxruntime":
            from pipeline.serve.graph import metadata, replica_graph, to_onnx
            from pipeline.serve.runtimes import OnnxForward

            uri = replica_graph(tags, precision)
            if uri is not None:
                graph = Path(mlflow.artifacts.download_artifacts(uri)).read_bytes()
            elif precision == "fp32":  # exact: the same weights, exported here (deploy exports it first)
                graph = to_onnx(model, job.data.val_crop_px, metadata(loaded, "fp32"))
            else:
                raise ValueError(
                    f"{name}/{version} has no {precision} ONNX graph: `resnet-pipe export {name}/{version} "
                    f"--precision {precision}` makes one (or `resnet-pipe deploy` does, first)"
                )
            loaded.forward = OnnxForward(graph, device, threads or torch.get_num_threads())
        loaded.model = model.to(device)
        if job.run.channels_last and not raw:
            loaded.model, loaded.channels_last = model.to(memory_format=torch.channels_last), True
        return loaded

    def compile(self, max_batch: int, threads: int) -> bool:
        """Compiles the forward pass with `torch.compile` (inductor, the weights frozen into the
        graph) for each batch size of `padded_sizes(max_batch)`, now, so that no request waits
        for a compilation: a batch then runs padded to the next of these sizes. `threads`: the
        OpenMP threads of the compiled CPU kernels (inductor fixes them at compile time).

        ResNet-50 on 2 CPU cores, batch 4: 1.2x the images/s of the eager channels_last pass
        (docs/benchmarks.md), for 5 to 10 s of compilation per size. It needs a C++ compiler on
        the CPU: where it fails, this logs why and the version answers in eager mode (False).
        ONNX Runtime optimizes its graph as its session starts: nothing to compile (False)."""
        if self.runtime != "torch":
            return False
        compiled = torch.compile(
            self.model, dynamic=False, options={"freezing": True, "cpp.threads": threads}
        )  # fmt: skip
        sizes = padded_sizes(max_batch)
        dynamo = torch._dynamo.config  # each size is a compiled entry of its own
        dynamo.recompile_limit = max(dynamo.recompile_limit, len(sizes))
        crop = self.job.data.val_crop_px
        try:
            for size in sizes:  # every size compiles here, in its own guard of the graph
                self._forward(compiled, torch.zeros(size, 3, crop, crop, device=self.device))
        except Exception as e:
            log.warning(f"{self.name} version {self.version} runs uncompiled: torch.compile failed: {e}")
            return False
        self.forward, self.sizes = compiled, sizes
        return True

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities on the CPU, with validation's precision (bf16 autocast on a GPU
        unless the job says otherwise; fp32 on the CPU)."""
        if self.runtime == "onnxruntime":
            return self.forward(batch).softmax(dim=1).cpu()
        count = len(batch)
        size = next((s for s in self.sizes if s >= count), None)
        if size is None:  # not compiled, or a batch beyond the compiled sizes
            return self._forward(self.model, batch)
        if size > count:
            batch = torch.cat([batch, batch.new_zeros(size - count, *batch.shape[1:])])
        return self._forward(self.forward, batch)[:count]

    def _forward(self, forward: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        if self.precision == "bf16":
            dtype = torch.bfloat16
        else:  # fp32: validation's own precision on a GPU (bf16 unless the job says), exact on a CPU
            dtype = autocast_dtype(self.job, self.device) if self.device.type == "cuda" else None
        with torch.inference_mode(), autocast(self.device, dtype):
            # The compiled graph's guards tell an inference tensor (what a replica's batches are,
            # made under inference_mode) from an ordinary one (compile's examples), and compile
            # anew for the kind they have not seen: the first request of each batch size waited
            # 5.6 s for it on 2 cores, over 60 s on a busy machine. One kind, whoever calls.
            layout = torch.channels_last if self.channels_last else torch.contiguous_format
            if batch.is_inference():
                batch = batch.contiguous(memory_format=layout)
            else:  # the one copy, in the model's layout
                batch = batch.clone(memory_format=layout)
            return forward(batch).float().softmax(dim=1).cpu()


def padded_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a compiled forward pass is built for: the powers of two below `max_batch`,
    and `max_batch` (8: 1, 2, 4, 8; 6: 1, 2, 4, 6). A batch pads to the next one, computing at
    most twice its images, and only when requests are too few to fill a batch anyway."""
    return tuple(sorted({2**k for k in range(max_batch.bit_length()) if 2**k < max_batch} | {max_batch}))


class Preprocess:
    """`pipeline.data.loader.serve_pipeline` for batches of up to `max_batch` encoded images. An image
    DALI cannot decode raises; the next call runs on a new pipeline (`pipeline.data.loader.FedPipeline`)."""

    def __init__(
        self, job, max_batch: int, device: torch.device, threads: int, mean_image: np.ndarray | None = None
    ):
        from pipeline.data.decode import FedPipeline
        from pipeline.data.loader import serve_pipeline

        self.device = device
        gpu = device.type == "cuda"
        self.pipe = FedPipeline(
            functools.partial(
                serve_pipeline,
                data=job.data,
                gpu=gpu,
                threads=threads,
                mean_image=mean_image,
                batch_size=max_batch,
                num_threads=threads,
                device_id=device.index or 0 if gpu else None,
                prefetch_queue_depth=1,
                exec_async=False,
                exec_pipelined=False,
            )
        )

    def __call__(self, encoded: list[bytes]) -> torch.Tensor:
        """The batch (N x 3 x crop x crop, float, normalized) on `device`: on a GPU, copied from
        DALI's output on the GPU to torch's on the current stream, never through the host."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        (images,) = self.pipe(encoded)
        dense = images.as_tensor()  # one N x C x H x W tensor: every image has the same crop
        batch = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, batch, cuda_stream=stream)
        return batch


def prediction(loaded: Loaded, probabilities: torch.Tensor, top_k: int) -> dict:
    top = probabilities.topk(min(top_k, len(probabilities)))
    predictions = [
        {"class_index": i, "wnid": loaded.classes[i][0], "name": loaded.classes[i][1], "probability": p}
        for p, i in zip(top.values.tolist(), top.indices.tolist())
    ]
    return {"model": loaded.name, "version": loaded.version, "predictions": predictions}


def scoring_row(loaded: Loaded, probabilities: torch.Tensor, top_k: int) -> dict:
    """One image's answer as the registered pyfunc model gives it (deploy/mlflow_model.py), for
    /invocations: the top class's fields, and the top-k as JSON."""
    best = prediction(loaded, probabilities, top_k)["predictions"]
    return best[0] | {"top_k": json.dumps(best)}


def warmup_image() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (320, 240), (120, 90, 60)).save(out, format="JPEG")
    return out.getvalue()
