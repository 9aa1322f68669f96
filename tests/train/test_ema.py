from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.train.ema import WeightEMA


def test_the_average_follows_the_weights_at_its_period() -> None:
    model = nn.BatchNorm1d(2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = WeightEMA(model, decay=0.9, every_steps=2)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_mean.fill_(5.0)
    ema.update(model, step=1)  # off-period: nothing moves
    assert ema.model.weight.tolist() == [1.0, 1.0]
    ema.update(model, step=2)  # d = 0.9 ** 2 = 0.81: 0.81 x 1 + 0.19 x 3
    assert ema.model.weight.tolist() == pytest.approx([1.38, 1.38])
    assert ema.model.running_mean.tolist() == [5.0, 5.0]  # buffers are copied, not averaged
    assert not ema.model.weight.requires_grad


def test_state_round_trips() -> None:
    model = nn.Linear(3, 2)
    ema = WeightEMA(model, decay=0.5, every_steps=1)
    other = WeightEMA(nn.Linear(3, 2), decay=0.5, every_steps=1)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ema.model.parameters(), other.model.parameters()))
