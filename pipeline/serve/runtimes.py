"""What runs a served model's forward pass: PyTorch (eager or compiled, fp32 or bf16 autocast) or
ONNX Runtime (fp32, or int8 from static quantization), chosen per deployment with the same
preprocessing, batching and checks around it.

    runtime, precision = choose("auto", "fp32", torch.device("cpu"))  # ("onnxruntime", "fp32")
    forward = OnnxForward(onnx_bytes, torch.device("cpu"), threads=2)
    logits = forward(batch)                                           # N x classes, float32

Measured on 2 CPU cores, ResNet-50 at batch 8 (docs/benchmarks.md, `resnet-pipe bench serve`):
ONNX Runtime fp32 beats PyTorch eager fp32, so "auto" is ONNX Runtime on a CPU. On a GPU, "auto"
is PyTorch (bf16 autocast where the job validated in it), and ONNX Runtime uses the CUDA (and
TensorRT, where installed) execution providers through the same code.
"""

from __future__ import annotations

import torch

from pipeline.system import bf16_units, no_bf16_units

RUNTIMES = ("torch", "onnxruntime")
PRECISIONS = ("fp32", "bf16", "int8")
# where each precision runs: bf16 as PyTorch's autocast (ONNX Runtime has no bf16 convolutions
# on the CPU), int8 as ONNX Runtime's quantized operators (QDQ, with VNNI where the CPU has it)
RUNS_ON = {"bf16": "torch", "int8": "onnxruntime"}


class RuntimeChoiceError(ValueError):
    """A runtime and precision that do not go together, with the ones that do."""


def choose(runtime: str, precision: str, device: torch.device, here: bool = True) -> tuple[str, str]:
    """The runtime and precision a replica on `device` runs: `runtime` "auto" is ONNX Runtime on
    a CPU (the faster exact runtime measured there) and PyTorch on a GPU, unless the precision
    runs on one runtime only. `here`: the replica runs on this machine, so bf16 is refused where
    this machine has no bf16 units (a cluster's replica checks its own: `check_precision`)."""
    if precision not in PRECISIONS:
        raise RuntimeChoiceError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if runtime == "auto":
        runtime = RUNS_ON.get(precision, "torch" if device.type == "cuda" else "onnxruntime")
    if runtime not in RUNTIMES:
        raise RuntimeChoiceError(f"runtime '{runtime}' is not one of auto, {', '.join(RUNTIMES)}")
    needs = RUNS_ON.get(precision)
    if needs and needs != runtime:
        raise RuntimeChoiceError(
            f"precision {precision} runs on {needs} only: use --runtime {needs} (or --runtime auto)"
        )
    if here:
        check_precision(precision, device, "this machine's " + device.type.upper())
    return runtime, precision


def check_precision(precision: str, device: torch.device, where: str) -> None:
    """Refuses bf16 on a device without bf16 units (`pipeline.system.bf16_units`): it would
    serve slower than fp32, not faster."""
    if precision == "bf16" and not bf16_units(device):
        why = no_bf16_units(where, device)
        raise RuntimeChoiceError(f"--precision bf16: {why}; serve --precision fp32 or int8")


def providers(device: torch.device) -> list:
    """ONNX Runtime's execution providers for `device`, best first: TensorRT and CUDA on a GPU
    where this onnxruntime has them, the CPU always last."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen = []
    if device.type == "cuda":
        for name in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
            if name in available:
                chosen.append((name, {"device_id": device.index or 0}))
    return [*chosen, "CPUExecutionProvider"]


def session(model: bytes | str, device: torch.device, threads: int):
    """An ONNX Runtime session for `model` (the file's bytes, or its path) that shares the cores:
    `threads` intra-op threads that sleep between calls instead of spinning (a spinning team
    takes the cores that DALI's preprocessing and the event loop need), one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its warnings about unused initializers are noise
    return ort.InferenceSession(model, options, providers=providers(device))


class OnnxForward:
    """An ONNX graph (`pipeline.serve.export`: input "input", N x 3 x H x W float32; output
    "logits") as a forward pass over torch tensors."""

    def __init__(self, model: bytes | str, device: torch.device, threads: int):
        self.device = device
        self.session = session(model, device, threads)
        self.on_gpu = self.session.get_providers()[0] != "CPUExecutionProvider"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.on_gpu:  # the batch stays on the GPU: bound in place, not copied through the host
            binding = self.session.io_binding()
            batch = batch.contiguous()
            binding.bind_input(
                "input", "cuda", self.device.index or 0, "float32", tuple(batch.shape), batch.data_ptr()
            )
            binding.bind_output("logits", "cuda", self.device.index or 0)
            self.session.run_with_iobinding(binding)
            return torch.from_numpy(binding.copy_outputs_to_cpu()[0])  # N x classes: small
        (logits,) = self.session.run(["logits"], {"input": batch.contiguous().numpy()})
        return torch.from_numpy(logits)
