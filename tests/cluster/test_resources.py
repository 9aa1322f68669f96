"""A job that a cluster can never hold is refused before anything starts, with the settings that
fit: workers are placed whole on one node each, a GPU job finds no GPU, and an elastic job needs
only its minimum. (The wait on a cluster with an autoscaler: tests/cluster/test_autoscaling.py.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from conftest import cli

from pipeline.cluster.resources import holds, shortfall, worker_ask
from pipeline.config import load_job
from pipeline.system import bf16_units

TWO_CORES = [{"CPU": 2.0, "GPU": 0.0, "memory": 8 * 2**30}]


def _job(name: str, *overrides: str):
    return load_job(name, list(overrides))


def test_workers_are_placed_whole_on_one_node_each() -> None:
    nodes = [{"CPU": 3.0}, {"CPU": 3.0}]
    assert holds(nodes, {"CPU": 2.0}) == 2  # 6 CPUs in all, but a worker does not span nodes
    assert holds(nodes, {"CPU": 1.0}) == 6
    assert holds(nodes, {"CPU": 1.0, "GPU": 1.0}) == 0


def test_a_job_that_fits_has_no_shortfall() -> None:
    assert shortfall([_job("quickstart")], TWO_CORES) is None  # 2 workers of 1 CPU


def test_a_cpu_job_too_big_for_every_node_names_the_cpus_that_fit() -> None:
    problem = shortfall([_job("cifar10-resnet20", "scaling.use_gpu=false")], TWO_CORES, "this machine")
    assert problem is not None
    assert "asks for 1 worker with 4 CPUs" in problem and "this machine (2 CPUs)" in problem
    assert problem.endswith("add --set scaling.cpus_per_worker=2")


def test_a_gpu_job_where_there_is_no_gpu_says_to_turn_it_off() -> None:
    problem = shortfall([_job("cifar10-resnet20", "scaling.cpus_per_worker=64")], TWO_CORES)
    assert problem is not None and "1 worker with 64 CPUs and 1 GPU" in problem
    assert problem.endswith("add --set scaling.use_gpu=false --set scaling.cpus_per_worker=2")


def test_too_many_workers_keep_the_global_batch_at_the_count_that_fits() -> None:
    job = _job("quickstart", "scaling.num_workers=4", "scaling.cpus_per_worker=2")
    problem = shortfall([job], TWO_CORES)
    fit = load_job(
        "quickstart",
        ["scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.batch_size_per_worker=64"],
    )
    assert problem is not None and problem.endswith(
        "add --set scaling.num_workers=2 --set scaling.cpus_per_worker=1 "
        "--set scaling.batch_size_per_worker=64"
    )
    assert fit.global_batch_size == job.global_batch_size and shortfall([fit], TWO_CORES) is None


def test_an_elastic_job_needs_only_its_minimum_and_memory_counts_when_asked() -> None:
    elastic = _job(
        "quickstart", "scaling.num_workers=4", "scaling.min_workers=2", "scaling.batch_size_per_worker=24"
    )
    assert shortfall([elastic], TWO_CORES) is None
    hungry = _job("quickstart", "scaling.memory_per_worker_gb=6")
    assert worker_ask(hungry)["memory"] == 6 * 2**30
    problem = shortfall([hungry], TWO_CORES)
    assert problem is not None and "--set scaling.memory_per_worker_gb=4" in problem


def test_submit_refuses_a_job_this_machine_can_never_hold_at_once(tmp_path: Path) -> None:
    from cifar_release import write_cifar10

    from pipeline.data.prepare import prepare

    write_cifar10(tmp_path / "cifar10", train=20, test=10)
    prepare(tmp_path / "cifar10")
    started = time.monotonic()
    result = cli(
        "submit", "cifar10-resnet20", "--set", f"data.root='{tmp_path / 'cifar10'}'",
        "--set", "scaling.cpus_per_worker=64", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 60
    assert len(result.stderr.splitlines()) == 1 and "scaling.cpus_per_worker=" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was opened


@pytest.mark.skipif(bf16_units(torch.device("cpu")), reason="this CPU has bf16 units: bf16 runs here")
def test_submit_refuses_bf16_on_a_cpu_without_bf16_units(tmp_path: Path) -> None:
    # real on a CPU without AVX-512 BF16 or AMX (this project's AMD EPYC, AVX2; its Intel Xeon,
    # AVX-512 without BF16): before Ray or MLflow starts
    from cifar_release import write_cifar10

    from pipeline.data.prepare import prepare

    write_cifar10(tmp_path / "cifar10", train=20, test=10)
    prepare(tmp_path / "cifar10")
    result = cli(
        "submit", "cifar10-resnet20-fast", "--set", f"data.root='{tmp_path / 'cifar10'}'",
        "--set", "run.precision='bf16'", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert "run.precision = bf16: " in line and "has no bf16 units" in line and "run.precision=fp32" in line
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was opened


@pytest.mark.parametrize("study", ["depth"])
def test_study_refuses_a_run_this_machine_can_never_hold(study: str, tmp_path: Path) -> None:
    from cifar_release import write_cifar10

    from pipeline.data.prepare import prepare

    write_cifar10(tmp_path / "cifar10", train=20, test=10)
    prepare(tmp_path / "cifar10")
    result = cli(
        "study",
        study,
        "--root",
        str(tmp_path / "cifar10"),
        "--set",
        "scaling.cpus_per_worker=64",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "can never hold it" in result.stderr and "--set scaling.cpus_per_worker=" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()
