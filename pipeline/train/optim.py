"""Optimizer parameter groups and the learning-rate schedule.

The schedule is a pure function of the global step, so resuming needs no scheduler state:

    lr = lr_at(step, job, steps_per_epoch)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import Job


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and BatchNorm weights and all biases (no weight decay).

    One-dimensional parameters are exactly BN scales/shifts and biases in a ResNet; excluding them
    from decay follows Goyal et al. 2017 and NVIDIA DeepLearningExamples.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, job: Job) -> torch.optim.Optimizer:
    """SGD with (Nesterov) momentum, or LAMB (timm's implementation), over `param_groups`."""
    groups = param_groups(model, job.optim.weight_decay)
    if job.optim.name == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, lr=job.peak_lr)
    return torch.optim.SGD(groups, lr=job.peak_lr, momentum=job.optim.momentum, nesterov=job.optim.nesterov)


def lr_at(step: int, job: Job, steps_per_epoch: int) -> float:
    """Learning rate at global `step` (0-based): a warmup (linear from 0, or constant at a share
    of the peak), then cosine, linear or step decay; boundaries and lengths in epochs or in steps."""
    peak, opt = job.peak_lr, job.optim
    warmup = opt.warmup_iters or opt.warmup_epochs * steps_per_epoch  # in steps
    if step < warmup:
        return peak * (opt.warmup_lr_ratio if opt.warmup_shape == "constant" else (step + 1) / warmup)
    if opt.schedule == "step":
        if opt.step_iters:
            return peak * 0.1 ** sum(step >= boundary for boundary in opt.step_iters)
        return peak * 0.1 ** sum(step / steps_per_epoch >= boundary for boundary in opt.step_epochs)
    total = job.iterations or job.epochs * steps_per_epoch
    progress = (step - warmup) / max(total - warmup, 1e-8)
    floor, progress = peak * opt.min_lr_ratio, min(progress, 1.0)
    if opt.schedule == "linear":
        return floor + (peak - floor) * (1 - progress)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
