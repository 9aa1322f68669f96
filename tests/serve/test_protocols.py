"""The wire formats of the Open Inference Protocol (JSON and the binary tensor extension, the
classification extension) and of MLflow's scoring protocol, parsed and written without a server:
what tritonclient sends is read back exactly, and every malformed request is refused with its
status and a message that names the problem."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.http._utils import _get_inference_request

from pipeline.serve.protocols import (
    HEADER_LENGTH,
    Limits,
    ProtocolError,
    infer_response,
    parse_infer,
    parse_invocations,
)

LIMITS = Limits(crop_px=8, max_items=16, max_image_bytes=1000)
CLASSES = [("n0", "cat"), ("n1", "dog"), ("n2", "fox")]


def _tritonclient_body(inputs, outputs=None) -> tuple[bytes, str | None]:
    """The body and header length that tritonclient.http's `infer` sends for these tensors."""
    body, length = _get_inference_request(
        inputs=inputs, request_id="r1", outputs=outputs, sequence_id=0, sequence_start=False,
        sequence_end=False, priority=0, timeout=None, custom_parameters=None,
    )  # fmt: skip
    return body, None if length is None else str(length)


def test_what_tritonclient_sends_in_binary_is_read_exactly() -> None:
    images = np.array([b"\xff\xd8first", b"second-image", b""], dtype=np.object_)
    named = triton.InferInput("image", [3], "BYTES")
    named.set_data_from_numpy(images)  # binary by default
    body, length = _tritonclient_body([named])
    assert length is not None  # the binary extension, as tritonclient's default
    request = parse_infer(body, length, LIMITS)
    assert request.images == [b"\xff\xd8first", b"second-image", b""] and request.id == "r1"
    assert request.binary_outputs  # tritonclient asks for binary outputs when it names none

    tensor = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    named = triton.InferInput("input", list(tensor.shape), "FP32")
    named.set_data_from_numpy(tensor)
    wanted = triton.InferRequestedOutput("probabilities", binary_data=False, class_count=2)
    request = parse_infer(*_tritonclient_body([named], [wanted]), LIMITS)
    assert np.array_equal(request.tensor, tensor) and request.class_count == 2 and not request.binary_outputs

    named = triton.InferInput("input", list(tensor.shape), "FP32")
    named.set_data_from_numpy(tensor, binary_data=False)  # JSON data
    body, length = _tritonclient_body([named])
    assert length is None and np.allclose(parse_infer(body, None, LIMITS).tensor, tensor)


def test_responses_are_what_tritonclient_reads_back() -> None:
    probabilities = np.array([[0.2, 0.7, 0.1], [0.5, 0.1, 0.4]], dtype=np.float32)
    for binary in (True, False):
        named = triton.InferInput("input", [2, 3, 8, 8], "FP32")
        named.set_data_from_numpy(np.zeros((2, 3, 8, 8), np.float32))
        request = parse_infer(
            *_tritonclient_body([named], [triton.InferRequestedOutput("probabilities", binary)]), LIMITS
        )
        body, headers = infer_response(request, probabilities, CLASSES, "m", "3")
        length = headers.get(HEADER_LENGTH)
        result = triton.InferResult.from_response_body(body, header_length=int(length) if length else None)
        assert np.array_equal(result.as_numpy("probabilities"), probabilities)
        assert result.get_response()["model_version"] == "3" and result.get_response()["id"] == "r1"

        wanted = triton.InferRequestedOutput("probabilities", binary, class_count=2)
        request = parse_infer(*_tritonclient_body([named], [wanted]), LIMITS)
        body, headers = infer_response(request, probabilities, CLASSES, "m", "3")
        length = headers.get(HEADER_LENGTH)
        top = triton.InferResult.from_response_body(body, header_length=int(length) if length else None)
        rows = [
            [s.decode() if isinstance(s, bytes) else s for s in row] for row in top.as_numpy("probabilities")
        ]
        assert rows == [["0.700000:1:dog", "0.200000:0:cat"], ["0.500000:0:cat", "0.400000:2:fox"]]


def _binary(header: dict, payload: bytes, length: int | None = None) -> tuple[bytes, str]:
    text = json.dumps(header).encode()
    return text + payload, str(len(text) if length is None else length)


def _element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def _json(name: str, datatype: str, shape: list[int], data=None, **request) -> tuple[bytes, None]:
    return json.dumps(
        {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]} | request
    ).encode(), None


def _sized(name: str, datatype: str, shape: list[int], size: int, payload: bytes) -> tuple[bytes, str]:
    return _binary(
        {
            "inputs": [
                {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}
            ]
        },
        payload,
    )


