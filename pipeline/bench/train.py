"""`resnet-pipe bench train`: the whole training pipeline (Ray Train, DALI, MLflow tracking)
against a bare PyTorch loop over in-memory tensors, same model, batch, threads and malloc
settings; then 2 DDP workers against 1 on the same cores."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from pipeline.bench.data import Result
from pipeline.bench.process import in_worker_process
from pipeline.config import load_job
from pipeline.data.index import load_index


def bare_loop(
    arch: str, num_classes: int, batch: int, crop_px: int, threads: int, steps: int, channels_last: bool
) -> float:
    """Images/s of a plain PyTorch training loop over in-memory tensors: the ceiling."""
    from pipeline.models import create_model

    torch.set_num_threads(threads)
    model = create_model(arch, num_classes=num_classes).train()
    images = torch.randn(batch, 3, crop_px, crop_px)
    if channels_last:  # the job's memory format, as the pipeline's step uses it
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    labels = torch.randint(0, num_classes, (batch,))
    for step in range(steps):
        if step == 2:  # the same warm-up the pipeline leaves out
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
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
