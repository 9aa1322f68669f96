"""The per-worker training loop, run by Ray Train on every rank, and `train_one_epoch`.

Every rank runs the same number of steps and calls `ray.train.report` the same number of times;
only rank 0 writes checkpoints and logs to MLflow.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.train.torch
import timm
import torch

from pipeline import checkpoint
from pipeline.config import Job, from_dict
from pipeline.dataset import load_index
from pipeline.loader import Loader, build_loader
from pipeline.optim import build_optimizer, lr_at
from pipeline.step import Stepper, all_reduce_sum, evaluate, uses_channels_last
from pipeline.tracking import RunLogger

log = logging.getLogger("resnet_pipe")


def _setup_logging() -> None:
    """Progress lines straight to the worker's stdout (Ray forwards it to the driver), once.

    Ray Train routes `print` and the root logger to its console handler at INFO, which also
    echoes its own per-report records; the root logger goes to WARNING so the terminal shows
    progress, not bookkeeping (Ray's log files still hold everything).
    """
    logging.getLogger().setLevel(logging.WARNING)
    if not log.handlers:
        handler = logging.StreamHandler(sys.__stdout__)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


@dataclass
class State:
    epoch: int = 0  # next epoch to run
    step: int = 0  # next global step (optimizer steps since the start)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point. `config`: job (resolved, as a dict), data_root, tracking_uri,
    mlflow_run_id, and fail_at_step (an injected fault for tests, or None)."""
    _setup_logging()
    job: Job = from_dict(config["job"])
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(job.scaling.cpus_per_worker)

    # model, optimizer, state; the checkpoint wins over fresh initialisation
    index = load_index(Path(config["data_root"]))
    torch.manual_seed(job.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    model = timm.create_model(
        job.model.arch, num_classes=len(index.classes), zero_init_last=job.model.zero_init_last_bn
    )
    optimizer = build_optimizer(model, job)
    state = State()
    if (saved := ray.train.get_checkpoint()) is not None:
        with saved.as_directory() as folder:
            loaded = checkpoint.load(Path(folder))
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        state = State(epoch=loaded["epoch"], step=loaded["step"])
        if rank == 0:
            log.info(f"resuming at epoch {state.epoch}, step {state.step}")
    if uses_channels_last(job, device):
        model = model.to(memory_format=torch.channels_last)
    ddp_model = ray.train.torch.prepare_model(model)  # moves to the device, wraps in DDP when world > 1

    # data: the reader's order depends on the epoch it starts at, so a resumed run does not replay epoch 0
    train_loader = build_loader(job, index, "train", rank, world, device, seed=job.seed + state.epoch)
    val_loader = build_loader(job, index, "val", rank, world, device)
    steps_per_epoch = len(train_loader)
    if job.run.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, job.run.max_steps_per_epoch)
    logger = RunLogger(config["tracking_uri"], config["mlflow_run_id"]) if rank == 0 else None
    step_fn = Stepper(ddp_model, optimizer, job, device)

    for epoch in range(state.epoch, job.epochs):
        train_metrics = train_one_epoch(step_fn, train_loader, state, steps_per_epoch, rank, world, config)
        metrics = train_metrics | evaluate(model, val_loader, device, job) | {"epoch": epoch}
        state.epoch = epoch + 1
        if rank == 0:
            log.info(
                f"epoch {epoch}: train/loss {metrics['train/loss']:.4f}  val/top1 {metrics['val/top1']:.4f}  "
                f"val/top5 {metrics['val/top5']:.4f}  train/images_per_s {metrics['train/images_per_s']:.1f}"
            )
            logger.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        # every rank reports the same number of times, or the job hangs; only rank 0 writes files
        with tempfile.TemporaryDirectory() as tmp:
            saved = None
            if rank == 0:
                checkpoint.save(
                    Path(tmp), model=model, optimizer=optimizer, epoch=state.epoch, step=state.step,
                    job=job, metrics=metrics,
                )  # fmt: skip
                saved = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=saved)
    if rank == 0:
        logger.log_weights(model)


def train_one_epoch(
    step_fn: Stepper, loader: Loader, state: State, steps: int, rank: int, world: int, config: dict
) -> dict[str, float]:
    """Runs `steps` steps; returns the mean loss over all ranks and the global images/s."""
    step_fn.model.train()
    job = step_fn.job
    loss_sum = torch.zeros((), device=step_fn.device)
    images_seen = 0
    start = time.perf_counter()
    for i, (images, labels, _ids) in enumerate(loader):
        if i == steps:
            break
        if config.get("fail_at_step") == state.step and rank == 0:
            raise RuntimeError(f"injected fault at step {state.step} (RESNET_PIPE_FAIL_AT_STEP)")
        loss = step_fn(images, labels, lr_at(state.step, job, steps))
        loss_sum += loss
        images_seen += images.shape[0] * world
        state.step += 1
        if rank == 0 and (i + 1) % job.run.log_every_steps == 0:
            rate = images_seen / (time.perf_counter() - start)
            # note: .item() is a device sync point, once every log_every_steps steps
            log.info(f"epoch {state.epoch} step {i + 1}/{steps} loss {loss.item():.4f} images/s {rate:.1f}")
    elapsed = time.perf_counter() - start
    loss_mean = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(steps), device=loss_sum.device)]))
    return {"train/loss": float(loss_mean[0] / loss_mean[1]), "train/images_per_s": images_seen / elapsed}