ZEROS = [0.0] * 191


@pytest.mark.parametrize(
    "body, length, status, words",
    [
        (b"{not json", None, 400, "not JSON"),
        (json.dumps({"inputs": []}).encode(), None, 400, "exactly one input"),
        (*_json("input", "FP16", [1, 3, 8, 8], [0.0, *ZEROS]), 400, "datatype FP32"),
        (*_json("input", "FP32", [1, 3, 4, 4], [0.0] * 48), 400, "shape [N, 3, 8, 8]"),
        (*_json("input", "FP32", [1, 3, 8, 8], ZEROS), 400, "holds 191"),
        (*_json("input", "FP32", [1, 3, 8, 8], [float("nan"), *ZEROS]), 400, "NaN or Inf"),
        (*_json("input", "FP32", [1, 3, 8, 8], [1e39, *ZEROS]), 400, "NaN or Inf"),
        (*_json("image", "BYTES", [0], []), 400, "no image"),
        (*_json("image", "BYTES", [10000], []), 413, "over the limit of 16"),
        (*_json("image", "BYTES", [1], ["%%%"]), 400, "base64"),
        (*_json("pixels", "FP32", [1], [0]), 400, "unknown input 'pixels'"),
        (*_json("image", "BYTES", [1], ["AA=="], outputs=[{"name": "logits"}]), 400, "output 'logits'"),
        (*_sized("image", "BYTES", [1], 50, _element(b"abc")), 400, "binary_data_size is 50"),
        (*_sized("image", "BYTES", [1], 5, _element(b"abc") + b"extra"), 400, "binary_data_size says 5"),
        (*_sized("image", "BYTES", [1], 7, struct.pack("<I", 99) + b"abc"), 400, "past the end"),
        (*_sized("image", "BYTES", [2], 7, _element(b"abc")), 400, "says 2 images"),
        (*_sized("image", "BYTES", [1], 1005, _element(b"x" * 1001)), 413, "over the limit of 1000"),
        (*_sized("input", "FP32", [1, 3, 8, 8], 12, b"\0" * 12), 400, "is 768 bytes"),
        (b'{"inputs": []}', "9999", 400, "has only 14 bytes"),
        (b'{"inputs": []}', "ten", 400, "not a byte count"),
    ],
)  # fmt: skip
def test_a_malformed_inference_request_is_refused_by_name(
    body: bytes, length, status: int, words: str
) -> None:
    with pytest.raises(ProtocolError) as refused:
        parse_infer(body, length, LIMITS)
    assert refused.value.status == status and words in str(refused.value), str(refused.value)


def test_mlflow_scoring_requests_in_each_form_give_the_same_images() -> None:
    images = [b"\x89PNG one", b"\x89PNG two"]
    encoded = [base64.b64encode(i).decode() for i in images]
    forms = [
        {"dataframe_split": {"index": [0, 1], "columns": ["image"], "data": [[e] for e in encoded]}},
        {"dataframe_records": [{"image": e} for e in encoded]},
        {"instances": [{"image": e} for e in encoded]},
        {"instances": encoded},
        {"inputs": {"image": encoded}},
        {"inputs": encoded},
    ]
    for form in forms:
        assert parse_invocations(json.dumps(form).encode(), LIMITS) == (images, None), form
    tensor = np.ones((2, 3, 8, 8), np.float32)
    got_images, got = parse_invocations(json.dumps({"inputs": tensor.tolist()}).encode(), LIMITS)
    assert got_images is None and np.array_equal(got, tensor)


@pytest.mark.parametrize(
    "form, status, words",
    [
        ({"inputs": [], "instances": []}, 400, "exactly one of"),
        ({"dataframe_split": {"columns": ["pixels"], "data": [["x"]]}}, 400, "column 'image'"),
        ({"inputs": []}, 400, "no image"),
        ({"inputs": ["AA=="] * 10000}, 413, "over the limit"),
        ({"inputs": [[[[0.0] * 4] * 4] * 3]}, 400, "shape [N, 3, 8, 8]"),
        ({"inputs": {"pixels": ["AA=="]}}, 400, "one input is 'image'"),
        ({"instances": ["not base64!"]}, 400, "base64"),
    ],
)  # fmt: skip
def test_a_malformed_scoring_request_is_refused_by_name(form: dict, status: int, words: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        parse_invocations(json.dumps(form).encode(), LIMITS)
    assert refused.value.status == status and words in str(refused.value), str(refused.value)
