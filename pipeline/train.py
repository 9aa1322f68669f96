"""The per-worker training loop, run by Ray Train on every rank, and `train_one_epoch`.

Every rank runs the same number of steps and calls `ray.train.report` the same number of times;
only rank 0 writes checkpoints and logs to MLflow.
"""

from __future__ import annotations

import json
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
from torch import nn

from pipeline import checkpoint
from pipeline.config import Job, from_dict
from pipeline.dataset import load_index
from pipeline.loader import Loader, build_loader
from pipeline.optim import build_optimizer, lr_at
from pipeline.step import Stepper, all_reduce_sum, evaluate, gather_objects, uses_channels_last
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
    epoch: int = 0  # the epoch in progress (or next to run, when epoch_step is 0)
    step: int = 0  # next global step (optimizer steps since the start)
    epoch_step: int = 0  # steps of `epoch` already taken: > 0 only in a mid-epoch checkpoint


@dataclass
class Worker:
    """What every part of one rank's loop shares."""

    job: Job
    rank: int
    world: int
    device: torch.device
    model: nn.Module  # the bare model: checkpoints and evaluation use it, not the DDP wrapper
    optimizer: torch.optim.Optimizer
    logger: RunLogger | None  # rank 0 only
    sample_log: Path | None  # where this rank appends the ids of every batch, when asked
    fail_at_step: int | None  # an injected fault, for tests


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point. `config`: job (resolved, as a dict), data_root, run_dir,
    tracking_uri, mlflow_run_id, and fail_at_step (an injected fault for tests, or None)."""
    _setup_logging()
    job: Job = from_dict(config["job"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(job.scaling.cpus_per_worker)

    # model, optimizer, state; the checkpoint wins over fresh initialisation
    index = load_index(Path(config["data_root"]))
    torch.manual_seed(job.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    model = timm.create_model(
        job.model.arch, num_classes=len(index.classes), zero_init_last=job.model.zero_init_last_bn
    )
    torch.manual_seed(job.seed + 1 + rank)  # from here on (mixup draws) each rank has its own stream
    worker = Worker(
        job, rank, world, device, model, build_optimizer(model, job),
        logger=RunLogger(config["tracking_uri"], config["mlflow_run_id"]) if rank == 0 else None,
        sample_log=Path(config["run_dir"]) / "samples" / f"rank{rank}.jsonl" if job.run.sample_log else None,
        fail_at_step=config.get("fail_at_step"),
    )  # fmt: skip
    state, loader_state = _restore(worker)
    if uses_channels_last(job, device):
        model = model.to(memory_format=torch.channels_last)
    ddp_model = ray.train.torch.prepare_model(model)  # moves to the device, wraps in DDP when world > 1

    # data: a restored loader continues at the exact sample (and augmentation draw) it stopped at
    crop_px = job.crop_px_at(state.epoch)
    train_loader = build_loader(
        job, index, "train", rank, world, device, checkpoint=loader_state, crop_px=crop_px
    )
    val_loader = build_loader(job, index, "val", rank, world, device)
    steps_per_epoch = len(train_loader)
    if job.run.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, job.run.max_steps_per_epoch)
    step_fn = Stepper(ddp_model, worker.optimizer, job, device, num_classes=len(index.classes))

    for epoch in range(state.epoch, job.epochs):
        if job.crop_px_at(epoch) != crop_px:  # progressive resizing: same sample order, new size
            crop_px = job.crop_px_at(epoch)
            position = train_loader.state()
            train_loader = build_loader(
                job, index, "train", rank, world, device, checkpoint=position, crop_px=crop_px
            )
        train_metrics = train_one_epoch(worker, step_fn, train_loader, state, steps_per_epoch)
        metrics = train_metrics | evaluate(model, val_loader, device, job) | {"epoch": epoch}
        state.epoch, state.epoch_step = epoch + 1, 0
        if rank == 0:
            log.info(
                f"epoch {epoch}: train/loss {metrics['train/loss']:.4f}  val/top1 {metrics['val/top1']:.4f}  "
                f"val/top5 {metrics['val/top5']:.4f}  train/images_per_s {metrics['train/images_per_s']:.1f}"
            )
            worker.logger.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        _save_and_report(worker, state, train_loader, metrics)
    if rank == 0:
        worker.logger.log_weights(model)


def _restore(worker: Worker) -> tuple[State, str | None]:
    """Loads the latest checkpoint, if any, into the model and optimizer; returns the state and
    this rank's data-pipeline state (None: start the loader afresh)."""
    saved = ray.train.get_checkpoint()
    if saved is None:
        return State(), None
    with saved.as_directory() as folder:
        loaded = checkpoint.load(Path(folder))
    worker.model.load_state_dict(loaded["model"])
    worker.optimizer.load_state_dict(loaded["optimizer"])
    state = State(loaded["epoch"], loaded["step"], loaded["epoch_step"])
    ranks = loaded["ranks"]
    if len(ranks) == worker.world:
        torch.set_rng_state(ranks[worker.rank]["torch_rng"])
        loader_state = ranks[worker.rank]["loader"]
    else:  # another number of workers: the shards differ, so the epoch in progress starts over
        state.step, state.epoch_step, loader_state = state.step - state.epoch_step, 0, None
    if worker.rank == 0:
        log.info(f"resuming at epoch {state.epoch}, step {state.step} ({state.epoch_step} into the epoch)")
    return state, loader_state


