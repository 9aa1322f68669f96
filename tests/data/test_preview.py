from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import load_job
from pipeline.data.preview import CAPTION_PX, CELL_PX, caption, write_preview


def test_preview_draws_a_captioned_grid_of_augmented_samples(prepared_dataset: Path, tmp_path: Path) -> None:
    job = load_job(
        "quickstart",
        [
            f"data.root='{prepared_dataset}'",
            "data.crop_px=40",
            "data.auto_augment='trivial'",
            "data.mixup_alpha=0.4",
        ],
    )
    shown = write_preview(job, tmp_path / "grid.png", count=6)
    assert shown == 6
    with Image.open(tmp_path / "grid.png") as image:
        assert image.size == (4 * CELL_PX, 2 * (CELL_PX + CAPTION_PX))
        cells = np.asarray(image.convert("RGB"))
    first = cells[:CELL_PX, :CELL_PX]
    assert first.std() > 10  # a real picture, not a blank cell
    caption_band = cells[CELL_PX : CELL_PX + CAPTION_PX, :CELL_PX]
    assert (caption_band < 128).any()  # text was drawn


def test_captions_name_one_class_or_the_two_mixed_ones() -> None:
    names = ["tench, Tinca tinca", "goldfish, Carassius auratus", "dots"]
    assert caption(torch.tensor([0.0, 1.0, 0.0]), names) == "goldfish"
    assert caption(torch.tensor([0.7, 0.0, 0.3]), names) == "tench 0.70\ndots 0.30"
