"""The ImageNet networks of Table 1 (He et al. 2015), registered into timm's registry.

| name                         | blocks per stage | block      | shortcut                    |
|------------------------------|------------------|------------|-----------------------------|
| `resnet18_a` ... `_c`        | 2, 2, 2, 2       | basic      | option A, B or C            |
| `resnet34_a` ... `_c`        | 3, 4, 6, 3       | basic      |                             |
| `resnet50_a` ... `_c`        | 3, 4, 6, 3       | bottleneck |                             |
| `resnet101_a` ... `_c`       | 3, 4, 23, 3      | bottleneck |                             |
| `resnet152_a` ... `_c`       | 3, 8, 36, 3      | bottleneck |                             |
| `plain18` ... `plain152`     | the same         |            | none: the plain twins       |
| `preact_resnet18` ... `152`  | the same         | pre-act.   | option B (He et al. 2016)   |

Table 1 shows 34 layers with option A (Figure 3), the bottleneck nets with option B (Section
3.3, "we use option B for increasing dimensions"). A downsampling bottleneck strides on its
first 1x1, as the paper's released models do; `stride_on="3x3"` gives torchvision's and timm's
"v1.5", which with option B is timm's `resnet50` parameter for parameter:

    timm.create_model("resnet50_b", stride_on="3x3").load_state_dict(timm_resnet50.state_dict())

timm's own `resnet18` ... `resnet152` (option B, v1.5) stay what they are.
"""

from __future__ import annotations

import functools

from pipeline.models.blocks import BasicBlock, Bottleneck
from pipeline.models.resnet import ResNet, register

WIDTHS = (64, 128, 256, 512)  # Table 1: conv2_x ... conv5_x
TABLE1 = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def imagenet_resnet(depth: int, **kwargs) -> ResNet:
    """The `depth`-layer net of Table 1; keyword arguments as `ResNet`'s."""
    block, layers = TABLE1[depth]
    return ResNet(block, layers, WIDTHS, stem="imagenet", **kwargs)


def _register_all() -> None:
    for depth in TABLE1:
        for option in "abc":
            register(
                f"resnet{depth}_{option}",
                functools.partial(imagenet_resnet, depth, shortcut=option.upper()),
                f"ResNet-{depth} of Table 1 with shortcut option {option.upper()} (He et al. 2015).",
                __name__,
            )
        register(
            f"plain{depth}",
            functools.partial(imagenet_resnet, depth, residual=False),
            f"The plain {depth}-layer net of Table 1: ResNet-{depth} without its shortcuts.",
            __name__,
        )
        register(
            f"preact_resnet{depth}",
            functools.partial(imagenet_resnet, depth, preact=True),
            f"ResNet-{depth} with the pre-activation blocks of He et al. 2016.",
            __name__,
        )


_register_all()
