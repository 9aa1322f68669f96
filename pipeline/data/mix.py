"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on a batch, on its own device.

Each batch is mixed with itself rolled by one sample; the mixing weight is drawn from
Beta(alpha, alpha) with torch's global RNG (saved in every checkpoint), and when both are on,
each batch is CutMix with probability `cutmix_prob`, else Mixup. Targets become class
probabilities, which `nn.CrossEntropyLoss` takes (label smoothing applies on top).

    images, targets = mix_batch(images, labels, num_classes=1000, mixup_alpha=0.2, cutmix_alpha=1.0)
"""

from __future__ import annotations

import torch
from torch import nn


def mix_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    cutmix_prob: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the mixed images (N x C x H x W) and targets (N x num_classes, rows sum to 1)."""
    targets = nn.functional.one_hot(labels, num_classes).to(images.dtype)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or float(torch.rand(())) < cutmix_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    rolled = images.roll(1, dims=0)
    if use_cutmix:
        images, lam = _paste_box(images, rolled, lam)
    else:
        images = lam * images + (1 - lam) * rolled
    return images, lam * targets + (1 - lam) * targets.roll(1, dims=0)


def _paste_box(images: torch.Tensor, rolled: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """Pastes a box of about (1 - lam) of the area from `rolled`; returns the exact kept share."""
    height, width = images.shape[-2:]
    cut = (1 - lam) ** 0.5
    box_h, box_w = int(height * cut), int(width * cut)
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    top, bottom = max(cy - box_h // 2, 0), min(cy + box_h // 2, height)
    left, right = max(cx - box_w // 2, 0), min(cx + box_w // 2, width)
    images = images.clone()
    images[..., top:bottom, left:right] = rolled[..., top:bottom, left:right]
    return images, 1 - (bottom - top) * (right - left) / (height * width)