def _save_and_report(worker: Worker, state: State, loader: Loader, metrics: dict[str, float]) -> None:
    """A checkpoint with every rank's data-pipeline and RNG state, reported through Ray Train.

    Every rank calls this the same number of times (report is collective); only rank 0 writes.
    """
    mine = {"loader": loader.state(), "torch_rng": torch.get_rng_state()}
    ranks = gather_objects(mine)
    with tempfile.TemporaryDirectory() as tmp:
        saved = None
        if worker.rank == 0:
            checkpoint.save(
                Path(tmp), model=worker.model, optimizer=worker.optimizer, epoch=state.epoch, step=state.step,
                epoch_step=state.epoch_step, ranks=ranks, job=worker.job, metrics=metrics,
            )  # fmt: skip
            saved = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=saved)


def train_one_epoch(
    worker: Worker, step_fn: Stepper, loader: Loader, state: State, steps: int
) -> dict[str, float]:
    """Runs the rest of the epoch (`steps` in all); returns the mean loss over the ranks and the
    global images/s. Checkpoints every `run.checkpoint_every_steps` steps as well."""
    step_fn.model.train()
    job = worker.job
    loss_sum = torch.zeros((), device=worker.device)
    first, images_seen = state.epoch_step, 0
    start = time.perf_counter()
    for images, labels, ids in loader:
        if state.epoch_step == steps:
            break
        if worker.fail_at_step == state.step and worker.rank == 0:
            raise RuntimeError(f"injected fault at step {state.step} (RESNET_PIPE_FAIL_AT_STEP)")
        if worker.sample_log:
            _append_ids(worker.sample_log, state, ids)
        loss = step_fn(images, labels, lr_at(state.step, job, steps))
        loss_sum += loss
        images_seen += images.shape[0] * worker.world
        state.step += 1
        state.epoch_step += 1
        if worker.rank == 0 and state.epoch_step % job.run.log_every_steps == 0:
            rate = images_seen / (time.perf_counter() - start)
            # note: .item() is a device sync point, once every log_every_steps steps
            progress = f"epoch {state.epoch} step {state.epoch_step}/{steps}"
            log.info(f"{progress} loss {loss.item():.4f} images/s {rate:.1f}")
        every = job.run.checkpoint_every_steps
        if every and state.step % every == 0 and state.epoch_step < steps:
            _save_and_report(worker, state, loader, {"train/step_loss": float(loss), "epoch": state.epoch})
    elapsed = time.perf_counter() - start
    taken = torch.tensor(float(state.epoch_step - first), device=loss_sum.device)
    loss_mean = all_reduce_sum(torch.stack([loss_sum, taken]))
    return {"train/loss": float(loss_mean[0] / loss_mean[1]), "train/images_per_s": images_seen / elapsed}


def _append_ids(path: Path, state: State, ids: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"epoch": state.epoch, "step": state.step, "ids": ids.tolist()}) + "\n")
