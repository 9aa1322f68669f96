"""Faults on a real two-node Ray cluster (`ray.cluster_utils.Cluster`, one CPU a node, one
training worker on each): a worker process killed mid-epoch, and a node removed mid-epoch. Ray
Train restarts the run from its last checkpoint by itself (`run.max_failures`), within the same
`submit` call, and the MLflow run ends with every epoch and every step exactly once."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from conftest import small_job
from faults import KillAt
from mlflow.tracking import MlflowClient

from pipeline.cluster.launch import state_api_env, submit
from pipeline.tracking import tracking_uri
from pipeline.train import checkpoint

pytestmark = pytest.mark.ray
EPOCHS = 3
STEPS_PER_EPOCH = 3  # 50 training images, global batch 16


@pytest.fixture(scope="module")
def two_nodes():
    """A head and one more node, one CPU each; this module's driver is connected to it."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the session's local Ray, when an earlier test started it; later ones restart it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": state_api_env(cluster.head_node.webui_url)})
    yield cluster, second
    ray.shutdown()
    cluster.shutdown()


def _job(root: Path, *overrides: str):
    faults = ["run.max_failures=2", "run.checkpoint_every_steps=2", "run.sample_log=true"]
    return small_job(root, EPOCHS, *faults, *overrides)


def _histories(run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(tracking_uri())
    keys = ("val/top1", "train/loss", "train/step_loss", "train/lr")
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def _assert_contiguous(run_id: str, epochs: int = EPOCHS) -> dict[str, list[tuple[int, float]]]:
    """Every epoch once (MLflow step = epoch) and every optimizer step once (step = global step)."""
    histories = _histories(run_id)
    assert [step for step, _ in histories["val/top1"]] == list(range(epochs))
    assert [step for step, _ in histories["train/loss"]] == list(range(epochs))
    every_step = list(range(1, epochs * STEPS_PER_EPOCH + 1))
    assert [step for step, _ in histories["train/step_loss"]] == every_step
    assert [step for step, _ in histories["train/lr"]] == every_step
    assert MlflowClient(tracking_uri()).get_run(run_id).info.status == "FINISHED"
    return histories


def test_a_killed_worker_restarts_from_the_last_checkpoint_on_the_same_loss_trajectory(
    two_nodes, prepared_dataset, workdir
) -> None:
    job = _job(prepared_dataset)
    straight = submit(job, "straight", register=False)
    assert straight.finished, straight.error

    # rank 1 SIGKILLs its own process after step 4 (the 2nd of epoch 1). The checkpoints before
    # are at step 3 (epoch 0's end) and 4 (mid-epoch); the one reported just before the death may
    # not be registered yet, so the restart is at either
    killed = submit(job, "killed", step_hook=KillAt(5), register=False)
    assert killed.finished, killed.error
    assert (killed.run_dir / "faults" / "killed-at-step-5").is_file()
    lines = (killed.run_dir / "samples" / "rank1.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    restart = steps[5]
    assert restart in (3, 4) and steps == [*range(5), *range(restart, EPOCHS * STEPS_PER_EPOCH)]

    expected, got = _assert_contiguous(straight.mlflow_run_id), _assert_contiguous(killed.mlflow_run_id)
    for key in ("train/step_loss", "train/lr", "val/top1"):
        assert [s for s, _ in got[key]] == [s for s, _ in expected[key]]
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in expected[key]], rel=1e-4, abs=1e-5)


def test_a_removed_node_shrinks_the_run_to_one_worker_at_the_same_global_batch(
    two_nodes, prepared_dataset, workdir
) -> None:
    cluster, second = two_nodes
    job = _job(prepared_dataset, "scaling.min_workers=1", "epochs=4")
    samples = workdir / "runs" / "shrunk" / "samples" / "rank0.jsonl"

    def remove_node_mid_epoch() -> None:  # once rank 0 has taken step 4 (epoch 1), the node goes
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if samples.is_file() and any(json.loads(line)["step"] >= 4 for line in samples.open()):
                cluster.remove_node(second)
                return
            time.sleep(0.05)

    remover = threading.Thread(target=remove_node_mid_epoch)
    remover.start()
    shrunk = submit(job, "shrunk", register=False)
    remover.join()
    assert shrunk.finished, shrunk.error

    _assert_contiguous(shrunk.mlflow_run_id, epochs=4)
    final = checkpoint.load(checkpoint.latest(shrunk.run_dir))
    assert len(final["ranks"]) == 1  # it finished on the head node alone
    # alone, rank 0 takes the whole global batch of 16 per step, in 2 micro-batches of 8
    records = [json.loads(line) for line in samples.open()]
    assert [len(r["ids"]) for r in records[:4]] == [8] * 4  # steps 0-3 on two workers
    assert {len(r["ids"]) for r in records if r["step"] >= 8} == {16}  # the last epochs on one
