"""An exponential moving average of the model's weights (Polyak averaging), evaluated and
checkpointed beside the model, as in torchvision's and timm's strong recipes.

    ema = WeightEMA(model, decay=0.99998, every_steps=32)
    ema.update(model, step)    # after each optimizer step; acts every `every_steps` steps
    evaluate(ema.model, ...)
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    """ema = d * ema + (1 - d) * weights every `every_steps` steps, with d = decay ** every_steps
    (so the average spans the same number of steps as a per-step update); buffers (BatchNorm's
    running statistics) are copied."""

    def __init__(self, model: nn.Module, decay: float, every_steps: int):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay**every_steps
        self.every_steps = every_steps

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """`step`: optimizer steps taken so far (1 after the first)."""
        if step % self.every_steps:
            return
        for ema_param, param in zip(self.model.parameters(), model.parameters()):
            ema_param.lerp_(param.detach(), 1 - self.decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
