"""Serving's forward pass compiled (`Loaded.compile`): the same answers as eager at every batch
size, with batches padded to the compiled sizes rather than compiled anew."""

from __future__ import annotations

import torch
from torch import nn
from torch._dynamo.utils import counters

from pipeline.config import load_job
from pipeline.inference import Loaded, padded_sizes


def test_padded_sizes_are_the_powers_of_two_below_the_largest_batch_and_the_largest() -> None:
    assert padded_sizes(1) == (1,)
    assert padded_sizes(6) == (1, 2, 4, 6)
    assert padded_sizes(8) == (1, 2, 4, 8)
    assert padded_sizes(100) == (1, 2, 4, 8, 16, 32, 64, 100)


def test_a_compiled_forward_pass_answers_as_the_eager_one_and_pads_instead_of_recompiling() -> None:
    job = load_job("quickstart", [])
    torch.manual_seed(0)
    model = nn.Sequential(  # a small conv net with BatchNorm, which inductor's freezing folds
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()  # fmt: skip
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    classes = [(f"n{i}", str(i)) for i in range(5)]
    eager = Loaded("tiny", "1", model, classes, job, torch.device("cpu"), channels_last=True)
    compiled = Loaded("tiny", "1", model, classes, job, torch.device("cpu"), channels_last=True)

    assert compiled.compile(max_batch=4, threads=2)
    assert compiled.sizes == (1, 2, 4) and compiled.forward is not None
    graphs = counters["stats"]["unique_graphs"]
    crop = job.data.val_crop_px
    images = torch.randn(5, 3, crop, crop)
    for count in (1, 2, 3, 4, 5):  # 3 runs padded to 4; 5 is beyond the compiled sizes: eager
        answer = compiled.probabilities(images[:count])
        assert answer.shape == (count, 5)
        torch.testing.assert_close(answer, eager.probabilities(images[:count]), atol=1e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs  # every size was compiled by `compile`
