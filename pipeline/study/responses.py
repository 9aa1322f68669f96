"""What the `responses` study measures on a net's weights: Figure 7 of He et al. 2015, and the
gradient that He et al. 2016 derive for residual units.

Responses (2015, Section 4.2, Figure 7): the standard deviation of each 3x3 layer's output after
its BN and before the nonlinearity (the ReLU, or the addition in a residual block's last layer),
over a batch of test images, the net in evaluation mode. The paper's finding: residual
functions are generally closer to zero than the non-residual ones, and the deeper the ResNet,
the smaller its responses.

Gradients (2016, Section 3, Eq. 5): with identity shortcuts, dE/dx_l = dE/dx_L (1 + d/dx_l sum
F), so a gradient reaches every unit l undiminished by the layers above it; a plain net has only
the product of its layers' Jacobians. Measured as the L2 norm of dE/dx at the output of every
block (x_l, bottom to top) for one training batch (the net in training mode, as it learns), at
initialisation (the run's seed, as the run began) and on the trained weights.

    measured = measure(job, index, checkpoint_folder)   # Measured(responses, grad_init, grad_trained)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

from pipeline.config import Job
from pipeline.data.index import Index
from pipeline.data.loader import build_loader
from pipeline.models import create_model
from pipeline.models.blocks import Block
from pipeline.storage import Location
from pipeline.study.figures import COLOURS, depths, twins
from pipeline.study.plans import Member
from pipeline.train import checkpoint


@dataclass(frozen=True)
class Measured:
    responses: list[float]  # each 3x3 layer's response std, in the net's order (the stem's first)
    grad_init: list[float]  # |dE/dx_l| at each block's output, bottom to top, at initialisation
    grad_trained: list[float]  # the same on the trained weights


def measure(job: Job, index: Index, weights: Location) -> Measured:
    """Figure 7's responses and the blocks' gradient norms of the net that `job` trains, at its
    initialisation and with the weights of the checkpoint folder `weights`, on the CPU."""
    images, labels = _batch(job, index, "val")
    train_images, train_labels = _batch(job, index, "train")
    torch.manual_seed(job.seed)  # the run's own initial weights (pipeline.train.loop)
    model = create_model(
        job.model.arch, num_classes=len(index.classes), zero_init_last=job.model.zero_init_last_bn
    )
    grad_init = block_gradients(model, train_images, train_labels)
    model.load_state_dict(checkpoint.load(weights)["model"])
    return Measured(responses(model, images), grad_init, block_gradients(model, train_images, train_labels))


def _batch(job: Job, index: Index, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first batch of `split` as the run's loaders give it (its normalisation; training: its
    augmentation at the run's seed)."""
    loader = build_loader(job, index, split)
    images, labels, _ = next(iter(loader))
    return images.float(), labels


def three_by_three_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BN layers that follow a 3x3 convolution, in the net's order (the modules of the
    paper's nets are declared in the order they run: conv, then its BN)."""
    found, last_conv = [], None
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            last_conv = module
        elif isinstance(module, nn.BatchNorm2d) and last_conv is not None and last_conv.kernel_size == (3, 3):
            found.append(module)
            last_conv = None
    return found


@torch.no_grad()
def responses(model: nn.Module, images: torch.Tensor) -> list[float]:
    """Each 3x3 layer's response std on `images`, in evaluation mode. Read as the BN returns it:
    the ReLU after it works in place."""
    stds: list[float] = []
    hooks = [
        norm.register_forward_hook(lambda _m, _i, out: stds.append(out.float().std().item()))
        for norm in three_by_three_norms(model)
    ]
    try:
        model.eval()(images)
    finally:
        for hook in hooks:
            hook.remove()
    return stds


