"""The CIFAR networks of Section 4.2 (He et al. 2015) and of He et al. 2016, registered into
timm's registry.

6n+2 layers: a 3x3 convolution of 16 filters, then three stages of n basic blocks with 16, 32
and 64 filters on maps of 32, 16 and 8 pixels, a global average pool and the classifier.
Shortcuts of option A, so that each residual net has exactly its plain twin's parameters.

- `cifar_resnet20`, 32, 44, 56, 110, `cifar_resnet1202`: n = 3, 5, 7, 9, 18, 200; Table 6's
  0.27M, 0.46M, 0.66M, 0.85M, 1.7M and 19.4M parameters;
- `cifar_plain20` ... `cifar_plain1202`: the same nets without shortcuts, the same parameters;
- `cifar_resnet20_b`, `cifar_resnet20_c`, ...: shortcut options B and C (Table 3's, on CIFAR);
- `cifar_preact_resnet110`: pre-activation basic blocks (He et al. 2016);
- `cifar_preact_resnet164`, `cifar_preact_resnet1001`: pre-activation bottlenecks, 9n+2 layers
  with n = 18 and 111 (He et al. 2016, Table 5: 1.7M and 10.2M parameters; ours has 10.33M for
  1001, a difference we have not traced).

The pre-activation bottleneck nets have 16, 32 and 64 filters in their 3x3 layers and four times
that out of each block, and projection shortcuts where the channels change (option B), as the
2016 paper's released code; a downsampling bottleneck strides on its 3x3 there.
"""

from __future__ import annotations

import functools

from pipeline.models.blocks import BasicBlock, Bottleneck
from pipeline.models.resnet import ResNet, register

WIDTHS = (16, 32, 64)
DEPTHS = (20, 32, 44, 56, 110, 1202)  # Table 6
PREACT_BOTTLENECK_DEPTHS = (164, 1001)  # He et al. 2016, Table 5


def cifar_resnet(depth: int, num_classes: int = 10, **kwargs) -> ResNet:
    """The 6n+2-layer basic-block net; keyword arguments as `ResNet`'s (option A unless given)."""
    if (depth - 2) % 6:
        raise ValueError(f"a CIFAR net of basic blocks has 6n+2 layers; {depth} is not of that form")
    kwargs.setdefault("shortcut", "A")
    n = (depth - 2) // 6
    return ResNet(BasicBlock, (n, n, n), WIDTHS, stem="cifar", num_classes=num_classes, **kwargs)


def cifar_preact_bottleneck(depth: int, num_classes: int = 10, **kwargs) -> ResNet:
    """The 9n+2-layer pre-activation bottleneck net of He et al. 2016."""
    if (depth - 2) % 9:
        raise ValueError(f"a CIFAR net of bottleneck blocks has 9n+2 layers; {depth} is not of that form")
    kwargs.setdefault("stride_on", "3x3")
    n = (depth - 2) // 9
    return ResNet(Bottleneck, (n, n, n), WIDTHS, stem="cifar", preact=True, num_classes=num_classes, **kwargs)


def _register_all() -> None:
    for depth in DEPTHS:
        register(
            f"cifar_resnet{depth}",
            functools.partial(cifar_resnet, depth),
            f"The {depth}-layer CIFAR ResNet of Section 4.2 (He et al. 2015), option A.",
            __name__,
        )
        for option in "bc":
            register(
                f"cifar_resnet{depth}_{option}",
                functools.partial(cifar_resnet, depth, shortcut=option.upper()),
                f"The {depth}-layer CIFAR ResNet with shortcut option {option.upper()}.",
                __name__,
            )
        register(
            f"cifar_plain{depth}",
            functools.partial(cifar_resnet, depth, residual=False),
            f"The plain {depth}-layer CIFAR net of Section 4.2: cifar_resnet{depth} without shortcuts.",
            __name__,
        )
    register(
        "cifar_preact_resnet110",
        functools.partial(cifar_resnet, 110, preact=True),
        "The 110-layer CIFAR ResNet with pre-activation basic blocks (He et al. 2016).",
        __name__,
    )
    for depth in PREACT_BOTTLENECK_DEPTHS:
        register(
            f"cifar_preact_resnet{depth}",
            functools.partial(cifar_preact_bottleneck, depth),
            f"The {depth}-layer pre-activation bottleneck ResNet on CIFAR (He et al. 2016).",
            __name__,
        )


_register_all()
