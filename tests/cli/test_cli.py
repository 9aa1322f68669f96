"""The `resnet-pipe` command as a user runs it: a real subprocess, its exit code and its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROBE, cli, register_untrained, small_job

from pipeline.system import bf16_units, free_port


def test_jobs_lists_model_dataset_epochs_workers() -> None:
    result = cli("jobs")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["JOB", "MODEL", "DATASET", "LENGTH", "WORKERS"]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert {"quickstart", "imagenet-r50", "imagenet-r101", "imagenet-r152", "cifar10-resnet110"} <= set(rows)
    assert "resnet152" in rows["imagenet-r152"] and " 90 ep " in rows["imagenet-r152"]
    assert "cifar_resnet110" in rows["cifar10-resnet110"] and " 64k it " in rows["cifar10-resnet110"]
    assert rows["quickstart"].split()[-3:] == ["2", "x", "CPU"]  # a fixed size: one number
    assert rows["imagenet-r152"].split()[-3:] == ["8", "x", "GPU"]


def test_jobs_show_prints_the_resolved_job_with_overrides() -> None:
    result = cli("jobs", "show", "imagenet-r152", "--set", "optim.lr_per_256=0.2")
    assert result.returncode == 0, result.stderr
    assert "model.arch = 'resnet152'" in result.stdout
    assert "optim.lr_per_256 = 0.2" in result.stdout
    assert "global_batch_size = 512, peak_lr = 0.4" in result.stdout  # 0.2 x (8 x 64) / 256


@pytest.mark.parametrize(
    "args, message",
    [
        (["submit", "no-such-job"], "unknown job 'no-such-job'"),
        (["submit", "quickstart", "--set", "data.root=/no/such/folder"], "/no/such/folder does not exist"),
        (["submit", "quickstart", "--set", "optim.learning_rate=1"], "unknown key 'optim.learning_rate'"),
        (["jobs", "show", "no-such-job"], "unknown job 'no-such-job'"),
        (["data", "prepare", "/no/such/folder"], "/no/such/folder does not exist"),
        (["submit", "quickstart", "--resume", "never-ran"], "run 'never-ran' has no checkpoints"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_ray(args: list[str], message: str, tmp_path: Path) -> None:
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr
    assert result.stdout.strip() == "NO-RAY"


def test_submit_on_an_unprepared_folder_says_to_prepare_it(tmp_path: Path) -> None:
    (tmp_path / "raw" / "train").mkdir(parents=True)
    result = cli("submit", "quickstart", "--set", f"data.root='{tmp_path / 'raw'}'", cwd=tmp_path)
    assert result.returncode == 2
    assert "resnet-pipe data prepare" in result.stderr


def test_data_synth_then_prepare(tmp_path: Path) -> None:
    made = cli("data", "synth", str(tmp_path / "ds"), "--train-per-class", "3", "--val-per-class", "2")
    assert made.returncode == 0, made.stderr
    assert "wrote 20 images of 4 classes" in made.stdout
    (tmp_path / "ds" / "train" / "dots" / "broken.JPEG").write_bytes(b"\xff\xd8 not really")
    prepared = cli("data", "prepare", str(tmp_path / "ds"))
    assert prepared.returncode == 0, prepared.stderr
    assert "train: 12 images" in prepared.stdout and "val: 8 images" in prepared.stdout
    assert "left out: 1 files" in prepared.stdout and "broken.JPEG" in prepared.stdout


def test_data_preview_writes_a_png(prepared_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    result = cli("data", "preview", "quickstart", "--out", str(out), "--count", "4",
                 "--set", f"data.root='{prepared_dataset}'", "--set", "data.crop_px=32")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote 4 augmented samples" in result.stdout


def test_bench_data_prints_every_row_against_torchvision(prepared_dataset: Path) -> None:
    result = cli(
        "bench", "data", "--root", str(prepared_dataset), "--seconds", "1", "--batch", "8", "--crop", "32"
    )
    assert result.returncode == 0, result.stderr
    rows = [
        line for line in result.stdout.splitlines() if "images/s" not in line and line.strip() != "NO-RAY"
    ]
    assert [r.split("  ")[0].strip() for r in rows] == [
        "torchvision DataLoader (PIL)", "DALI training pipeline (CPU)", "DALI ceiling: decode + resize (CPU)",
    ]  # fmt: skip
    speeds = [float(r.split()[-2]) for r in rows]
    ratios = [float(r.split()[-1]) for r in rows]
    # each row against the first: the ratio column is each row's images/s over torchvision's
    assert ratios == pytest.approx([s / speeds[0] for s in speeds], abs=2e-3)
    assert ratios[0] == 1.0 and all(s > 0 for s in speeds)


def test_bench_data_on_cifar_runs_torchvisions_cifar10_beside_the_memory_pipeline(tmp_path: Path) -> None:
    from cifar_release import write_cifar10

    from pipeline.data.prepare import prepare

    write_cifar10(tmp_path, train=64, test=16)
    prepare(tmp_path)
    result = cli(
        "bench", "data", "--root", str(tmp_path), "--seconds", "1", "--batch", "16", "--workers", "1"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith("torchvision CIFAR10 DataLoader (PIL)") and lines[1].split()[-1] == "1.000"
    assert lines[2].startswith("DALI memory pipeline (CPU)") and float(lines[2].split()[-1]) > 0
    assert 0 <= float(lines[3].split("data wait ")[1].split(" %")[0]) < 100


def test_follow_without_a_job_server_is_an_error_not_ignored(tmp_path: Path) -> None:
    result = cli("submit", "quickstart", "--follow", cwd=tmp_path)
    assert result.returncode == 2 and "--follow streams a job server's logs" in result.stderr
    assert result.stdout.strip() == "NO-RAY"


def test_allow_changes_needs_resume(tmp_path: Path) -> None:
    result = cli("submit", "quickstart", "--allow-changes", cwd=tmp_path)
    assert result.returncode == 2 and "--allow-changes goes with --resume" in result.stderr


def test_ui_with_a_tracking_server_names_it_and_starts_nothing(tmp_path: Path) -> None:
    server = "http://127.0.0.1:5999"  # nothing listens there: the command must not try
    env = {**os.environ, "MLFLOW_TRACKING_URI": server}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "ui"], capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"MLflow UI: {server}" in result.stdout and "nothing to start" in result.stdout
    assert not (tmp_path / "mlartifacts").exists()


@pytest.mark.ray
def test_a_run_shows_our_progress_and_results_and_nothing_of_rays_or_mlflows(
    prepared_dataset: Path, tmp_path: Path
) -> None:
    # `make run` as a user reads it, its output a file (not a terminal): rank 0's lines, the
    # results, what was registered; no colour codes, no bookkeeping of Ray or MLflow
    settings = [
        f"data.root='{prepared_dataset}'", "epochs=1", "data.crop_px=32", "scaling.batch_size_per_worker=8",
        "data.val_resize_px=36", "data.val_crop_px=32", "run.log_every_steps=1",
    ]  # fmt: skip
    # the variables that once injected faults into production code: a stray one must change nothing
    stray = os.environ | {"RESNET_PIPE_FAIL_AT_STEP": "1", "RESNET_PIPE_KILL_AT_STEP": "2"}
    sets = [w for s in settings for w in ("--set", s)]
    result = cli("submit", "quickstart", *sets, cwd=tmp_path, timeout_s=300, env=stray)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shown = result.stdout + result.stderr
    assert "epoch 0 step 3/3" in shown and "epoch 0: train/loss" in shown
    assert "val/top1: " in shown and "registered model resnet50 version 1 (val/top1" in shown
    for noise in ("\x1b[", "(RayTrainWorker", "(TrainController", "Downloading artifacts", "integer column",
                  "Successfully registered", "Created version", "INFO ", "Token authentication"):  # fmt: skip
        assert noise not in shown, (noise, shown[-3000:])


@pytest.mark.parametrize("how", ["flag", "RAY_ADDRESS"])
def test_deploy_to_a_job_server_address_is_a_clear_error(how: str, tmp_path: Path) -> None:
    server = "http://127.0.0.1:8265"
    args = ["deploy", "resnet50/1"] + (["--address", server] if how == "flag" else [])
    env = {**os.environ} | ({"RAY_ADDRESS": server} if how == "RAY_ADDRESS" else {})
    command = [sys.executable, "-c", PROBE, *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"{server} is a job server" in result.stderr and "ray://HEAD:10001" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout.strip() == "NO-RAY"


def test_deploy_to_a_cluster_that_does_not_answer_is_one_line(workdir: Path, prepared_dataset: Path) -> None:
    register_untrained(small_job(prepared_dataset, 1, "model.arch='resnet18'"), "unanswered")
    address = f"ray://127.0.0.1:{free_port()}"  # nothing listens there: Ray's client waits ~30 s
    result = cli("deploy", "resnet18/1", "--address", address, "--no-compile", cwd=workdir)
    assert result.returncode == 2, result.stderr
    assert f"the cluster at {address} does not answer" in result.stderr, result.stderr
    assert "RAY_ADDRESS" in result.stderr and "Traceback" not in result.stderr


def test_submit_refuses_a_run_whose_checkpoints_have_other_settings(
    prepared_dataset: Path, tmp_path: Path
) -> None:
    from pipeline.config import load_job, to_dict

    root = f"data.root='{prepared_dataset}'"
    saved = tmp_path / "runs" / "mine" / "checkpoint_000000"
    saved.mkdir(parents=True)
    meta = {"format": 3, "epoch": 1, "step": 9, "epoch_step": 0, "metrics": {}}
    (saved / "meta.json").write_text(json.dumps(meta | {"job": to_dict(load_job("quickstart", [root]))}))
    result = cli("submit", "quickstart", "--name", "mine", "--set", root, "--set", "optim.lr_per_256=0.2",
                 cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "optim.lr_per_256 0.1 -> 0.2" in result.stderr and "--resume mine --allow-changes" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before anything started


@pytest.mark.ray
def test_bench_train_prints_its_table_and_nothing_of_its_private_runs(
    prepared_dataset: Path, tmp_path: Path
) -> None:
    tiny = ["--steps", "3", "--batch", "2", "--crop", "32"]
    result = cli("bench", "train", "--root", str(prepared_dataset), *tiny, cwd=tmp_path, timeout_s=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line != "RAY-IMPORTED"]
    assert lines[0].split() == ["training", "images/s", "x", "bare", "loop"]
    assert [line.split("  ")[0] for line in lines[1:5]] == [
        "bare PyTorch loop, in-memory tensors", "the same loop as a Ray Train function",
        "resnet-pipe, 1 worker x 2 threads", "resnet-pipe, 2 workers x 1 threads",
    ]  # fmt: skip
    assert lines[5].startswith("2 DDP workers against 1 worker") and len(lines) == 6
    shown = result.stdout + result.stderr
    for noise in ("registered", "Created version", "MLflow run", "(RayTrainWorker", "(TrainController"):
        assert noise not in shown, (noise, shown[-3000:])
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()  # the user's stay clean


def test_bench_train_on_cifar_measures_the_resnet20_step_in_each_precision_against_its_bare_loop(
    tmp_path: Path,
) -> None:
    from cifar_release import write_cifar10

    from pipeline.data.prepare import prepare

    write_cifar10(tmp_path / "cifar10", train=40, test=10)
    prepare(tmp_path / "cifar10")
    tiny = ["--steps", "4", "--batch", "8"]
    result = cli("bench", "train", "--root", str(tmp_path / "cifar10"), *tiny, cwd=tmp_path, timeout_s=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line != "RAY-IMPORTED"]
    expected = ["fp32, channels_last", "bf16 autocast, channels_last", "fp32, torch.compile"]
    if not bf16_units(torch.device("cpu")):  # no AVX-512 BF16 or AMX: bf16's slow path is left out, said so
        assert lines.pop(0).startswith("the bf16 autocast row left out: this machine has no bf16 units")
        expected.remove("bf16 autocast, channels_last")
    assert lines[0].startswith("ResNet-20 step, batch 8, 2 threads")
    rows = {line.split("  ")[0]: line.split()[-4:] for line in lines[1 : 1 + len(expected)]}
    assert lines[-1].startswith("the fp32 bare loop as a Ray Train function: ")
    assert list(rows) == expected and len(lines) == 2 + len(expected)
    fp32 = float(rows["fp32, channels_last"][1])
    for bare, pipeline, ratio, against_fp32 in rows.values():
        assert float(bare) > 0 and float(pipeline) > 0
        assert float(ratio) == pytest.approx(float(pipeline) / float(bare), rel=0.03)  # of rounded figures
        assert float(against_fp32) == pytest.approx(float(pipeline) / fp32, rel=0.03)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()  # the user's stay clean


def test_ctrl_c_during_submit_ends_the_mlflow_run_as_killed(prepared_dataset: Path, tmp_path: Path) -> None:
    import signal

    from mlflow.tracking import MlflowClient

    settings = [
        f"data.root='{prepared_dataset}'", "epochs=50", "data.crop_px=32", "scaling.batch_size_per_worker=8",
        "data.val_resize_px=36", "data.val_crop_px=32", "run.log_every_steps=1",
    ]  # fmt: skip
    command = [
        sys.executable,
        "-c",
        PROBE,
        "submit",
        "quickstart",
        *[w for s in settings for w in ("--set", s)],
    ]
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # as a terminal's foreground command has it: a suite started in the background of a
        # non-interactive shell (`make test &`) ignores SIGINT, and passes the ignoring on
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = []
    try:
        for line in process.stdout:  # training has begun: rank 0's first progress line
            seen.append(line)
            if "epoch 0 step 1/" in line:
                break
        else:
            pytest.fail("no progress line before the command ended:\n" + "".join(seen[-40:]))
        process.send_signal(signal.SIGINT)  # Ctrl-C: the terminal sends it to the foreground command
        try:
            rest, _ = process.communicate(timeout=120)
        except subprocess.TimeoutExpired as e:
            shown = e.output.decode(errors="replace") if isinstance(e.output, bytes) else e.output or ""
            pytest.fail("still running 120 s after Ctrl-C:\n" + "".join(seen[-10:]) + shown[-4000:])
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, "".join(seen) + rest
    assert "is KILLED in MLflow" in rest and "Traceback" not in rest
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "KILLED"
