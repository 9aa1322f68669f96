"""`resnet-pipe models`: the paper's networks we register into timm, with what the paper counts
of them (parameters, multiply-adds)."""

from __future__ import annotations

import click

from pipeline.cli.common import print_table


@click.command("models")
@click.option("--family", type=click.Choice(["cifar", "imagenet", "all"]), default="all", show_default=True)
def models(family: str) -> None:
    """The paper's networks (timm names), their parameters and multiply-adds per image (CIFAR's
    at 32 px, ImageNet's at 224 px), counted as Tables 1 and 6 count them."""
    import timm
    import torch

    from pipeline.models import cifar, imagenet
    from pipeline.models.measure import multiply_adds, parameters

    rows = [("MODEL", "PARAMETERS", "MULTIPLY-ADDS", "IMAGE")]
    for module, prefix, px, classes in ((imagenet, "", 224, 1000), (cifar, "cifar_", 32, 10)):
        if family not in ("all", module.__name__.rsplit(".", 1)[1]):
            continue
        names = [
            n for n in timm.list_models(module=module.__name__.rsplit(".", 1)[1]) if n.startswith(prefix)
        ]
        for name in names:
            with torch.device("meta"):  # shapes only: no weights allocated
                model = timm.create_model(name, num_classes=classes)
            macs = multiply_adds(model, px)
            shown = f"{macs / 1e9:.2f} x 10^9" if macs >= 1e9 else f"{macs / 1e6:.0f} x 10^6"
            rows.append((name, f"{parameters(model) / 1e6:.2f}M", shown, f"{px} px"))
    print_table(rows)
