"""`resnet-pipe submit --address http://...` against a real Ray head started on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import cli

from pipeline.system import free_port

pytestmark = pytest.mark.ray
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory):
    """A Ray head on 127.0.0.1 only, its job server on a free port; stopped with the module."""
    from pipeline.cluster.jobs import client

    port, dashboard = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # stopped at once: its 30 s drain is for pods
    }
    process = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 90
    while True:
        try:
            client(address).list_jobs()
            break
        except Exception:
            if time.monotonic() > deadline or process.poll() is not None:
                os.killpg(process.pid, signal.SIGTERM)
                raise
            time.sleep(2)
    yield address
    os.killpg(process.pid, signal.SIGTERM)  # `ray start --block` stops what it started
    process.wait(timeout=60)


def test_submit_to_a_job_server_runs_to_the_end_and_status_reports_it(
    head: str, prepared_dataset: Path, tmp_path: Path
) -> None:
    storage = tmp_path / "shared"
    storage.mkdir()
    settings = [
        f"data.root='{prepared_dataset}'", "epochs=1", "scaling.num_workers=1", "data.crop_px=32",
        "scaling.batch_size_per_worker=8", "data.val_resize_px=36", "data.val_crop_px=32",
        f"run.storage_path='{storage}'",
    ]  # fmt: skip
    sets = [word for setting in settings for word in ("--set", setting)]
    result = cli(
        "submit", "quickstart", "--address", head, "--follow", "--name", "remote", *sets, timeout_s=400
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    submission_id = result.stdout.split("submitted quickstart as ")[1].split()[0]
    assert f"{submission_id}: SUCCEEDED" in result.stdout
    assert "val/top1:" in result.stdout  # the job's own output came back through --follow
    assert any((storage / "remote").glob("checkpoint_*/meta.json"))  # checkpoints in the shared storage
    status = cli("status", submission_id, "--address", head)
    assert status.returncode == 0 and f"{submission_id}: SUCCEEDED" in status.stdout
    listed = cli("list", "--address", head)
    assert submission_id in listed.stdout and "quickstart  remote" in listed.stdout


def test_a_relative_storage_path_is_refused_before_submitting(head: str) -> None:
    result = cli("submit", "quickstart", "--address", head, "--set", "run.storage_path='runs'")
    assert result.returncode == 2
    assert "run.storage_path 'runs' is relative" in result.stderr
    assert "submitted" not in result.stdout
