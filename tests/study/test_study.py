"""A study groups its runs under one MLflow parent run and draws the paper's figure and table
from their metrics; its quick scale says what it runs."""

from __future__ import annotations

import io
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from cifar_release import images
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.config import load_job
from pipeline.data.prepare import prepare
from pipeline.data.synth import CLASSES
from pipeline.study.figures import Curves, draw, findings, table
from pipeline.study.plans import plan
from pipeline.study.run import Prefixed, StudyError, room, run_study
from pipeline.tracking import tracking_uri


def test_the_quick_degradation_study_runs_what_it_says() -> None:
    quick = plan("degradation", "quick")
    assert [m.label for m in quick.members] == ["plain-20", "plain-56", "ResNet-20", "ResNet-56"]
    assert {"iterations=800", "data.train_images=4000", "data.val_images=1000"} <= set(quick.settings)
    assert (
        "4,000" in quick.meaning and "800 iterations" in quick.meaning and "depths 20 and 56" in quick.meaning
    )
    for member in quick.members:
        job = load_job(member.job, list(quick.settings))
        assert job.iterations == 800 and job.global_batch_size == 128 and not job.scaling.use_gpu
        assert job.optim.warmup_iters == 0  # the first 800 iterations of the schedule: 0.1 throughout
    paper = plan("degradation", "paper")
    assert len(paper.members) == 9 and paper.settings == ()
    with pytest.raises(ValueError, match="runs at --scale paper"):
        plan("degradation", "quick", "imagenet")
    shortcuts = plan("shortcuts", "quick")
    assert "options A, B and C" in shortcuts.meaning and "depths 20 of" not in shortcuts.meaning
    assert [m.job for m in plan("shortcuts", "paper").members] == [
        "imagenet-r34-a",
        "imagenet-r34-b",
        "imagenet-r34-c",
    ]


def test_a_study_runs_as_many_runs_at_once_as_the_cluster_holds() -> None:
    settings = list(plan("degradation", "quick").settings)
    quick = [load_job(m.job, settings) for m in plan("degradation", "quick").members]
    assert room(quick, {"CPU": 2.0}) == 2  # one core each: two at once on this machine
    assert room(quick, {"CPU": 8.0}) == 4 and room(quick, {"CPU": 0.5}) == 1
    paper = [load_job(m.job) for m in plan("degradation", "paper").members]  # one GPU each
    assert room(paper, {"CPU": 64.0}) == 1 and room(paper, {"CPU": 64.0, "GPU": 8.0}) == 8
    wide = replace(quick[0], scaling=replace(quick[0].scaling, cpus_per_worker=2))
    assert room([wide, *quick], {"CPU": 2.0}) == 1  # in order: the first takes both cores

    lines = io.StringIO()
    stream = Prefixed(lines, "ResNet-56: ", threading.Lock())
    print("epoch 0 step 10/31", file=stream)
    stream.write("epoch 0: val/top1")
    assert lines.getvalue() == "ResNet-56: epoch 0 step 10/31\n"  # a partial line waits for its end
    stream.write(" 0.3\nnext")
    assert lines.getvalue().splitlines()[1] == "ResNet-56: epoch 0: val/top1 0.3" and not stream.isatty()


def test_the_runs_of_a_study_run_that_is_not_there_are_a_clear_error(workdir: Path) -> None:
    with pytest.raises(StudyError, match="no study run 0123 in sqlite:///"):
        run_study(plan("responses", "quick"), "data/cifar10", workdir / "studies", runs_of="0123")
    assert not (workdir / "studies").exists()  # nothing drawn


def _curves(label: str, family: str, depth: int, train_end: float, test_end: float) -> Curves:
    member = next(m for m in plan("degradation", "paper").members if m.label == label)
    train = [(step, 0.9 - (0.9 - train_end) * step / 100) for step in range(10, 101, 10)]
    return Curves(member, "run", train, [(50, 0.8), (100, test_end)], 270_000)


