"""A rank's checkpoints on their way to the run's storage and back: rank 0 writes the full state
to a local folder (`save_and_report`), Ray Train reports it and `upload` copies it to storage
on a background thread, retrying an object store that fails, meta.json last; a restarted
attempt reads the newest checkpoint that is whole (`restore`), passing over a truncated,
altered or incomplete one by name.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import ray.train
import torch

from pipeline.data.loader import Loader
from pipeline.storage import Location, PatientHandler, patiently
from pipeline.train import checkpoint, usage
from pipeline.train.step import gather_objects
from pipeline.train.worker import State, Worker

log = logging.getLogger("resnet_pipe")


def checkpoint_scratch(run_dir: Location) -> Path:
    """Where rank 0 writes this run's checkpoints before Ray Train uploads them."""
    return Path(tempfile.gettempdir()) / "resnet-pipe-checkpoints" / run_dir.name


def clear_unsent_checkpoints(run_dir: Location) -> None:
    """Removes what an earlier attempt of the run left half-uploaded on this node (its worker
    ended mid-upload): nothing else writes there, and the new attempt has not begun to."""
    shutil.rmtree(checkpoint_scratch(run_dir), ignore_errors=True)


def restore(worker: Worker) -> tuple[State, bytes | None, dict | None] | None:
    """Loads the latest checkpoint, if any, into the model, EMA and optimizer; returns the state,
    this rank's data-pipeline state (None: start the loader afresh) and the GradScaler's state
    (loaded by the caller, which creates the scaler after DDP wraps the model)."""
    loaded = _whole_checkpoint(worker)
    if loaded is None:
        return None
    worker.model.load_state_dict(loaded["model"])
    worker.optimizer.load_state_dict(loaded["optimizer"])
    if worker.ema is not None and loaded.get("ema") is not None:
        worker.ema.load_state_dict(loaded["ema"])
    state = State(loaded["epoch"], loaded["step"], loaded["epoch_step"], **loaded["clock"])
    ranks = loaded["ranks"]
    if len(ranks) == worker.world:
        torch.set_rng_state(ranks[worker.rank]["torch_rng"])
        loader_state = ranks[worker.rank]["loader"]
    else:
        # another number of workers (elastic): the data is re-sharded over the new workers, which
        # take the epoch's remaining steps from fresh shards, at the same global batch
        torch.manual_seed(worker.job.seed + 1 + worker.rank + 7919 * state.step)
        loader_state = None
    if worker.rank == 0:
        job, resized = worker.job, f" (was {len(ranks)} workers)" if len(ranks) != worker.world else ""
        log.info(
            f"resuming at epoch {state.epoch}, step {state.step} ({state.epoch_step} into the epoch) on "
            f"{worker.world} workers{resized}: {job.optim.accumulation_steps} x "
            f"{job.scaling.batch_size_per_worker} images per worker and step, "
            f"global batch {job.global_batch_size}"
        )
    return state, loader_state, loaded["scaler"]


def _whole_checkpoint(worker: Worker) -> dict | None:
    """The newest checkpoint of the run that reads whole, read from the run's storage: Ray Train's
    latest, else (its weights truncated, altered or missing: `checkpoint.CorruptCheckpoint`, named
    in a warning) the one before it, and so on; None when the run has none. Every rank reads the
    same one."""
    saved = ray.train.get_checkpoint()
    if saved is None:
        return None
    latest = worker.run_dir / saved.path.rstrip("/").rsplit("/", 1)[-1]
    step = checkpoint.read_meta(latest)["step"]
    earlier = checkpoint.newest_first(worker.run_dir, before_step=step)  # each meta.json read once
    problem = None
    for folder in [latest, *earlier]:
        try:
            state = checkpoint.load(folder)
        except checkpoint.CorruptCheckpoint as e:
            problem = str(e)
            continue
        if problem and worker.rank == 0:
            log.warning(f"warning: {problem}; resuming from the checkpoint before it, {folder}")
        return state
    if worker.rank == 0:
        log.warning(f"warning: {problem}; no earlier whole checkpoint: the run starts from the beginning")
    return None


