from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import load_job
from pipeline.train.optim import build_optimizer
from pipeline.train.step import Stepper, autocast_dtype, classification_loss, configure_backends, evaluate


class FixedLogits(nn.Module):
    """Returns the logits it was given for each sample id (the 'images' are the ids)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logits[ids.long().reshape(-1)]


def test_evaluate_counts_top1_top5_and_loss_by_hand() -> None:
    job = load_job("quickstart", ["run.channels_last=false"])  # the "images" here are sample indices
    # 6 classes; sample 0: right at rank 1, sample 1: right at rank 3, sample 2: right at rank 6
    logits = torch.tensor([
        [9.0, 1, 2, 3, 4, 5],
        [1.0, 9, 8, 7, 2, 3],
        [9.0, 8, 7, 6, 5, 4],
    ])  # fmt: skip
    labels = torch.tensor([0, 3, 5])
    batches = [(torch.tensor([0, 1]), labels[:2], None), (torch.tensor([2]), labels[2:], None)]
    scores = evaluate(FixedLogits(logits), batches, torch.device("cpu"), job, num_classes=6)
    metrics = scores.metrics
    assert metrics["val/top1"] == pytest.approx(1 / 3)
    assert metrics["val/top5"] == pytest.approx(2 / 3)
    assert metrics["val/loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item())
    # per class: samples and top-1 errors (class 0 right; classes 3 and 5 wrong; the rest unseen)
    assert scores.per_class.tolist() == [[1, 0], [0, 0], [0, 0], [1, 1], [0, 0], [1, 1]]


def test_precision_follows_the_device() -> None:
    job = load_job("quickstart")
    assert autocast_dtype(job, torch.device("cpu")) is None
    assert autocast_dtype(job, torch.device("cuda")) == torch.bfloat16
    fp16 = load_job("quickstart", ["run.precision='fp16'"])
    assert autocast_dtype(fp16, torch.device("cuda")) == torch.float16


def test_bf16_is_refused_on_a_cpu_without_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without AVX-512 BF16 or AMX ran ResNet-20's step 3x (AVX-512) to 12x (AVX2) slower
    in bf16 than in fp32:
    asked for, it is refused with the setting to use; where the units are, it is bf16."""
    import pipeline.train.step as step

    bf16 = load_job("quickstart", ["run.precision='bf16'"])
    monkeypatch.setattr(step, "bf16_units", lambda device: False)
    with pytest.raises(step.PrecisionError, match=r"run.precision = bf16: .*'s CPU has no bf16 units .*"
                       r"set run.precision=fp32"):  # fmt: skip
        autocast_dtype(bf16, torch.device("cpu"))
    assert autocast_dtype(load_job("quickstart"), torch.device("cpu")) is None  # auto: fp32, no question
    monkeypatch.setattr(step, "bf16_units", lambda device: True)
    assert autocast_dtype(bf16, torch.device("cpu")) == torch.bfloat16


def _learns(device: torch.device, precision: str) -> tuple[float, float]:
    import timm

    job = load_job("quickstart", [f"run.precision='{precision}'"])
    torch.manual_seed(0)
    model = timm.create_model("resnet50", num_classes=4).to(device)
    if job.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step = Stepper(model, build_optimizer(model, job), job, device, num_classes=4)
    images, labels = torch.randn(8, 3, 32, 32, device=device), torch.arange(8, device=device) % 4
    losses = [step([(images, labels)], lr=0.05).item() for _ in range(8)]
    # the training error it counted: 8 steps of 8 images, then nothing until the next steps
    missed, seen = step.take_misses().tolist()
    assert seen == 64 and 0 <= missed <= 64 and step.take_misses().tolist() == [0, 0]
    return losses[0], losses[-1]


def test_the_step_learns_a_fixed_batch_on_the_cpu() -> None:
    first, last = _learns(torch.device("cpu"), "auto")
    assert last < first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_the_step_learns_a_fixed_batch_on_the_gpu(precision: str) -> None:
    first, last = _learns(torch.device("cuda"), precision)
    assert last < first


def _tiny(job_overrides: list[str]):
    job = load_job("quickstart", ["optim.weight_decay=0", "optim.momentum=0", *job_overrides])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 4))  # no BatchNorm: batch splits are exact
    return job, model, Stepper(model, build_optimizer(model, job), job, torch.device("cpu"), num_classes=4)


def test_accumulating_two_half_batches_equals_one_whole_batch() -> None:
    images, labels = torch.randn(8, 3, 4, 4), torch.arange(8) % 4
    _, whole, step_whole = _tiny([])
    step_whole([(images, labels)], lr=0.5)
    _, halves, step_halves = _tiny(["optim.accumulation_steps=2"])
    step_halves([(images[:4], labels[:4]), (images[4:], labels[4:])], lr=0.5)
    for a, b in zip(whole.parameters(), halves.parameters()):
        torch.testing.assert_close(a, b)


def test_gradient_clipping_bounds_the_update() -> None:
    images, labels = torch.randn(8, 3, 4, 4) * 100, torch.arange(8) % 4
    _, model, step = _tiny(["optim.clip_grad_norm=0.01"])
    before = [p.detach().clone() for p in model.parameters()]
    step([(images, labels)], lr=1.0)
    moved = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert 0 < moved <= 0.01 + 1e-6  # plain SGD: the update is lr x the clipped gradient


def test_binary_cross_entropy_loss_by_hand() -> None:
    job = load_job("quickstart", ["optim.loss='bce'", "optim.label_smoothing=0.1"])
    logits, targets = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]])
    smoothed = torch.tensor([[0.95, 0.05]])  # 1 x 0.9 + 0.1 / 2, 0 x 0.9 + 0.1 / 2
    expected = -(
        smoothed * torch.log(torch.sigmoid(logits)) + (1 - smoothed) * torch.log(1 - torch.sigmoid(logits))
    )
    assert classification_loss(logits, targets, job).item() == pytest.approx(expected.sum().item(), rel=1e-5)


def test_lamb_trains_too() -> None:
    # LAMB with the BCE loss ("ResNet strikes back"): steps on a fixed batch lower the loss
    _, _, step = _tiny(["optim.name='lamb'", "optim.loss='bce'", "optim.label_smoothing=0"])
    assert type(step.optimizer).__name__ == "Lamb"
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 4, 4), torch.arange(8) % 4
    losses = [float(step([(images, labels)], lr=0.05)) for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_cudnn_autotuning_is_for_the_gpu_only() -> None:
    torch.backends.cudnn.benchmark = False
    configure_backends(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_the_gpu_autotunes_cudnn() -> None:
    # the published GPU figures were measured with it on; the training loop and the replica set it
    torch.backends.cudnn.benchmark = False
    configure_backends(torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is True
    first, last = _learns(torch.device("cuda"), "bf16")
    assert last < first
