"""A real 2-worker Ray Train run (DDP over gloo, DALI on the CPU) tracked in a real MLflow store:
it fails at an injected fault, and a second submission resumes it to the end."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import mlflow
import pytest
import timm
import torch
from conftest import small_job
from faults import RaiseAt
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from pipeline.cluster.launch import SettingsChanged, fit_function, submit
from pipeline.data.index import load_index
from pipeline.system import GIL_SWITCH_INTERVAL_S
from pipeline.tracking import tracking_uri
from pipeline.train import checkpoint

pytestmark = pytest.mark.ray
EPOCHS = 3


def _small_job(root: Path, *overrides: str):
    return small_job(root, EPOCHS, *overrides)


def test_fault_then_resume_finishes_one_tracked_run(ray_session, prepared_dataset, workdir) -> None:
    job = _small_job(prepared_dataset, "optim.ema_decay=0.9", "optim.ema_every_steps=1", "target_top1=0.01")

    # first submission: rank 0 raises at global step 4 (epoch 1), after epoch 0's checkpoint
    failed = submit(job, "faulty", step_hook=RaiseAt(4), register=False)
    assert not failed.finished and "injected fault" in failed.error
    saved = checkpoint.latest(failed.run_dir)
    meta = checkpoint.read_meta(saved)
    assert (meta["epoch"], meta["step"], meta["epoch_step"]) == (1, 3, 0)

    # second submission of the same run (what `submit --resume faulty` does): resumes at epoch 1
    done = submit(job, "faulty")  # registered: its final weights are logged to the run
    assert done.finished, done.error
    assert done.mlflow_run_id == failed.mlflow_run_id
    assert {"train/loss", "train/images_per_s", "val/top1", "val/top5"} <= set(done.metrics)
    assert 0.0 <= done.metrics["val/top1"] <= done.metrics["val/top5"] <= 1.0
    final = checkpoint.read_meta(checkpoint.latest(done.run_dir))
    assert (final["epoch"], final["step"]) == (EPOCHS, 3 * EPOCHS)
    state = checkpoint.load(checkpoint.latest(done.run_dir))
    assert state["job"]["epochs"] == EPOCHS and "optimizer" in state
    assert state["ema"].keys() == state["model"].keys()
    assert len(state["ranks"]) == 2 and state["clock"]["train_s"] > 0

    # one MLflow run: the resolved job as params, every epoch's metrics exactly once
    client = MlflowClient(tracking_uri())
    run = client.get_run(done.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "quickstart"
    assert run.data.params["model.arch"] == "resnet50"
    assert run.data.params["optim.lr_per_256"] == "0.1"
    assert run.data.params["epochs"] == str(EPOCHS)
    assert run.data.params["global_batch_size"] == "16"
    assert run.data.params["dataset_hash"] == load_index(prepared_dataset).dataset_hash
    for key in (
        "train/loss",
        "val/top1",
        "val/top5",
        "train/images_per_s",
        "val/ema_top1",
        "train/data_wait",
    ):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(EPOCHS)), key
    assert client.get_metric_history(run.info.run_id, "time_to_target_s")  # 0.01 top-1 is reached at once
    # how long the workers waited at each checkpoint (the upload itself runs in the background):
    # one per epoch end, at its global step
    waits = client.get_metric_history(run.info.run_id, "train/checkpoint_s")
    assert sorted(m.step for m in waits) == [3, 6, 9] and all(0 < m.value < 60 for m in waits)
    top1 = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/top1")}
    assert top1[EPOCHS - 1] == pytest.approx(done.metrics["val/top1"])

    # the final weights, as plain tensors, load into the model
    weights = Path(client.download_artifacts(run.info.run_id, "weights/model.safetensors", str(workdir)))
    model = timm.create_model("resnet50", num_classes=4)
    model.load_state_dict(load_file(weights))

    # a third submission of a finished run trains nothing
    again = submit(job, "faulty")
    assert again.finished and again.metrics["val/top1"] == pytest.approx(done.metrics["val/top1"])
    assert checkpoint.latest(done.run_dir) == checkpoint.latest(again.run_dir)


def _samples(run_dir: Path) -> dict[tuple[int, int], list[int]]:
    """(rank, step) -> the sample ids of that batch; a step run again after a resume counts once."""
    seen = {}
    for rank in range(2):
        for line in (run_dir / "samples" / f"rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            seen[rank, record["step"]] = record["ids"]
    return seen


def test_a_run_resumed_mid_epoch_sees_exactly_the_uninterrupted_samples(
    ray_session, prepared_dataset, workdir
) -> None:
    job = _small_job(
        prepared_dataset, "epochs=2", "run.checkpoint_every_steps=2", "run.sample_log=true",
        "optim.ema_decay=0.5", "optim.ema_every_steps=1", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0",
    )  # fmt: skip
    straight = submit(job, "straight", register=False)
    assert straight.finished, straight.error

    # the fault hits at step 5, the 3rd step of epoch 1; the last checkpoint is mid-epoch, at step 4
    failed = submit(job, "interrupted", step_hook=RaiseAt(5), register=False)
    assert not failed.finished
    meta = checkpoint.read_meta(checkpoint.latest(failed.run_dir))
    assert (meta["epoch"], meta["step"], meta["epoch_step"]) == (1, 4, 1)
    resumed = submit(job, "interrupted", register=False)
    assert resumed.finished, resumed.error

    expected, got = _samples(straight.run_dir), _samples(resumed.run_dir)
    assert sorted(got) == sorted(expected) == [(rank, step) for rank in range(2) for step in range(6)]
    assert got == expected
    # and the same weights and EMA at the end, to float tolerance (same seed, data, order, mixing draws)
    end_a = checkpoint.load(checkpoint.latest(straight.run_dir))
    end_b = checkpoint.load(checkpoint.latest(resumed.run_dir))
    for part in ("model", "ema"):
        for name, tensor in end_a[part].items():
            torch.testing.assert_close(end_b[part][name], tensor, rtol=1e-4, atol=1e-5, msg=f"{part}.{name}")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_driver_draws_a_live_progress_bar(ray_session, prepared_dataset, workdir) -> None:
    terminal = _Terminal()
    done = submit(_small_job(prepared_dataset, "epochs=1"), "bar", progress_to=terminal, register=False)
    assert done.finished, done.error
    drawn = terminal.getvalue()
    assert "epoch 1/1" in drawn and "3/3 steps" in drawn
    assert all(part in drawn for part in ("loss ", " images/s", "data wait ", "ETA "))
    assert "epoch 0: train/loss" in drawn  # rank 0's epoch line, printed above the bar


@pytest.fixture(scope="module")
def one_epoch(ray_session, prepared_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """A finished one-epoch run whose lines went to a file, not a terminal: (its working folder,
    its outcome, the lines). Two tests read it, the first as it is, the second by resuming it."""
    folder = tmp_path_factory.mktemp("one-epoch")
    log = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        done = submit(_small_job(prepared_dataset, "epochs=1"), "lines", progress_to=log, register=False)
    assert done.finished, done.error
    return folder, done, log.getvalue()


def test_without_a_terminal_the_driver_prints_rank_0s_lines_and_nothing_of_rays(one_epoch) -> None:
    lines = one_epoch[2].splitlines()
    assert [line.split(" (")[0] for line in lines[:3]] == [
        "epoch 0 step 1/3",
        "epoch 0 step 2/3",
        "epoch 0 step 3/3",
    ]
    assert lines[3].startswith("epoch 0: train/loss") and len(lines) == 4


def test_fit_function_returns_the_metrics_a_ray_train_worker_computed(ray_session, tmp_path) -> None:
    # what bench train's "the same loop as a Ray Train function" row stands on
    def probe(scale: float) -> dict:
        import sys

        import ray.train

        context = ray.train.get_context()
        return {"value": 2 * scale, "world": context.get_world_size(), "pid": os.getpid(),
                "switch_interval": sys.getswitchinterval()}  # fmt: skip

    metrics = fit_function(probe, (1.5,), cpus=1, storage=tmp_path)
    assert metrics["value"] == 3.0 and metrics["world"] == 1
    assert metrics["pid"] != os.getpid()  # a worker process, not the driver
    assert metrics["switch_interval"] == GIL_SWITCH_INTERVAL_S  # set up as the pipeline's workers are


def test_a_run_resubmitted_with_other_settings_is_refused_unless_resumed_with_allow_changes(
    one_epoch, prepared_dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, first, _ = one_epoch
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    longer = _small_job(prepared_dataset, "epochs=2", "optim.lr_per_256=0.05")
    with pytest.raises(SettingsChanged, match=r"epochs 1 -> 2, optim.lr_per_256 0.1 -> 0.05"):
        submit(longer, "lines")  # nothing starts: the checkpoint stays where it was
    assert checkpoint.read_meta(checkpoint.latest(first.run_dir))["epoch"] == 1

    resumed = submit(longer, "lines", allow_changes=True, register=False)
    assert resumed.finished, resumed.error
    assert resumed.mlflow_run_id == first.mlflow_run_id
    assert checkpoint.read_meta(checkpoint.latest(resumed.run_dir))["epoch"] == 2
    client = MlflowClient(tracking_uri())
    run = client.get_run(first.mlflow_run_id)
    assert run.data.tags["settings_changed"] == "step 3: epochs, optim.lr_per_256"
    recorded = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/job/changed-at-step-3.json")
    assert recorded["changed"]["optim.lr_per_256"] == {"was": 0.1, "now": 0.05}
    assert run.data.params["optim.lr_per_256"] == "0.1"  # params stay as first logged


@pytest.mark.parametrize(
    "settings, evaluated",
    [
        ([], [0, 1, 2, 3, 4]),
        (["run.eval_every_epochs=2"], [1, 3, 4]),  # the last epoch always
        (["run.eval_every_iters=7"], [2, 4]),  # 3 steps an epoch: 7 passed in epoch 2, 14 in epoch 4 (last)
    ],
)
def test_evaluation_runs_as_often_as_asked_and_always_at_the_end(settings, evaluated) -> None:
    from pipeline.config import load_job
    from pipeline.train.loop import evaluates

    job = load_job("quickstart", settings)
    ends = [evaluates(job, epoch, 4, 3 * epoch, 3 * epoch + 3) for epoch in range(5)]
    assert [epoch for epoch, yes in enumerate(ends) if yes] == evaluated


def test_a_setting_added_since_a_checkpoint_is_no_change_at_its_default() -> None:
    from pipeline.cluster.launch import settings_changes
    from pipeline.config import load_job, to_dict

    now = to_dict(load_job("cifar10-resnet20"))
    older = json.loads(json.dumps(now))
    del older["run"]["eval_every_epochs"]  # a checkpoint written before the setting existed
    assert settings_changes(older, now) == {}
    changed = to_dict(load_job("cifar10-resnet20", ["run.eval_every_epochs=4"]))
    assert settings_changes(older, changed) == {"run.eval_every_epochs": (None, 4)}
