"""What the paper counts of a network: its parameters, and its multiply-adds for one image.

    parameters(model), multiply_adds(model, image_px=224)

Multiply-adds as Table 1 counts them ("FLOPs", in multiply-adds): those of the convolutions and
the fully connected layer. BN, ReLU, pooling and the shortcuts' additions are left out (they
are below Table 1's rounding: ResNet-34's additions are 0.003 x 10^9).
"""

from __future__ import annotations

import torch
from torch import nn


def parameters(model: nn.Module) -> int:
    """Every parameter of `model` (BN's weights and biases included, as Table 6 counts)."""
    return sum(p.numel() for p in model.parameters())


def multiply_adds(model: nn.Module, image_px: int, in_chans: int = 3) -> int:
    """The multiply-adds of the convolutions and linear layers of `model` on one square image of
    `image_px` pixels, counted from the shapes of one forward pass. A model built on the meta
    device (`with torch.device("meta"):`) is counted without allocating or initialising weights."""
    total = 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            # every output value costs (input channels per group) x kernel area multiply-adds
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * per_output
        else:
            total += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_chans, image_px, image_px, device=next(model.parameters()).device))
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    return total
