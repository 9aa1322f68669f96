from __future__ import annotations

import math

import pytest
import timm
from torch import nn

from pipeline.config import load_job
from pipeline.train.optim import lr_at, param_groups

STEPS = 100  # steps per epoch in these examples


def test_warmup_is_linear_from_zero_to_the_scaled_peak() -> None:
    job = load_job("imagenet-r50")  # 8 x 128 = 1024 images: peak 0.1 x 1024 / 256 = 0.4
    assert job.peak_lr == pytest.approx(0.4)
    warmup_steps = 5 * STEPS
    assert lr_at(0, job, STEPS) == pytest.approx(0.4 / warmup_steps)
    assert lr_at(warmup_steps // 2 - 1, job, STEPS) == pytest.approx(0.2)
    assert lr_at(warmup_steps - 1, job, STEPS) == pytest.approx(0.4)


def test_cosine_decays_to_zero_after_warmup() -> None:
    job = load_job("imagenet-r50")
    midpoint = (5 + (90 - 5) / 2) * STEPS
    assert lr_at(5 * STEPS, job, STEPS) == pytest.approx(0.4)
    assert lr_at(int(midpoint), job, STEPS) == pytest.approx(0.2)
    quarter = (5 + (90 - 5) / 4) * STEPS
    assert lr_at(int(quarter), job, STEPS) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)))
    assert lr_at(90 * STEPS - 1, job, STEPS) == pytest.approx(0.0, abs=1e-6)


def test_linear_decays_to_zero_after_warmup_as_the_fast_cifar_recipe_does() -> None:
    job = load_job("cifar10-resnet20-fast")  # 0.2 at the global batch of 128, 2 epochs of warm-up
    end = job.epochs * STEPS
    assert job.optim.schedule == "linear" and job.peak_lr == pytest.approx(0.2)
    assert lr_at(2 * STEPS - 1, job, STEPS) == pytest.approx(0.2)  # the warm-up's last step: the peak
    assert lr_at(2 * STEPS + (end - 2 * STEPS) // 2, job, STEPS) == pytest.approx(0.1)
    assert lr_at(end - 1, job, STEPS) == pytest.approx(0.2 / (end - 2 * STEPS), rel=1e-6)


def test_step_schedule_divides_by_ten_at_each_boundary() -> None:
    job = load_job("imagenet-r50", ["optim.schedule='step'", "optim.warmup_epochs=0"])
    assert [lr_at(e * STEPS, job, STEPS) for e in (0, 29, 30, 60, 85)] == pytest.approx(
        [0.4, 0.4, 0.04, 0.004, 0.0004]
    )


def test_the_papers_cifar_schedule_in_iterations() -> None:
    # ResNet-110: 0.01 for the first 400 iterations, then 0.1, divided by 10 at 32k and 48k
    job = load_job("cifar10-resnet110")
    at = [lr_at(step, job, steps_per_epoch=390) for step in (0, 399, 400, 31999, 32000, 47999, 48000, 63999)]
    assert at == pytest.approx([0.01, 0.01, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    # with iterations, cosine runs to the last iteration, whatever an epoch holds
    cosine = load_job("cifar10-resnet20", ["optim.schedule='cosine'"])
    assert lr_at(32000, cosine, 390) == pytest.approx(0.05) and lr_at(63999, cosine, 7) < 1e-6


def test_no_weight_decay_on_batchnorm_and_biases() -> None:
    model = timm.create_model("resnet50", num_classes=10)
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    batchnorm_or_bias = {
        f"{module_name}.{name}"
        for module_name, module in model.named_modules()
        for name, _ in module.named_parameters(recurse=False)
        if isinstance(module, nn.BatchNorm2d) or name == "bias"
    }
    assert {names[id(p)] for p in no_decay["params"]} == batchnorm_or_bias
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])
