"""Which runs each study makes, at each scale.

`--scale paper` runs the paper's recipes as the jobs hold them (64k iterations on CIFAR-10, one
GPU each). `--scale quick` is sized by measurement to finish on 2 CPU cores within 90 minutes:
on this project's machine, two runs at once on one core each, a training step of 128 images
through Ray Train took 3.7 s for plain-56 and 4.0 s for ResNet-56 (bare PyTorch beside a second
such process: 2.75 and 2.97 s; 0.95 and 1.00 s for plain-20 and ResNet-20), evaluation and
Ray's start aside. 1,000 iterations of the four nets would take about 95 minutes there; 800 take
about 75. It trains on a fixed draw of 4,000 of the 50,000 training images and tests on 1,000 of
the 10,000 test images, for the first 800 iterations of the paper's schedule (learning rate 0.1
throughout), at depths 20 and 56. Measured again on 2026-12-06 (an Intel Xeon's 2 cores): the
quick degradation study took 26.6 minutes, depth 29.3 and shortcuts 15.5 (docs/paper.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scale = Literal["quick", "paper"]
Dataset = Literal["cifar10", "imagenet"]


@dataclass(frozen=True)
class Member:
    """One run of a study."""

    label: str  # "plain-20", "ResNet-56", "option B"
    job: str  # the job it runs
    family: str  # what the figure groups by: "plain", "residual", "A", "B", "C"
    depth: int
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    study: str
    scale: Scale
    dataset: Dataset
    members: tuple[Member, ...]
    settings: tuple[str, ...]  # what the scale changes in every member's job
    meaning: str  # what the scale means, said in the output and logged with the study


QUICK_CIFAR = (
    "data.train_images=4000",
    "data.val_images=1000",
    "iterations=800",
    "optim.warmup_iters=0",
    "optim.warmup_shape='linear'",
    "run.log_every_steps=10",
    "scaling.use_gpu=false",
    "scaling.cpus_per_worker=1",  # a run per core: two at once on this project's 2-core machine
    "data.threads_per_worker=1",
)
QUICK_MEANING = (
    "quick scale: a fixed draw of 4,000 CIFAR-10 training images and 1,000 test images, the first "
    "800 iterations of the paper's schedule (batch 128, learning rate 0.1 throughout), on the CPU; "
    "{which}"
)
PAPER_MEANING = (
    "paper scale: the paper's recipes as the jobs hold them (64k iterations, full data, one GPU each)"
)
# Table 6's test errors, %, for docs and the depth table beside ours
TABLE6 = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
# Table 3's top-1 errors (10-crop), % , ResNet-34 on ImageNet
TABLE3 = {"A": 25.03, "B": 24.52, "C": 24.19}


def _cifar(kind: str, depth: int) -> Member:
    label = f"plain-{depth}" if kind == "plain" else f"ResNet-{depth}"
    job = f"cifar10-plain{depth}" if kind == "plain" else f"cifar10-resnet{depth}"
    return Member(label, job, "plain" if kind == "plain" else "residual", depth)


def _scaled(study: str, scale: Scale, members: list[Member], paper: list[Member], which: str = ""):
    """The plan at `scale`: `paper`'s members as their jobs hold them, or `members` at the quick
    scale, whose meaning says `which` nets it trains (by default, its depths of the paper's)."""
    if scale == "paper":
        return Plan(study, scale, "cifar10", tuple(paper), (), PAPER_MEANING)
    if not which:
        depths, paper_depths = sorted({m.depth for m in members}), sorted({m.depth for m in paper})
        which = f"depths {_and(depths)} of the paper's {_and(paper_depths)}"
    return Plan(study, scale, "cifar10", tuple(members), QUICK_CIFAR, QUICK_MEANING.format(which=which))


def _and(items: list) -> str:
    return ", ".join(map(str, items[:-1])) + f" and {items[-1]}" if len(items) > 1 else str(items[0])


def degradation(scale: Scale, dataset: Dataset) -> Plan:
    """Figure 6 (left, middle): plain-20/32/44/56 beside ResNet-20/32/44/56/110; on ImageNet,
    Figure 4: plain-18/34 beside ResNet-18/34."""
    if dataset == "imagenet":
        if scale == "quick":
            raise ValueError("the ImageNet degradation study (Figure 4) runs at --scale paper, on GPUs")
        members = [Member(f"plain-{d}", f"imagenet-plain{d}", "plain", d) for d in (18, 34)] + [
            Member(f"ResNet-{d}", f"imagenet-r{d}", "residual", d) for d in (18, 34)
        ]
        return Plan("degradation", scale, dataset, tuple(members), (), PAPER_MEANING)
    paper = [_cifar("plain", d) for d in (20, 32, 44, 56)] + [
        _cifar("residual", d) for d in (20, 32, 44, 56, 110)
    ]
    quick = [_cifar(kind, d) for kind in ("plain", "residual") for d in (20, 56)]
    return _scaled("degradation", scale, quick, paper)


def depth(scale: Scale, dataset: Dataset) -> Plan:
    """Table 6: ResNet-20 to 110 (and 1202 at the paper's scale), error and parameters."""
    paper = [_cifar("residual", d) for d in (20, 32, 44, 56, 110, 1202)]
    quick = [_cifar("residual", d) for d in (20, 32, 44, 56)]
    return _scaled("depth", scale, quick, paper)


def shortcuts(scale: Scale, dataset: Dataset) -> Plan:
    """Table 3's options A, B and C: ResNet-34 on ImageNet at the paper's scale; on CIFAR at the
    quick scale, with ResNet-20's basic blocks."""
    if scale == "paper":
        members = [Member(f"option {o}", f"imagenet-r34-{o.lower()}", o, 34) for o in "ABC"]
        return Plan("shortcuts", scale, "imagenet", tuple(members), (), PAPER_MEANING)
    members = [
        Member(
            f"option {o}",
            "cifar10-resnet20",
            o,
            20,
            (f"model.arch='cifar_resnet20{'' if o == 'A' else '_' + o.lower()}'",),
        )
        for o in "ABC"
    ]
    which = "options A, B and C on ResNet-20's basic blocks, in place of the paper's ResNet-34 on ImageNet"
    return _scaled("shortcuts", scale, members, members, which)


def responses(scale: Scale, dataset: Dataset) -> Plan:
    """Figure 7: the responses of each 3x3 layer of plain-20/56 and ResNet-20/56/110, and the
    gradient that reaches each block (He et al. 2016), measured on the trained nets. Its quick
    scale trains the quick degradation study's nets (`--runs-of` takes that study's runs)."""
    if dataset == "imagenet":
        raise ValueError("the responses study (Figure 7) is of the CIFAR-10 nets")
    paper = [_cifar("plain", d) for d in (20, 56)] + [_cifar("residual", d) for d in (20, 56, 110)]
    quick = [_cifar(kind, d) for kind in ("plain", "residual") for d in (20, 56)]
    return _scaled("responses", scale, quick, paper)


STUDIES = {"degradation": degradation, "depth": depth, "shortcuts": shortcuts, "responses": responses}


def plan(study: str, scale: Scale, dataset: Dataset = "cifar10") -> Plan:
    """The runs of `study` at `scale`.

    Raises:
        ValueError: an unknown study, or a combination it does not run.
    """
    if study not in STUDIES:
        raise ValueError(f"unknown study '{study}' (known: {', '.join(STUDIES)})")
    return STUDIES[study](scale, dataset)