def save_and_report(
    worker: Worker,
    state: State,
    loader: Loader,
    metrics: dict[str, float],
    per_class: dict[str, torch.Tensor] | None = None,
) -> None:
    """A full-state checkpoint (model, optimizer, GradScaler, EMA, every rank's data-pipeline and
    RNG state, the job, and at an epoch's end each class's validation errors), reported through
    Ray Train.

    Every rank calls this the same number of times (report is collective); only rank 0 writes.
    Rank 0 writes the checkpoint to a local folder and Ray Train uploads it to the run's storage
    in the background (CheckpointUploadMode.ASYNC, deleting the local copy once it is there), so
    the workers go on training while a large checkpoint (about 720 MB for r152 with EMA) travels;
    a resume takes the latest checkpoint whose upload completed. One upload is in flight at most:
    rank 0 waits here for the previous one, so that a store slower than training holds training
    back rather than letting checkpoints pile up on the node (and a lost node costs at most two
    checkpoint intervals, one when uploads take less than an interval). `train/checkpoint_s` is
    how long the workers waited here.
    """
    started = time.perf_counter()
    if worker.uploads:  # one upload in flight at most: a store slower than training holds it back
        worker.uploads[-1].wait()  # (the other ranks wait at the gather below)
    mine = {"loader": loader.state(), "torch_rng": torch.get_rng_state(), "system": usage.sample()}
    ranks = gather_objects(mine)
    node_usage = usage.per_node([r.pop("system") for r in ranks])
    if worker.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    # Ray deletes the folder once uploaded; one whose upload a failure cut short is removed when
    # the run's next attempt starts (`clear_unsent_checkpoints`)
    scratch = checkpoint_scratch(worker.run_dir)
    scratch.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="checkpoint-", dir=scratch))
    uploaded = threading.Event()
    worker.uploads.append(uploaded)
    checkpoint.save(
        folder, model=worker.model, optimizer=worker.optimizer, epoch=state.epoch, step=state.step,
        epoch_step=state.epoch_step, ranks=ranks, job=worker.submitted, metrics=metrics,
        scaler=worker.scaler, ema=worker.ema.model if worker.ema else None,
        clock={"train_s": state.train_s, "target_reached_s": state.target_reached_s},
        per_class=per_class,
    )  # fmt: skip
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(folder),
        checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
        checkpoint_upload_fn=functools.partial(_upload, worker, state.step, uploaded),
        delete_local_checkpoint_after_upload=False,  # _upload does, once it is whole in storage
    )
    node_usage["train/checkpoint_s"] = time.perf_counter() - started
    worker.logger.log_metrics(node_usage, step=state.step)


def _upload(
    worker: Worker, step: int, uploaded: threading.Event, local: ray.train.Checkpoint, name: str
) -> ray.train.Checkpoint:
    """Ray Train's upload of rank 0's checkpoint (on its background thread: training goes on),
    each file retried with backoff while the store fails (`storage.patiently`, up to
    `run.storage_outage_s`), and meta.json last: a checkpoint is complete in storage once its
    meta.json is there, and Ray records it only once this returns. The seconds it took are
    logged as `train/checkpoint_upload_s` at the checkpoint's step; `uploaded` is set at the end,
    whatever happened."""
    try:
        started = time.perf_counter()
        storage = ray.train.get_context().get_storage()
        fs, target = storage.storage_filesystem, f"{storage.experiment_fs_path}/{name}"
        source = Path(local.path)
        object_store = isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, PatientHandler)
        if not object_store:  # a folder all nodes mount: the checkpoint's folder comes first
            fs.create_dir(target, recursive=True)
        for file in sorted(source.iterdir(), key=lambda f: (f.name == checkpoint.META, f.name)):
            to = f"{target}/{file.name}"
            if object_store:
                fs.handler.upload(file, to)  # retried while the store fails
            else:
                copy = functools.partial(pafs.copy_files, str(file), to, pafs.LocalFileSystem(), fs)
                patiently(copy, to, worker.job.run.storage_outage_s, log.warning)
        worker.logger.log_metrics({"train/checkpoint_upload_s": time.perf_counter() - started}, step=step)
        shutil.rmtree(source, ignore_errors=True)
        return ray.train.Checkpoint(target, filesystem=fs)
    finally:
        uploaded.set()
