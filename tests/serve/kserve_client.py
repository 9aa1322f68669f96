"""Asks a deployment for class probabilities through KServe's own REST client (`kserve`'s
`InferenceRESTClient`, the Open Inference Protocol), as a KServe user's code does. It runs in a
virtual environment of its own (`make` builds .venv-kserve): kserve pins psutil and pandas below
what Ray and MLflow need, so it cannot share the project's.

    .venv-kserve/bin/python tests/serve/kserve_client.py URL MODEL TENSORS.npy IMAGE...

Prints one JSON object: for the FP32 input "input" (N x 3 x H x W, preprocessed) sent in the
binary tensor extension and in JSON, and for the BYTES input "image" (the encoded images), the
probabilities' rows. A bearer token, where the deployment needs one, comes from
RESNET_PIPE_SERVE_TOKEN."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def ask(url: str, model: str, tensors: np.ndarray, images: list[bytes]) -> dict:
    token = os.environ.get("RESNET_PIPE_SERVE_TOKEN")
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
    answers = {}
    for name, binary in (("tensor_binary", True), ("tensor_json", False)):
        tensor = InferInput("input", list(tensors.shape), "FP32")
        tensor.set_data_from_numpy(tensors, binary_data=binary)
        # a dict of its own each call: the client writes a binary request's header length into it
        answer = await client.infer(url, InferRequest(model, [tensor]), model_name=model, headers=dict(auth))
        answers[name] = answer.get_output_by_name("probabilities").as_numpy().tolist()
    encoded = InferInput("image", [len(images)], "BYTES")
    encoded.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    answer = await client.infer(url, InferRequest(model, [encoded]), model_name=model, headers=dict(auth))
    answers["image_binary"] = answer.get_output_by_name("probabilities").as_numpy().tolist()
    await client.close()
    return answers


def main() -> None:
    url, model, tensors, *files = sys.argv[1:]
    images = [open(path, "rb").read() for path in files]
    print(json.dumps(asyncio.run(ask(url, model, np.load(tensors), images))))


if __name__ == "__main__":
    main()
