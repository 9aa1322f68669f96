"""The models we build ourselves, registered into timm's registry (`@register_model`), so that
jobs, checkpoints, the registry and serving take them like any timm model. Every model of the
project is made by `create_model`, which registers ours first.

- `blocks.py`: shortcut options A/B/C, basic and bottleneck blocks, plain and pre-activation;
- `resnet.py`: the one network class and the registration into timm;
- `imagenet.py`: Table 1's nets (`resnet34_a`, `plain34`, `preact_resnet50`, ...);
- `cifar.py`: Section 4.2's nets (`cifar_resnet110`, `cifar_plain56`, `cifar_preact_resnet164`, ...);
- `measure.py`: parameters and multiply-adds, as the paper counts them.

    model = create_model("resnet50", num_classes=1000, zero_init_last=True)
    model = create_model("cifar_resnet56", num_classes=10)
"""

from __future__ import annotations

import timm
from torch import nn

from pipeline.models import cifar, imagenet  # noqa: F401  (registers the paper's nets into timm)


def create_model(arch: str, num_classes: int, **kwargs) -> nn.Module:
    """`timm.create_model(arch, num_classes=num_classes, **kwargs)`, with our models registered.

    Raises:
        ValueError: `arch` is in no registry (timm's message names it).
    """
    return timm.create_model(arch, num_classes=num_classes, **kwargs)