def block_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """|dE/dx_l| at each block's output x_l, bottom to top, for the cross-entropy E of one
    batch in training mode; the weights and BN statistics are left as they were."""
    outputs: list[torch.Tensor] = []

    def keep(_module, _inputs, out: torch.Tensor) -> None:
        out.retain_grad()
        outputs.append(out)

    state = {k: v.clone() for k, v in model.state_dict().items()}  # BN running statistics move in train mode
    hooks = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, Block)]
    try:
        model.train()
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
        model.load_state_dict(state)
    return [out.grad.norm().item() for out in outputs]


def draw_responses(measured: list[tuple[Member, Measured]], path: Path) -> Path:
    """Figure 7 (the responses in the net's order, and sorted by size) beside the blocks'
    gradient norms (at initialisation dashed, trained solid); plain nets dashed in Figure 7."""
    figure = Figure(figsize=(16, 4.2), dpi=120)
    order, ranked, grads = figure.subplots(1, 3)
    for member, m in measured:
        colour = COLOURS.get(member.depth)
        style = "--" if member.family == "plain" else "-"
        layers = range(1, len(m.responses) + 1)
        order.plot(layers, m.responses, style, color=colour, linewidth=1, label=member.label)
        ranked.plot(
            layers, sorted(m.responses, reverse=True), style, color=colour, linewidth=1, label=member.label
        )
        blocks = range(1, len(m.grad_init) + 1)
        grads.plot(blocks, m.grad_init, ":", color=colour, linewidth=1)
        grads.plot(blocks, m.grad_trained, style, color=colour, linewidth=1.2, label=member.label)
    order.set(title="responses, in the net's order", xlabel="layer index (original)", ylabel="std")
    ranked.set(title="responses, sorted by size", xlabel="layer index (sorted by magnitude)", ylabel="std")
    grads.set(
        title="|dE/dx_l| at each block: initialisation dotted, trained",
        xlabel="block l (bottom to top)",
        ylabel="gradient norm",
        yscale="log",
    )
    for ax in (order, ranked, grads):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def _bottom_over_top(grads: list[float]) -> float:
    return grads[0] / grads[-1]


def responses_table(measured: list[tuple[Member, Measured]]) -> str:
    """Each net's mean response std, and how the gradient at its first block compares with the
    one at its last (1: undiminished), at initialisation and trained."""
    lines = [
        "| net | 3x3 layers | mean response std | gradient, first block / last: at init | trained |",
        "|---|---:|---:|---:|---:|",
    ]
    for member, m in measured:
        mean = sum(m.responses) / len(m.responses)
        lines.append(
            f"| {member.label} | {len(m.responses)} | {mean:.3f} | {_bottom_over_top(m.grad_init):.3g} "
            f"| {_bottom_over_top(m.grad_trained):.3g} |"
        )
    return "\n".join(lines) + "\n"


def responses_findings(measured: list[tuple[Member, Measured]]) -> list[str]:
    """Figure 7's two claims, and the 2016 paper's, as the measurements stand."""
    mean = {(member.family, member.depth): sum(m.responses) / len(m.responses) for member, m in measured}
    ratio = {(member.family, member.depth): _bottom_over_top(m.grad_init) for member, m in measured}
    lines = []
    for depth in twins(mean):
        relation = "smaller" if mean["residual", depth] < mean["plain", depth] else "not smaller"
        lines.append(
            f"at depth {depth} the residual net's responses (mean std {mean['residual', depth]:.3f}) are "
            f"{relation} than the plain net's ({mean['plain', depth]:.3f})"
        )
        lines.append(
            f"at initialisation the gradient at the first block of plain-{depth} is "
            f"{ratio['plain', depth]:.3g} times the one at its last; of ResNet-{depth}, "
            f"{ratio['residual', depth]:.3g} times"
        )
    residual = depths(mean, "residual")
    if len(residual) > 1:
        low, high = residual[0], residual[-1]
        relation = "smaller" if mean["residual", high] < mean["residual", low] else "not smaller"
        lines.append(
            f"ResNet-{high}'s responses (mean std {mean['residual', high]:.3f}) are {relation} than "
            f"ResNet-{low}'s ({mean['residual', low]:.3f})"
        )
    return lines
