"""`resnet-pipe data preview`: a grid of augmented training samples, as the model sees them.

The samples come from the job's own training loader (DALI, the job's augmentations) and its
batch mixing (mixup/CutMix), are un-normalized back to pixels, and are captioned with their
class names (the top two with their weights when mixed).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from pipeline.config import Job
from pipeline.data.index import load_index
from pipeline.data.loader import build_loader
from pipeline.data.mix import mix_batch

CELL_PX = 192  # each sample is drawn at this size, whatever the crop
CAPTION_PX = 32  # two lines: a mixed sample names both classes
COLUMNS = 4


def write_preview(job: Job, out: Path, count: int = 16, seed: int = 0) -> int:
    """Writes a PNG grid of the first `count` training samples; returns the number drawn."""
    index = load_index(job.data.root)
    images, labels, _ = next(iter(build_loader(job, index, "train", seed=seed)))
    images, labels = images[:count], labels[:count]
    torch.manual_seed(seed)
    data = job.data
    images, targets = mix_batch(
        images, labels, len(index.classes), data.mixup_alpha, data.cutmix_alpha, data.cutmix_prob
    )
    mean, std = torch.tensor(data.mean)[:, None, None], torch.tensor(data.std)[:, None, None]
    pixels = (images * std + mean).clamp(0, 1).mul(255).byte().permute(0, 2, 3, 1).numpy()  # N x H x W x 3

    rows = -(-len(pixels) // COLUMNS)
    canvas = Image.new("RGB", (COLUMNS * CELL_PX, rows * (CELL_PX + CAPTION_PX)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, target) in enumerate(zip(pixels, targets)):
        left, top = (i % COLUMNS) * CELL_PX, (i // COLUMNS) * (CELL_PX + CAPTION_PX)
        canvas.paste(Image.fromarray(image).resize((CELL_PX, CELL_PX), Image.NEAREST), (left, top))
        draw.multiline_text(
            (left + 4, top + CELL_PX + 3), caption(target, index.names), fill="black", spacing=2
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return len(pixels)


def caption(target: torch.Tensor, names: list[str]) -> str:
    """'tench' for a plain sample; 'tench 0.70' and 'goldfish 0.30' on two lines for a mixed one."""
    weights, classes = target.topk(min(2, len(target)))
    parts = []
    for weight, cls in zip(weights.tolist(), classes.tolist()):
        name = names[cls].split(",")[0]
        if weight > 0.999:
            return name
        if weight > 0.001:
            parts.append(f"{name} {weight:.2f}")
    return "\n".join(parts)
