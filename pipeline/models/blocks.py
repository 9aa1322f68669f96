"""The building blocks of the paper's networks, shared by the ImageNet nets (`imagenet.py`) and the
CIFAR nets (`cifar.py`): the shortcut options, the basic and bottleneck blocks (residual or
plain), and their pre-activation forms.

He et al. 2015, "Deep Residual Learning for Image Recognition" (arXiv:1512.03385), Section 3.3:

- option A: identity shortcuts; where the dimensions grow, the input is subsampled and padded
  with zero channels (no parameters);
- option B: projections (1x1 convolution and BN) where the dimensions change, identity elsewhere;
- option C: projections on every shortcut.

A plain block is the same block without its shortcut (Section 4.1: "plain nets... the same
number of parameters, depth, width and computational cost, except the shortcuts").

He et al. 2016, "Identity Mappings in Deep Residual Networks" (arXiv:1603.05027): the
pre-activation block runs BN, ReLU, convolution, twice (three times in a bottleneck), and
leaves the sum untouched, so that x_{l+1} = x_l + F(x_l) exactly.

Module names follow timm's `ResNet` (`conv1`, `bn1`, `act1`, ..., `downsample.0` and `.1`), so
that a net of option B loads timm's (and torchvision's) state dicts parameter for parameter.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Shortcut = Literal["A", "B", "C"]
StrideOn = Literal["1x1", "3x3"]  # where a downsampling bottleneck strides (see `Bottleneck`)


class ZeroPadShortcut(nn.Module):
    """Option A where the dimensions grow: every `stride`-th pixel of the input, with zero
    channels appended up to `out_channels`. No parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))  # pads dim 1 (channels) at its end


def shortcut(in_channels: int, out_channels: int, stride: int, option: Shortcut) -> nn.Module | None:
    """The shortcut of a block under `option`; None is the identity."""
    changes = in_channels != out_channels or stride != 1
    if option == "C" or (option == "B" and changes):
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
        )
    if option == "A" and changes:
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return None


def bottleneck_strides(stride: int, stride_on: StrideOn) -> tuple[int, int]:
    """The strides of a bottleneck's first 1x1 and its 3x3 (see `Bottleneck`)."""
    return (stride, 1) if stride_on == "1x1" else (1, stride)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class Block(nn.Module):
    """What the blocks share: a shortcut (None in a plain block or where it is the identity),
    and whether to add one at all."""

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int, option: Shortcut, residual: bool):
        super().__init__()
        self.residual = residual
        self.downsample = shortcut(in_channels, out_channels, stride, option) if residual else None

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def branch_end(self) -> nn.Module:
        """The last layer of the residual branch, with a weight: what `zero_init_last` zeroes."""
        raise NotImplementedError


class BasicBlock(Block):
    """Two 3x3 convolutions (Figure 5, left): the block of the 18- and 34-layer nets and of
    the CIFAR nets."""

    def __init__(self, in_channels: int, width: int, stride: int, option: Shortcut, residual: bool, **_):
        super().__init__(in_channels, width, stride, option, residual)
        self.conv1 = conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU(inplace=True)

    def branch_end(self) -> nn.Module:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        if self.residual:
            out = out + self._shortcut(x)
        return self.act2(out)


class Bottleneck(Block):
    """1x1 (reduce), 3x3, 1x1 (restore, x4) (Figure 5, right): the block of the 50-, 101- and
    152-layer nets.

    `stride_on` places the stride of a downsampling block: on the first 1x1, as in the paper's
    released Caffe models ("v1", Table 1's 3.8 x 10^9 multiply-adds for ResNet-50), or on the
    3x3, as torchvision and timm do ("v1.5": about 0.5 % more top-1 on ImageNet, NVIDIA's
    DeepLearningExamples, for 4.1 x 10^9).
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int,
        option: Shortcut,
        residual: bool,
        stride_on: StrideOn = "1x1",
    ):
        out_channels = width * self.expansion
        super().__init__(in_channels, out_channels, stride, option, residual)
        first, middle = bottleneck_strides(stride, stride_on)
        self.conv1 = conv1x1(in_channels, width, first)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width, middle)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.act3 = nn.ReLU(inplace=True)

    def branch_end(self) -> nn.Module:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.act2(self.bn2(self.conv2(out)))))
        if self.residual:
            out = out + self._shortcut(x)
        return self.act3(out)


class PreActBasicBlock(Block):
    """BN, ReLU, 3x3; BN, ReLU, 3x3; then the addition, nothing after it (He et al. 2016,
    Figure 4(e)). A projection shortcut takes the pre-activated input, as the 2016 paper's
    code does where a stage begins."""

    def __init__(self, in_channels: int, width: int, stride: int, option: Shortcut, residual: bool, **_):
        super().__init__(in_channels, width, stride, option, residual)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(in_channels, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width)

    def branch_end(self) -> nn.Module:
        return self.conv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(pre))))
        if not self.residual:
            return out
        return out + (x if self.downsample is None else self.downsample(pre))


class PreActBottleneck(Block):
    """The pre-activation bottleneck (He et al. 2016): BN, ReLU, 1x1; BN, ReLU, 3x3; BN, ReLU,
    1x1 (x4); then the addition. The block of ResNet-164 and ResNet-1001 on CIFAR."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int,
        option: Shortcut,
        residual: bool,
        stride_on: StrideOn = "1x1",
    ):
        out_channels = width * self.expansion
        super().__init__(in_channels, out_channels, stride, option, residual)
        first, middle = bottleneck_strides(stride, stride_on)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = conv1x1(in_channels, width, first)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width, middle)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.conv3 = conv1x1(width, out_channels)

    def branch_end(self) -> nn.Module:
        return self.conv3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(pre))))
        out = self.conv3(self.act3(self.bn3(out)))
        if not self.residual:
            return out
        return out + (x if self.downsample is None else self.downsample(pre))


def stage(
    block: type[Block],
    in_channels: int,
    width: int,
    blocks: int,
    stride: int,
    option: Shortcut,
    residual: bool,
    stride_on: StrideOn,
) -> nn.Sequential:
    """`blocks` blocks of `width`; the first strides by `stride` and changes the channels."""
    layers = []
    for i in range(blocks):
        layers.append(
            block(in_channels, width, stride if i == 0 else 1, option, residual, stride_on=stride_on)
        )
        in_channels = width * block.expansion
    return nn.Sequential(*layers)


def he_init(model: nn.Module, zero_init_last: bool) -> None:
    """He et al. 2015 ("Delving deep into rectifiers") for every convolution, BN at weight 1 and
    bias 0. With `zero_init_last`, the last BN of each residual branch starts at 0 (Goyal et al.
    2017; the last convolution of a pre-activation branch, which ends in one), so that every
    residual block starts as its shortcut; a plain block keeps its BN at 1, since zeroing it
    would cut the signal."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if zero_init_last:
        for module in model.modules():
            if isinstance(module, Block) and module.residual:
                nn.init.zeros_(module.branch_end().weight)
