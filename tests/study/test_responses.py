"""The responses study's measurements (Figure 7 of He et al. 2015; the gradient of He et al.
2016) read the layers the papers name, and leave the net as it was."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import create_model
from pipeline.models.blocks import Block
from pipeline.study.plans import plan
from pipeline.study.responses import (
    Measured,
    block_gradients,
    responses,
    responses_findings,
    responses_table,
    three_by_three_norms,
)


def test_responses_are_read_after_each_3x3_layers_bn_and_before_its_relu() -> None:
    torch.manual_seed(0)
    # the stem and two per block: 1 + 2 x 9 for ResNet-20; a projection's BN (option B) is not one
    assert len(three_by_three_norms(create_model("cifar_resnet20", num_classes=10))) == 19
    assert len(three_by_three_norms(create_model("cifar_resnet20_b", num_classes=10))) == 19
    assert len(three_by_three_norms(create_model("cifar_plain56", num_classes=10))) == 55
    net = create_model(
        "cifar_resnet20", num_classes=10, zero_init_last=True
    )  # every block's last BN scales by 0
    for module in net.modules():  # running statistics as a trained net's: not those of a new BN
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.fill_(4.0)
    stds = responses(net, torch.randn(8, 3, 32, 32))
    # the stem, then each block's first layer, which its ReLU would clip to >= 0, read before it
    # (a ReLU'd response would not be centred); each block's last layer is 0: its BN's scale
    assert stds[0] > 0 and all(s > 0 for s in stds[1::2]) and all(s == 0 for s in stds[2::2])
    seen = []  # a copy of what the first block's first BN gave, before its ReLU works in place
    net.layer1[0].bn1.register_forward_hook(lambda m, i, out: seen.append(out.clone()) and None)
    stds = responses(net, torch.randn(8, 3, 32, 32))
    assert seen[0].min() < 0 and stds[1] == pytest.approx(seen[0].std().item())


def test_an_identity_shortcut_passes_the_gradient_on_undiminished() -> None:
    # He et al. 2016, Eq. 5: dE/dx_l = dE/dx_L (1 + d/dx_l sum F). With every branch at zero the
    # sum vanishes: below the top block, the gradient at every block's output is the same (option
    # A's subsampling and zero channels included); the top block's ReLU passes nothing where its
    # output is 0, which every output below it already is
    torch.manual_seed(0)
    net = create_model("cifar_resnet20", num_classes=10, zero_init_last=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads = block_gradients(net, torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    assert len(grads) == len([m for m in net.modules() if isinstance(m, Block)]) == 9
    assert grads[-1] > grads[0] > 0
    assert all(g == pytest.approx(grads[0], rel=1e-5) for g in grads[:-1])
    # a plain net of the same depth has no such term: its gradient changes from block to block
    plain = block_gradients(
        create_model("cifar_plain20", num_classes=10), torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    )
    assert len(set(plain[0:3])) == 3
    after = net.state_dict()  # the weights and BN statistics as they were; no gradient left behind
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in net.parameters())


def test_the_responses_table_and_findings_say_what_was_measured() -> None:
    members = {m.label: m for m in plan("responses", "quick").members}
    assert list(members) == ["plain-20", "plain-56", "ResNet-20", "ResNet-56"]
    assert [m.label for m in plan("responses", "paper").members][-1] == "ResNet-110"
    measured = [
        (members["plain-56"], Measured([2.0, 1.0, 3.0], [1e-3, 1.0], [1e-2, 1.0])),
        (members["ResNet-56"], Measured([0.5, 0.5, 0.5], [0.5, 1.0], [0.8, 1.0])),
        (members["ResNet-20"], Measured([0.7, 0.8, 0.9], [0.9, 1.0], [0.9, 1.0])),
    ]
    said = responses_findings(measured)
    assert said[0] == (
        "at depth 56 the residual net's responses (mean std 0.500) are smaller than the plain net's (2.000)"
    )
    assert said[1] == (
        "at initialisation the gradient at the first block of plain-56 is 0.001 times the one at its last; "
        "of ResNet-56, 0.5 times"
    )
    assert said[2] == "ResNet-56's responses (mean std 0.500) are smaller than ResNet-20's (0.800)"
    assert responses_table(measured).splitlines()[2] == "| plain-56 | 3 | 2.000 | 0.001 | 0.01 |"
