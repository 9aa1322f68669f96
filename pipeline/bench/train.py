"""`resnet-pipe bench train`: the whole training pipeline (Ray Train, DALI, MLflow tracking)
against a bare PyTorch loop over in-memory tensors, same model, batch, threads and malloc
settings; then 2 DDP workers against 1 on the same cores. On a CIFAR dataset (one that `data
prepare` holds as pixel arrays), the paper's ResNet-20 step instead, in each precision and with
`torch.compile`, each against the same step in a bare loop (`bench_train_cifar`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.bench.data import Result
from pipeline.bench.process import in_worker_process
from pipeline.config import load_job
from pipeline.data.index import load_index


def bare_loop(
    arch: str,
    num_classes: int,
    batch: int,
    crop_px: int,
    threads: int,
    steps: int,
    channels_last: bool,
    bf16: bool = False,
    compiled: bool = False,
) -> float:
    """Images/s of a plain PyTorch training loop over in-memory tensors: the ceiling. `bf16`:
    under bf16 autocast, as the pipeline's step with run.precision = "bf16"; `compiled`: the
    model through `torch.compile`, as with run.compile (its compilation in the warm-up steps)."""
    from pipeline.models import create_model

    torch.set_num_threads(threads)
    model = create_model(arch, num_classes=num_classes).train()
    images = torch.randn(batch, 3, crop_px, crop_px)
    if channels_last:  # the job's memory format, as the pipeline's step uses it
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    labels = torch.randint(0, num_classes, (batch,))
    forward = torch.compile(model) if compiled else model
    for step in range(steps):
        if step == 2:  # the same warm-up the pipeline leaves out
            start = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):  # the tensors are on the CPU
            logits = forward(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return batch * (steps - 2) / (time.perf_counter() - start)


def _bare_loop_metrics(*args) -> dict[str, float]:
    return {"images_per_s": bare_loop(*args)}


def bench_train(root: Path, steps: int = 12, batch: int = 16, crop_px: int = 224) -> list[Result]:
    """The whole pipeline (Ray Train, DALI, MLflow tracking) against `bare_loop`, same model,
    batch, threads and malloc settings; then 2 DDP workers of half the threads each. Between
    them, `bare_loop` as a Ray Train training function: the share of the gap that is Ray
    Train's own. Steady state: the first 2 steps of each are left out."""
    import tempfile

    from pipeline.cluster.launch import fit_function, submit
    from pipeline.tracking import tracking_at

    threads = len(os.sched_getaffinity(0))
    index = load_index(root)
    overrides = [
        f"data.root='{root.resolve()}'", "epochs=1", f"run.max_steps_per_epoch={steps}",
        f"scaling.batch_size_per_worker={batch}", f"data.crop_px={crop_px}", "data.threads_per_worker=1",
        f"scaling.use_gpu={str(torch.cuda.is_available()).lower()}", "run.log_every_steps=4",
    ]  # fmt: skip
    channels_last = load_job("imagenet-r50", overrides).run.channels_last
    loop = ("resnet50", len(index.classes), batch, crop_px, threads, steps, channels_last)
    rows = [Result("bare PyTorch loop, in-memory tensors", in_worker_process(bare_loop, *loop))]
    # private runs, in a store of their own: the user's stays clean
    with tempfile.TemporaryDirectory() as tmp, tracking_at(f"sqlite:///{tmp}/mlflow.db"):
        on_ray = fit_function(_bare_loop_metrics, loop, threads, Path(tmp))
        rows.append(Result("the same loop as a Ray Train function", on_ray["images_per_s"]))
        for workers in (1, 2):
            per_worker = [
                f"scaling.num_workers={workers}",
                f"scaling.cpus_per_worker={threads // workers}",
            ]
            job = load_job("imagenet-r50", [*overrides, *per_worker, f"run.storage_path='{tmp}'"])
            outcome = submit(job, f"bench-{workers}", index=index, say=lambda _: None)  # a private run
            if not outcome.finished:
                raise RuntimeError(f"the {workers}-worker benchmark run failed: {outcome.error}")
            plural = "s" if workers > 1 else ""
            name = f"resnet-pipe, {workers} worker{plural} x {threads // workers} threads"
            rows.append(Result(name, outcome.metrics["train/images_per_s"]))
    return rows


# the settings `bench_train_cifar` measures: (row name, run.precision, run.compile)
CIFAR_SETTINGS = (
    ("fp32, channels_last", "fp32", False),
    ("bf16 autocast, channels_last", "bf16", False),
    ("fp32, torch.compile", "fp32", True),
)


@dataclass(frozen=True)
class Pair:
    """One setting: the bare loop's images/s and the pipeline's, measured in the same run."""

    name: str
    bare: float
    pipeline: float


def bench_train_cifar(
    root: Path, steps: int = 50, batch: int = 128, settings: tuple = CIFAR_SETTINGS
) -> tuple[list[Pair], float]:
    """The paper's ResNet-20 step (jobs/cifar10-resnet20: 32 px, the images held in memory, one
    worker on every core) in the pipeline and in `bare_loop`, for each of `settings` (the first
    fp32, the ratios' base; CIFAR_SETTINGS: fp32, bf16 autocast, compiled); then the
    fp32 bare loop as a Ray Train function (what Ray Train itself costs it). Private runs in a
    store of their own; each pipeline run evaluates 256 test images at its end.

    Returns:
        The pairs, and the fp32 bare loop's images/s as a Ray Train function.
    """
    import tempfile

    from pipeline.cluster.launch import fit_function, submit
    from pipeline.tracking import tracking_at

    threads = len(os.sched_getaffinity(0))
    index = load_index(root)
    gpu = str(torch.cuda.is_available()).lower()
    pairs, loops = [], []
    with tempfile.TemporaryDirectory() as tmp, tracking_at(f"sqlite:///{tmp}/mlflow.db"):
        for name, precision, compiled in settings:
            job = load_job(
                "cifar10-resnet20",
                [f"data.root='{root.resolve()}'", "iterations=0", "epochs=1",
                 f"run.max_steps_per_epoch={steps}", f"scaling.batch_size_per_worker={batch}",
                 f"scaling.cpus_per_worker={threads}", f"scaling.use_gpu={gpu}",
                 f"run.precision='{precision}'", f"run.compile={str(compiled).lower()}",
                 "data.val_images=256", f"run.log_every_steps={steps}", f"run.storage_path='{tmp}'"],
            )  # fmt: skip
            loop = (job.model.arch, len(index.classes), batch, job.data.crop_px, threads, steps,
                    job.run.channels_last, precision == "bf16", compiled)  # fmt: skip
            loops.append(loop)
            bare = in_worker_process(bare_loop, *loop)
            outcome = submit(
                job, f"bench-{precision}-{compiled}", index=index, say=lambda _: None, register=False
            )
            if not outcome.finished:
                raise RuntimeError(f"the {name} benchmark run failed: {outcome.error}")
            pairs.append(Pair(name, bare, outcome.metrics["train/images_per_s"]))
        on_ray = fit_function(_bare_loop_metrics, loops[0], threads, Path(tmp))["images_per_s"]  # fp32
    return pairs, on_ray
