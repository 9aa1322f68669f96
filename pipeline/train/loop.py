"""The per-worker training loop, run by Ray Train on every rank, and `train_one_epoch`.

Every rank runs the same number of steps and calls `ray.train.report` the same number of times;
only rank 0 writes checkpoints and logs to MLflow.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from torch import nn

from pipeline import system
from pipeline.config import Job, from_dict
from pipeline.data.cache import stage
from pipeline.data.index import load_index
from pipeline.data.loader import Loader, build_loader
from pipeline.models import create_model
from pipeline.storage import Location
from pipeline.tracking import UNSENT_FILE, RunLogger
from pipeline.train import persist
from pipeline.train.ema import WeightEMA
from pipeline.train.optim import build_optimizer, lr_at
from pipeline.train.progress import BoardHandler, Progress
from pipeline.train.step import Stepper, all_reduce_sum, configure_backends, evaluate
from pipeline.train.worker import State, Worker

log = logging.getLogger("resnet_pipe")
UNSCORED = -1.0  # the val/top1 of a mid-epoch checkpoint: below any real accuracy
WARMUP_STEPS = 2  # steps left out of the images/s of an epoch


def _setup_logging(board) -> None:
    """Where this rank's lines go, once: rank 0's to the driver's board (`pipeline.train.progress`),
    the others' to the worker's stdout (Ray's log files).

    Ray Train routes `print` and the root logger to its console handler at INFO, which also
    echoes its own per-report records; the root logger goes to WARNING (Ray's log files still hold
    everything of Ray's).
    """
    logging.getLogger().setLevel(logging.WARNING)
    if not log.handlers:
        handler = BoardHandler(board) if board is not None else logging.StreamHandler(sys.__stdout__)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point. `config`: job (resolved, as a dict), data_root, run_dir,
    tracking_uri, mlflow_run_id, tracking_env (MLflow credentials), step_hook (called before
    each step as `hook(rank, world, step, run_dir)`: where tests inject faults; None otherwise),
    board: the driver's board (rank 0's lines go there; None: to stdout), and live_bar: whether
    the driver draws a bar from rank 0's progress (else rank 0 sends progress lines)."""
    entered = time.perf_counter()
    submitted = from_dict(config["job"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _setup_logging(config.get("board") if rank == 0 else None)
    job = submitted.at_world(world)  # the same global batch at any worker count
    device = ray.train.torch.get_device()
    configure_backends(device)
    torch.set_num_threads(job.scaling.cpus_per_worker)
    system.quick_gil_handoffs()

    # model, EMA, optimizer, state; the checkpoint wins over fresh initialisation
    index = load_index(config["data_root"])
    if index.root.remote and job.data.cache_dir:  # read from this node's copy (pipeline.data.cache)
        index = load_index(stage(index.root, Path(job.data.cache_dir), job.data.source))
    torch.manual_seed(job.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    model = create_model(
        job.model.arch, num_classes=len(index.classes), zero_init_last=job.model.zero_init_last_bn
    )
    if job.model.sync_batchnorm and device.type == "cuda" and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if job.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(job.seed + 1 + rank)  # from here on (mixup draws) each rank has its own stream
    worker = Worker(
        job, submitted, rank, world, device, model, build_optimizer(model, job),
        ema=WeightEMA(model, job.optim.ema_decay, job.optim.ema_every_steps) if job.optim.ema_decay else None,
        logger=_logger(config) if rank == 0 else None,
        sample_log=Path(config["run_dir"]) / "samples" / f"rank{rank}.jsonl" if job.run.sample_log else None,
        run_dir=Location(config["run_dir"]), step_hook=config.get("step_hook"),
        board=config.get("board") if rank == 0 and config.get("live_bar") else None,
    )  # fmt: skip
    persist.clear_unsent_checkpoints(worker.run_dir)  # every rank, on its node: before DDP's first collective
    if rank == 0:
        # an attempt after a failure goes over steps an earlier one logged (after its checkpoint,
        # or from the start when the failure came before the first checkpoint): logged once
        worker.logger.skip_logged()
    restored = persist.restore(worker)
    state, loader_state, scaler_state = restored or (State(), None, None)
    ddp_model = ray.train.torch.prepare_model(model)  # wraps in DDP when world > 1
    step_fn = Stepper(
        torch.compile(ddp_model) if job.run.compile else ddp_model,
        worker.optimizer, job, device, num_classes=len(index.classes),
    )  # fmt: skip
    worker.scaler = step_fn.scaler
    if scaler_state:
        step_fn.scaler.load_state_dict(scaler_state)

    # data: a restored loader continues at the exact sample (and augmentation draw) it stopped at
    crop_px = job.crop_px_at(state.epoch)
    train_loader = build_loader(
        job, index, "train", rank, world, device, checkpoint=loader_state, crop_px=crop_px
    )
    val_loader = build_loader(job, index, "val", rank, world, device)
    steps_per_epoch = len(train_loader) // job.optim.accumulation_steps
    if job.run.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, job.run.max_steps_per_epoch)
    if loader_state is None and state.epoch_step:  # re-sharded mid-epoch: line up with the epoch's end
        train_loader.skip(state.epoch_step * job.optim.accumulation_steps)

    if restored:  # the clock goes on from the checkpoint's, plus this attempt's set-up
        state.train_s += time.perf_counter() - entered
    else:  # a run's clock starts when `submit` did (Ray's start and the workers' set-up count)
        state.train_s = time.time() - config.get("submitted_at", time.time())
    last_epoch = job.epochs_for(steps_per_epoch) - 1
    for epoch in range(state.epoch, last_epoch + 1):
        if job.crop_px_at(epoch) != crop_px:  # progressive resizing: same sample order, new size
            crop_px = job.crop_px_at(epoch)
            position = train_loader.state()
            train_loader = build_loader(
                job, index, "train", rank, world, device, checkpoint=position, crop_px=crop_px
            )
        started, step_before = time.perf_counter(), state.step
        steps = job.steps_in(epoch, steps_per_epoch)
        metrics = train_one_epoch(worker, step_fn, train_loader, state, steps, steps_per_epoch)
        train_loader.end_epoch(len(train_loader) - steps * job.optim.accumulation_steps)
        per_class = None
        if evaluates(job, epoch, last_epoch, step_before, state.step):
            scores = evaluate(model, val_loader, device, job, len(index.classes))
            metrics |= scores.metrics
            per_class = {"model": scores.per_class}
            if worker.ema is not None:
                ema = evaluate(worker.ema.model, val_loader, device, job, len(index.classes))
                metrics |= {"val/ema_top1": ema.metrics["val/top1"], "val/ema_top5": ema.metrics["val/top5"]}
                per_class["ema"] = ema.per_class
        state.train_s += time.perf_counter() - started
        reached = metrics.get("val/top1", UNSCORED) >= job.target_top1 > 0
        if reached and state.target_reached_s is None:
            state.target_reached_s = state.train_s
        if state.target_reached_s is not None:
            metrics["time_to_target_s"] = state.target_reached_s
        state.epoch, state.epoch_step = epoch + 1, 0
        metrics["iterations"] = state.step  # where this epoch's scores stand on an iteration axis
        metrics["elapsed_s"] = state.train_s  # and on a wall-clock axis
        if rank == 0:
            shown = (
                "train/loss",
                "val/top1",
                "val/top5",
                "val/ema_top1",
                "train/images_per_s",
                "train/data_wait",
            )
            log.info(f"epoch {epoch}: " + "  ".join(f"{k} {metrics[k]:.4f}" for k in shown if k in metrics))
            worker.logger.log_metrics(metrics, step=epoch)
        # an epoch not evaluated ranks below every scored checkpoint (Ray keeps the latest too)
        scored = {"val/top1": UNSCORED} | metrics
        persist.save_and_report(worker, state, train_loader, scored | {"epoch": epoch}, per_class)
    if rank == 0:
        for upload in worker.uploads:  # the last checkpoints' upload times are logged too
            upload.wait()
        worker.logger.close()  # what MLflow has not taken yet, sent now or kept in a file
        if config.get("board") is not None:
            ray.get(config["board"].flush.remote())


def evaluates(job: Job, epoch: int, last_epoch: int, step_before: int, step_after: int) -> bool:
    """Whether the end of `epoch` (optimizer steps `step_before` to `step_after`) is evaluated: the
    last epoch always; else every `run.eval_every_epochs` epochs, or, with `run.eval_every_iters`,
    the end of each epoch in which the step count passed a multiple of it."""
    if epoch == last_epoch:
        return True
    if job.run.eval_every_iters:
        return step_after // job.run.eval_every_iters > step_before // job.run.eval_every_iters
    return (epoch + 1) % job.run.eval_every_epochs == 0


def _logger(config: dict) -> RunLogger:
    if config.get("tracking_env") is not None:  # MLflow reads credentials from the environment
        os.environ.update(ray.get(config["tracking_env"]))
    unsent = Location(config["run_dir"]) / UNSENT_FILE  # where metrics MLflow never took are kept
    return RunLogger(config["tracking_uri"], config["mlflow_run_id"], unsent)


def train_one_epoch(
    worker: Worker, step_fn: Stepper, loader: Loader, state: State, steps: int, steps_per_epoch: int
) -> dict[str, float]:
    """Runs the rest of the epoch (`steps` optimizer steps in all, each over
    `optim.accumulation_steps` batches; fewer than `steps_per_epoch` where `iterations` end);
    checkpoints every `run.checkpoint_every_steps` steps too.

    Returns:
        train/loss (mean over ranks), train/images_per_s (all ranks, steady state: from the end of
        the WARMUP_STEPS-th step, when the epoch has more), train/images_per_s_per_worker, and
        train/data_wait (the share of time this rank waited for its next batch).
    """
    step_fn.model.train()
    job = worker.job
    loss_sum = torch.zeros((), device=worker.device)
    misses = step_fn.take_misses()  # zeros: the epoch's misses from here
    first, images_seen, waited = state.epoch_step, 0, 0.0
    batches = iter(loader)
    start = time.perf_counter()
    timed_from = first + WARMUP_STEPS if steps - first > 2 * WARMUP_STEPS else first
    while state.epoch_step < steps:
        if state.epoch_step == timed_from:  # the first steps pay for allocator and kernel warm-up
            images_seen, waited, start = 0, 0.0, time.perf_counter()
        if worker.step_hook is not None:
            worker.step_hook(worker.rank, worker.world, state.step, worker.run_dir)
        fetch = time.perf_counter()
        micro = [next(batches) for _ in range(job.optim.accumulation_steps)]
        waited += time.perf_counter() - fetch
        if worker.sample_log:
            _append_ids(worker.sample_log, state, torch.cat([ids for _, _, ids in micro]))
        lr = lr_at(state.step, job, steps_per_epoch)
        loss = step_fn([(images, labels) for images, labels, _ in micro], lr)
        loss_sum += loss
        images_seen += sum(len(labels) for _, labels, _ in micro) * worker.world
        state.step += 1
        state.epoch_step += 1
        if worker.ema is not None:
            worker.ema.update(worker.model, state.step)
        if worker.rank == 0 and state.epoch_step % job.run.log_every_steps == 0:
            since = timed_from if state.epoch_step > timed_from else first
            elapsed, timed = time.perf_counter() - start, state.epoch_step - since
            window = step_fn.take_misses()
            misses += window
            progress = _progress(state, steps, loss, window, images_seen, waited, elapsed, timed)
            if worker.board is not None:
                worker.board.post.remote(progress)  # the driver draws the bar
            else:
                log.info(progress.line())
            worker.logger.log_metrics(progress.metrics(lr), step=state.step)
        every = job.run.checkpoint_every_steps
        if every and state.step % every == 0 and state.epoch_step < steps:
            # val/top1 -1: Ray ranks mid-epoch checkpoints below every scored one (the latest stays)
            mid = {"train/step_loss": float(loss), "epoch": state.epoch, "val/top1": UNSCORED}
            persist.save_and_report(worker, state, loader, mid)
    elapsed = time.perf_counter() - start
    taken = torch.tensor(float(state.epoch_step - first), device=loss_sum.device)
    loss_mean = all_reduce_sum(torch.stack([loss_sum, taken]))
    misses = all_reduce_sum(misses + step_fn.take_misses())
    return {
        "train/loss": float(loss_mean[0] / loss_mean[1]),
        "train/error": float(misses[0] / misses[1].clamp(min=1)),
        "train/images_per_s": images_seen / elapsed,
        "train/images_per_s_per_worker": images_seen / elapsed / worker.world,
        "train/data_wait": waited / elapsed,
    }


def _progress(
    state: State,
    steps: int,
    loss: torch.Tensor,
    misses: torch.Tensor,
    images: int,
    waited: float,
    elapsed: float,
    timed_steps: int,
) -> Progress:
    eta_s = elapsed / max(timed_steps, 1) * (steps - state.epoch_step)
    # note: .item() and .tolist() are device sync points, once every log_every_steps steps
    missed, seen = misses.tolist()
    error = missed / max(seen, 1)
    return Progress(
        state.epoch, state.epoch_step, steps, loss.item(), error, images / elapsed, waited / elapsed, eta_s
    )


def _append_ids(path: Path, state: State, ids: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"epoch": state.epoch, "step": state.step, "ids": ids.tolist()}) + "\n")
