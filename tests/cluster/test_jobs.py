"""`resnet-pipe submit --address ...`: what is refused before anything reaches the cluster. The
submission itself, through the Job Submission API to a cluster whose nodes share nothing, is
tests/cluster/test_share_nothing.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import cli

from pipeline.system import free_port

NOWHERE = f"http://127.0.0.1:{free_port()}"  # no cluster: each refusal comes before one is asked


def test_a_relative_storage_path_is_refused_before_submitting(monkeypatch: pytest.MonkeyPatch) -> None:
    result = cli("submit", "quickstart", "--address", NOWHERE, "--set", "run.storage_path='runs'")
    assert result.returncode == 2
    assert "run.storage_path 'runs' is relative" in result.stderr
    assert "submitted" not in result.stdout


# named, not by their free ports: the test processes of `pytest -n 2` must collect the same tests
@pytest.mark.parametrize(
    "tracking",
    ["", "sqlite:///mlflow.db", f"http://127.0.0.1:{free_port()}"],
    ids=["unset", "sqlite", "down"],
)
@pytest.mark.parametrize("address", [NOWHERE, f"ray://127.0.0.1:{free_port()}"], ids=["job-server", "client"])
def test_a_cluster_run_without_a_tracking_server_it_reaches_is_refused(
    tracking: str, address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if tracking:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = cli("submit", "quickstart", "--address", address, "--set", f"run.storage_path='{tmp_path}'")
    assert result.returncode == 2, result.stderr
    assert "MLFLOW_TRACKING_URI" in result.stderr and "mlflow server" in result.stderr
    if tracking.startswith("http"):
        assert "does not answer" in result.stderr
    assert "submitted" not in result.stdout and "MLflow run" not in result.stdout


def test_resuming_a_run_with_no_checkpoints_in_the_bucket_is_refused_before_submitting(s3: str) -> None:
    result = cli("submit", "quickstart", "--address", NOWHERE, "--resume", "nope",
                 "--set", f"run.storage_path='{s3}/runs'")  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"run 'nope' has no checkpoints in {s3}/runs" in result.stderr
    assert "submitted" not in result.stdout


def test_a_bucket_that_cannot_be_written_is_refused_before_submitting(s3: str) -> None:
    result = cli(
        "submit", "quickstart", "--address", NOWHERE, "--set", "run.storage_path='s3://no-such-bucket/runs'"
    )
    assert result.returncode == 2, result.stderr
    assert "cannot write to s3://no-such-bucket/runs" in result.stderr and "AWS_ENDPOINT_URL" in result.stderr


@pytest.mark.parametrize(
    "words", [["list"], ["status", "x"], ["logs", "x"], ["logs", "x", "--follow"], ["stop", "x"]]
)
def test_a_job_server_that_does_not_answer_is_said_in_one_line(words: list[str]) -> None:
    result = cli(*words, "--address", NOWHERE)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"error: the job server at {NOWHERE} does not answer: start the cluster (ray start --head, or "
        "`kubectl get raycluster`), or give its address with --address / RAY_ADDRESS"
    )
