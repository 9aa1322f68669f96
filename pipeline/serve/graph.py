"""A network as an ONNX graph, and where a registered version keeps its graphs: what both
`pipeline.serve.export` (which checks and logs them) and a replica (`pipeline.serve.inference`,
which runs them) need.

    graph = to_onnx(model, crop_px=224, properties=metadata(loaded, "fp32"))   # bytes
    uri = replica_graph(version.tags, "int8")   # runs:/RUN/onnx-int8/model.onnx, or None
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline.data.contract import contract

OPSET = 18  # ONNX Runtime 1.14 and later (2023) and every current runtime read it
URI_TAG = "onnx/{precision}"  # the version tag naming a graph: runs:/RUN/onnx-fp32


def metadata(loaded, precision: str) -> dict[str, str]:
    """What a runtime needs beside the graph: the preprocessing, with the mean image's values
    where the model subtracts one, and the classes."""
    preprocessing = contract(loaded.job.data)
    if loaded.mean_image is not None:
        preprocessing["mean_image"] = np.round(loaded.mean_image.astype(np.float64), 4).tolist()  # H x W x 3
    return {
        "resnet_pipe.model": f"{loaded.name}/{loaded.version}",
        "resnet_pipe.precision": precision,
        "resnet_pipe.preprocessing": json.dumps(preprocessing),
        "resnet_pipe.classes": json.dumps([list(c) for c in loaded.classes]),
    }


def to_onnx(model: torch.nn.Module, crop_px: int, properties: dict[str, str], opset: int = OPSET) -> bytes:
    """`model` (fp32, NCHW, eval mode) as an ONNX graph with a dynamic batch axis.

    TorchScript's exporter: the dynamo exporter gives the same graph but took 94 s for the
    1,202-layer CIFAR net where this one took 7 (2 cores); the dynamo one where it is gone."""
    import onnx

    example = torch.zeros(2, 3, crop_px, crop_px)
    with tempfile.TemporaryDirectory(prefix="resnet-pipe-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        names = {"input_names": ["input"], "output_names": ["logits"], "opset_version": opset}
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            try:
                torch.onnx.export(
                    model, (example,), path, dynamo=False,
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **names,
                )  # fmt: skip
            except (TypeError, RuntimeError):  # a torch without the TorchScript exporter
                batch = torch.export.Dim("batch")
                torch.onnx.export(
                    model, (example,), path, dynamo=True, external_data=False,
                    dynamic_shapes=({0: batch},), **names,
                )  # fmt: skip
        graph = onnx.load(path)
    graph.producer_name = "resnet-pipe"
    for key, value in properties.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph)
    return graph.SerializeToString()


def replica_graph(version_tags: dict, precision: str) -> str | None:
    """The artifact URI of the version's ONNX graph in `precision`, as a replica fetches it."""
    uri = version_tags.get(URI_TAG.format(precision=precision))
    return f"{uri}/model.onnx" if uri else None
