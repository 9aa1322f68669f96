"""Training augmentations as DALI graph pieces, each a job setting (`[data]`), each running on
the GPU where the images are and on DALI's CPU operators where there is no GPU.

Order, as in torchvision's classification presets: random-resized crop, colour jitter,
TrivialAugment or RandAugment, flip and normalize, random erasing. Mixup and CutMix work on
whole batches and live in `pipeline.data.mix`.
"""

from __future__ import annotations

import math
import warnings

import nvidia.dali.math as dmath
from nvidia.dali import fn
from nvidia.dali.auto_aug import rand_augment, trivial_augment

from pipeline.config import Data

# DALI's auto_aug calls operators by their old experimental names; the warning is DALI's own
warnings.filterwarnings("ignore", message="This operator was moved out from the experimental phase")


def color_jitter(images, data: Data):
    """Brightness, contrast and saturation factors drawn from [1 - x, 1 + x], hue shifted by up
    to +-h of a full turn: torchvision's ColorJitter ranges (applied in a fixed order)."""
    brightness, contrast, saturation, hue = data.color_jitter
    factor = lambda x: fn.random.uniform(range=[max(0.0, 1 - x), 1 + x])  # noqa: E731
    return fn.color_twist(
        images,
        brightness=factor(brightness),
        contrast=factor(contrast),
        saturation=factor(saturation),
        hue=fn.random.uniform(range=[-360 * hue, 360 * hue]),  # DALI takes degrees
    )


def auto_augment(images, data: Data):
    """TrivialAugment Wide (Mueller and Hutter 2021) or RandAugment (Cubuk et al. 2019) on uint8 HWC."""
    if data.auto_augment == "trivial":
        return trivial_augment.trivial_augment_wide(images)
    return rand_augment.rand_augment(images, n=data.rand_augment_n, m=data.rand_augment_m)


def random_erasing(images, data: Data):
    """Random erasing (Zhong et al. 2017) on normalized CHW float images, torchvision's defaults:
    with probability p, a rectangle of 2-33 % of the area, aspect ratio log-uniform in [0.3, 3.3],
    set to 0 (the mean, after normalization)."""
    area = fn.random.uniform(range=[0.02, 0.33])
    ratio = dmath.exp(fn.random.uniform(range=[math.log(0.3), math.log(3.3)]))
    height = dmath.min(dmath.sqrt(area * ratio), 1.0)
    width = dmath.min(dmath.sqrt(area / ratio), 1.0)
    erase = fn.random.coin_flip(probability=data.random_erasing_prob)  # 0: an empty rectangle
    top = fn.random.uniform(range=[0.0, 1.0]) * (1.0 - height)
    left = fn.random.uniform(range=[0.0, 1.0]) * (1.0 - width)
    return fn.erase(
        images,
        anchor=fn.stack(top, left),
        shape=fn.stack(height * erase, width * erase),
        axis_names="HW",
        normalized_anchor=True,
        normalized_shape=True,
        fill_value=0.0,
    )
