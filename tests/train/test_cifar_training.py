"""A paper recipe (jobs/cifar10-resnet20) trains through Ray Train and DALI like every other
job: from CIFAR-10's canonical python archive, on 2 CPU workers, with its schedule in
iterations, ending where the iterations end; it registers its model, with an input example from
the archive's arrays and the mean image it was trained against, and every way of serving it
(Serve's preprocessing, MLflow's pyfunc) answers as its offline evaluation did. (From CIFAR image
folders: tests/study/.)"""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from cifar_release import write_cifar10
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.cluster.launch import submit
from pipeline.config import load_job
from pipeline.data.index import DatasetError, load_index
from pipeline.data.loader import build_loader
from pipeline.data.prepare import prepare
from pipeline.serve.inference import Loaded, Preprocess
from pipeline.tracking import tracking_uri
from pipeline.tracking.runs import run_table
from pipeline.train import checkpoint

pytestmark = pytest.mark.ray
TEST = 37  # test images: neither the batch (8) nor the workers (2) divide it


def test_a_cifar_recipe_trains_its_iterations_from_the_canonical_archive(ray_session, workdir: Path) -> None:
    root = workdir / "cifar10"
    write_cifar10(root, train=64, test=TEST)
    prepare(root)
    # 64 images in global batches of 16: 4 steps an epoch; 10 iterations end 2 steps into epoch 2;
    # evaluated where the steps pass 8 (the end of epoch 1) and at the end (epoch 2)
    job = load_job(
        "cifar10-resnet20",
        [f"data.root='{root}'", "scaling.use_gpu=false", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
         "scaling.batch_size_per_worker=8", "data.threads_per_worker=1", "iterations=10",
         "optim.step_iters=[6]", "run.log_every_steps=1", "run.eval_every_iters=8", "target_top1=0.01"],
    )  # fmt: skip
    outcome = submit(job, "cifar-archive")
    assert outcome.finished, outcome.error
    assert outcome.registered and outcome.registered.startswith("cifar_resnet20 version 1")
    meta = checkpoint.read_meta(checkpoint.latest(outcome.run_dir))
    assert (meta["epoch"], meta["step"]) == (3, 10)
    client = MlflowClient(tracking_uri())
    run = client.get_run(outcome.mlflow_run_id)
    assert run.data.params["model.arch"] == "cifar_resnet20" and run.data.params["data.source"] == "memory"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")] == [1, 2]
    # every test image scored once over the 2 ranks (37 = 18 + 19: neither the batch nor the ranks divide it)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val/images")] == [TEST, TEST]
    clock = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "elapsed_s")}
    assert sorted(clock) == [0, 1, 2] and 0 < clock[0] < clock[1] < clock[2]
    (reached,) = {m.value for m in client.get_metric_history(run.info.run_id, "time_to_target_s")}
    assert reached == clock[1]  # the first evaluation at or above the target, on the run's clock
    # `resnet-pipe runs`: 3 epochs trained (2 of them evaluated), on the run's clock
    (listed,) = [r for r in run_table("cifar10-resnet20") if r.run_id == run.info.run_id]
    assert (listed.epochs, listed.duration_s, listed.time_to_target_s) == (3, clock[2], reached)
    assert "plots/accuracy_vs_time.png" in [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/lr")}
    assert lrs[1] == pytest.approx(job.peak_lr) and lrs[10] == pytest.approx(job.peak_lr / 10)  # at step 6
    errors = client.get_metric_history(run.info.run_id, "train/step_error")
    assert len(errors) == 10 and all(0 <= m.value <= 1 for m in errors)
    _serves_as_it_evaluated(job, root)


def _serves_as_it_evaluated(job, root: Path) -> None:
    """The registered version, through Serve's preprocessing of PNG files and through MLflow's
    pyfunc, gives the offline evaluation's inputs and classes on the test images."""
    index = load_index(root)
    version = MlflowClient(tracking_uri()).get_model_version("cifar_resnet20", "1")
    assert json.loads(version.tags["preprocessing"])["normalize"] == "pixel_mean"
    loaded = Loaded.from_registry("cifar_resnet20", "1", torch.device("cpu"))
    pixels = np.load(root / "index" / "pixels-train.npy")
    np.testing.assert_allclose(loaded.mean_image, pixels.mean(axis=0), rtol=1e-6)

    offline = build_loader(job.at_world(1), index, "val")
    images, labels, ids = (torch.cat(parts) for parts in zip(*list(offline)))
    test_pixels = np.load(root / "index" / "pixels-val.npy")
    pngs = []
    for row in ids.tolist():
        encoded = io.BytesIO()
        Image.fromarray(test_pixels[row]).save(encoded, format="PNG")
        pngs.append(encoded.getvalue())
    served = torch.cat([Preprocess(loaded.job, 8, torch.device("cpu"), 1, loaded.mean_image)(pngs[i : i + 8])
                        for i in range(0, len(pngs), 8)])  # fmt: skip
    torch.testing.assert_close(served, images, rtol=0, atol=1e-6)  # the same inputs, to rounding
    classes = loaded.probabilities(images).argmax(dim=1)
    torch.testing.assert_close(loaded.probabilities(served).argmax(dim=1), classes)

    pyfunc = mlflow.pyfunc.load_model("models:/cifar_resnet20/1")
    answers = pyfunc.predict(pd.DataFrame({"image": pngs}))
    assert answers["class_index"].tolist() == classes.tolist()


def test_the_python_release_read_as_files_names_the_setting(ray_session, workdir: Path) -> None:
    root = workdir / "cifar10"
    write_cifar10(root, train=16, test=8)
    prepare(root)
    job = load_job(
        "cifar10-resnet20",
        [f"data.root='{root}'", "data.source='files'", "data.normalize='channel'", "scaling.use_gpu=false"],
    )
    with pytest.raises(DatasetError, match="python release.*set data.source='memory'"):
        submit(job, "as-files")
