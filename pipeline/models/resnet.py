"""One network class for every net of the paper, ImageNet's and CIFAR's, and the registration of
its named configurations into timm's registry.

    net = ResNet(BasicBlock, [3, 4, 6, 3], widths=(64, 128, 256, 512), stem="imagenet", shortcut="A")

The ImageNet stem is a 7x7 convolution of stride 2 and a 3x3 max pool (Table 1); the CIFAR stem
a 3x3 convolution of 16 filters (Section 4.2). A pre-activation net has no BN or ReLU in its
stem (its first block starts with them) and one BN and ReLU after its last block, before the
pooling (He et al. 2016, Section 4.1; timm's `resnetv2` does the same).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from timm.models import register_model
from torch import nn

from pipeline.models.blocks import (
    BasicBlock,
    Block,
    Bottleneck,
    PreActBasicBlock,
    PreActBottleneck,
    Shortcut,
    StrideOn,
    he_init,
    stage,
)

PREACT = {BasicBlock: PreActBasicBlock, Bottleneck: PreActBottleneck}


class ResNet(nn.Module):
    """A residual or plain network of the paper.

    Args:
        block: `BasicBlock` or `Bottleneck`.
        layers: blocks per stage.
        widths: each stage's width (a bottleneck's output is 4x).
        stem: "imagenet" (7x7/2 and a max pool) or "cifar" (3x3 of widths[0]).
        shortcut: option "A", "B" or "C" (Section 3.3).
        residual: False makes the plain twin: the same layers without the shortcuts.
        preact: the pre-activation blocks of He et al. 2016.
        stride_on: where a downsampling bottleneck strides ("1x1": the paper's models; "3x3":
            torchvision's and timm's "v1.5").
        num_classes: outputs of the classifier.
        in_chans: channels of the input image.
        zero_init_last: the last layer of each residual branch starts at zero (`he_init`).
    """

    def __init__(
        self,
        block: type[Block],
        layers: Sequence[int],
        widths: Sequence[int],
        stem: Literal["imagenet", "cifar"],
        shortcut: Shortcut = "B",
        residual: bool = True,
        preact: bool = False,
        stride_on: StrideOn = "1x1",
        num_classes: int = 1000,
        in_chans: int = 3,
        zero_init_last: bool = False,
    ):
        super().__init__()
        if shortcut not in ("A", "B", "C"):
            raise ValueError(f"shortcut must be 'A', 'B' or 'C' (He et al. 2015, Sec. 3.3), not {shortcut!r}")
        if stride_on not in ("1x1", "3x3"):
            raise ValueError(f"stride_on must be '1x1' or '3x3', not {stride_on!r}")
        self.num_classes = num_classes
        self.preact = preact
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.Identity() if preact else nn.BatchNorm2d(widths[0])
        self.act1 = nn.Identity() if preact else nn.ReLU(inplace=True)
        kind = PREACT[block] if preact else block
        channels = widths[0]
        for i, (blocks, width) in enumerate(zip(layers, widths)):
            layer = stage(kind, channels, width, blocks, 1 if i == 0 else 2, shortcut, residual, stride_on)
            self.add_module(f"layer{i + 1}", layer)
            channels = width * kind.expansion
        self.stages = len(layers)
        self.num_features = channels
        self.final_norm = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True)) if preact else None
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        he_init(self, zero_init_last)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)

    def stage_layers(self) -> list[nn.Sequential]:
        """The stages, first to last."""
        return [getattr(self, f"layer{i + 1}") for i in range(self.stages)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for layer in self.stage_layers():
            x = layer(x)
        return x if self.final_norm is None else self.final_norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.global_pool(self.forward_features(x)), 1))


def register(name: str, build: Callable[..., ResNet], doc: str, module: str) -> None:
    """Registers `build` into timm's registry as `name`, so that `timm.create_model(name, ...)`
    makes it; keyword arguments reach `ResNet` (`shortcut=`, `stride_on=`, `zero_init_last=`)."""

    def entry(pretrained: bool = False, **kwargs) -> ResNet:
        if pretrained:
            raise ValueError(f"{name} has no pretrained weights: train it (`resnet-pipe submit ...`)")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)  # what timm's factory passes to every entry point
        return build(**kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = doc
    entry.__module__ = module
    setattr(sys.modules[module], name, entry)  # `pipeline.models.cifar.cifar_resnet110` exists
    register_model(entry)
