"""timm's bottleneck ResNets are torchvision's, parameter for parameter: checkpoints of either load."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision


@pytest.mark.parametrize(
    "name, expected", [("resnet50", 25_557_032), ("resnet101", 44_549_160), ("resnet152", 60_192_808)]
)
def test_timm_resnets_load_torchvision_weights(name: str, expected: int) -> None:
    reference = getattr(torchvision.models, name)(weights=None).eval()
    model = timm.create_model(name, num_classes=1000).eval()
    assert sum(p.numel() for p in model.parameters()) == expected  # the counts torchvision publishes
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_last_batchnorm_of_each_residual_branch_starts_at_zero() -> None:
    model = timm.create_model("resnet50", num_classes=10, zero_init_last=True)
    blocks = [m for m in model.modules() if isinstance(m, timm.models.resnet.Bottleneck)]
    assert len(blocks) == 16  # 3 + 4 + 6 + 3 (He et al. 2016, Table 1)
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