def test_findings_and_table_say_what_the_figure_shows(tmp_path: Path) -> None:
    quick = plan("degradation", "quick")
    curves = [
        _curves("plain-20", "plain", 20, 0.50, 0.55),
        _curves("plain-56", "plain", 56, 0.70, 0.72),
        _curves("ResNet-20", "residual", 20, 0.40, 0.45),
        _curves("ResNet-56", "residual", 56, 0.45, 0.50),
    ]
    # the final training error: the mean of the last tenth of iterations (steps 100 only, here 91..100)
    assert curves[1].final_train == pytest.approx(0.70)
    said = findings(quick, curves)
    assert said[0].startswith(
        "plain-56's training error 70.0 % is above plain-20's 50.0 %: the degradation problem"
    )
    assert "at depth 20 the residual net's training error is 10.0 points below" in said[1]
    assert "at depth 56 the residual net's training error is 25.0 points below" in said[2]
    assert said[3] == "ResNet-56's training error 45.0 % is above ResNet-20's 40.0 %"
    rows = table(quick, curves).splitlines()
    assert rows[2] == "| plain-20 | 0.27M | 50.0 | 55.0 |"
    depth = replace(quick, study="depth")
    assert table(depth, curves[2:]).splitlines()[3] == "| ResNet-56 | 0.27M | 45.0 | 50.0 | 6.97 |"
    png = draw(quick, curves, tmp_path / "figure.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.ray
def test_a_study_groups_its_runs_under_one_parent_and_logs_its_figure(ray_session, workdir: Path) -> None:
    # CIFAR as image folders (train/, test/), trained through Ray Train and DALI like any job
    root = workdir / "cifar10"
    pixels, labels = images(96, seed=9)
    for i, (image, label) in enumerate(zip(pixels, labels)):
        folder = root / ("train" if i < 64 else "test") / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.jpg", quality=90)
    prepare(root, workers=1)
    quick = plan("degradation", "quick")
    two = replace(quick, members=tuple(m for m in quick.members if m.depth == 20))
    shrink = ("iterations=8", "scaling.batch_size_per_worker=16", "data.threads_per_worker=1",
              "scaling.cpus_per_worker=1", "run.log_every_steps=2", "data.train_images=48",
              "data.val_images=16")  # fmt: skip
    for _ in range(60):  # what earlier tests ran on the session's Ray (a Serve replica) has let go
        if ray_session.available_resources().get("CPU", 0) >= 2:
            break
        time.sleep(1)
    result = run_study(two, str(root), workdir / "studies", overrides=shrink, say=lambda line: None)

    assert result.failed == [] and len(result.findings) == 1  # depth 20: the residual net's lead
    assert (workdir / "studies" / "degradation-quick.png").is_file()
    client = MlflowClient(tracking_uri())
    parent = client.get_run(result.parent_run_id)
    assert client.get_experiment(parent.info.experiment_id).name == "study-degradation"
    assert parent.data.params["scale"] == "quick" and "4,000" in parent.data.params["meaning"]
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    assert sorted(c.data.params["model.arch"] for c in children) == ["cifar_plain20", "cifar_resnet20"]
    assert all(c.info.status == "FINISHED" for c in children)
    first, second = sorted(children, key=lambda c: c.info.start_time)
    assert second.info.start_time < first.info.end_time  # one core each, on 2: both at once
    assert {a.path for a in client.list_artifacts(result.parent_run_id, "study")} == {
        "study/degradation-quick.png", "study/degradation-quick.md",
    }  # fmt: skip
    assert {"plain-20/train_error", "ResNet-20/train_error", "ResNet-20/test_error"} <= set(
        parent.data.metrics
    )
    assert client.search_registered_models() == []  # a study's runs leave the registry alone

    # the responses study measures those two nets from their runs' checkpoints, training nothing
    with pytest.raises(StudyError, match="has no finished run of plain-56, ResNet-56"):
        run_study(plan("responses", "quick"), str(root), workdir / "studies", runs_of=result.parent_run_id)
    responses = replace(plan("responses", "quick"), members=two.members)
    measured = run_study(
        responses, str(root), workdir / "studies", runs_of=result.parent_run_id, say=lambda line: None
    )
    assert measured.failed == [] and measured.findings[0].startswith(
        "at depth 20 the residual net's responses"
    )
    assert "| ResNet-20 | 19 |" in measured.table and "| plain-20 | 19 |" in measured.table
    responses_parent = client.get_run(measured.parent_run_id)
    assert responses_parent.data.params["runs_of"] == result.parent_run_id
    assert {"plain-20/mean_response_std", "ResNet-20/mean_response_std"} <= set(responses_parent.data.metrics)
    assert (workdir / "studies" / "responses-quick.png").is_file()
    assert len(client.search_runs([responses_parent.info.experiment_id])) == 1  # its parent only
