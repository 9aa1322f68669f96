"""The wire formats a deployment speaks beside its own routes: the Open Inference Protocol (KServe
v2, as Triton serves it: JSON tensors, the binary tensor extension and the classification
extension) and MLflow's scoring protocol (`POST /invocations`). Parsing and encoding only: the
Serve app (deploy/serve_app.py) runs the model.

    request = parse_infer(body, headers.get("inference-header-content-length"), limits)
    request.images or request.tensor                 # encoded images, or N x 3 x H x W float32
    body, headers = infer_response(request, probabilities, classes, "resnet50", "3")
    images, tensor = parse_invocations(body, limits)  # {"inputs": ...}, {"dataframe_split": ...}, ...

Every malformed request raises `ProtocolError` with the HTTP status and a message naming the
problem; nothing here trusts a declared size before checking it against the body.

References: the Open Inference Protocol's REST spec (kserve/open-inference-protocol), Triton's
binary tensor data extension (`Inference-Header-Content-Length`; BYTES elements as a 4-byte
little-endian length and the bytes) and classification extension ("value:index:label" strings),
and MLflow's scoring server's accepted JSON (`dataframe_split`, `dataframe_records`,
`instances`, `inputs`).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
TENSOR_INPUT = "input"  # FP32 [N, 3, H, W], preprocessed as the model's evaluation transform
IMAGE_INPUT = "image"  # BYTES [N] (or [N, 1]): encoded images, preprocessed by the server
OUTPUT = "probabilities"  # FP32 [N, classes]; with "classification": BYTES [N, k]
EXTENSIONS = ["binary_tensor_data", "classification"]


class ProtocolError(Exception):
    """A request the protocol refuses: its HTTP status and what is wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(status, message)
        self.status, self.message = status, message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Limits:
    crop_px: int  # the model's input: N x 3 x crop_px x crop_px
    max_items: int  # images or tensor rows in one request
    max_image_bytes: int


@dataclass
class InferRequest:
    id: str | None
    images: list[bytes] | None = None
    tensor: np.ndarray | None = None  # N x 3 x H x W float32
    binary_outputs: bool = False  # the response's tensors in the binary extension
    class_count: int = 0  # > 0: the classification extension's top-k strings
    outputs: list[str] = field(default_factory=lambda: [OUTPUT])

    @property
    def count(self) -> int:
        return len(self.images) if self.images is not None else len(self.tensor)


# ---- the Open Inference Protocol ---------------------------------------------------------------


def model_metadata(name: str, version: str, platform: str, crop_px: int, classes: int) -> dict:
    return {
        "name": name,
        "versions": [version],
        "platform": platform,
        "inputs": [
            {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, 3, crop_px, crop_px]},
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, classes]}],
    }


def parse_infer(body: bytes, header_length: str | None, limits: Limits) -> InferRequest:
    """An inference request: JSON alone, or (with `header_length`, the binary extension) the JSON
    header followed by each binary input's bytes, in input order."""
    json_part, binary = body, b""
    if header_length is not None:
        if not header_length.strip().isdigit():
            raise ProtocolError(400, f"{HEADER_LENGTH} '{header_length}' is not a byte count")
        length = int(header_length)
        if length > len(body):
            raise ProtocolError(
                400, f"{HEADER_LENGTH} is {length} but the body has only {len(body)} bytes"
            )  # fmt: skip
        json_part, binary = body[:length], body[length:]
    try:
        header = json.loads(json_part)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(400, f"the request is not JSON: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise ProtocolError(400, "the request needs 'inputs': a list with one input tensor")
    inputs = header["inputs"]
    if len(inputs) != 1:
        raise ProtocolError(
            400, f"give exactly one input ('{TENSOR_INPUT}' FP32 or '{IMAGE_INPUT}' BYTES), got {len(inputs)}"
        )  # fmt: skip
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise ProtocolError(400, "each input is an object with name, datatype, shape and data")
    data, size = _input_data(tensor, binary)
    if size != len(binary):
        raise ProtocolError(
            400, f"the binary part has {len(binary)} bytes, but binary_data_size says {size}"
        )  # fmt: skip
    request = InferRequest(id=header.get("id"))
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), _shape(tensor.get("shape"))
    if name == IMAGE_INPUT:
        if datatype != "BYTES":
            raise ProtocolError(
                400, f"input '{IMAGE_INPUT}' has datatype BYTES (encoded images), not {datatype}"
            )
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise ProtocolError(400, f"input '{IMAGE_INPUT}' has shape [N] or [N, 1], not {shape}")
        request.images = _bytes_elements(data, shape[0], limits)
    elif name == TENSOR_INPUT:
        if datatype != "FP32":
            raise ProtocolError(400, f"input '{TENSOR_INPUT}' has datatype FP32, not {datatype}")
        expected = [3, limits.crop_px, limits.crop_px]
        if len(shape) != 4 or shape[1:] != expected:
            raise ProtocolError(
                400, f"input '{TENSOR_INPUT}' has shape [N, {', '.join(map(str, expected))}], not {shape}"
            )
        _check_count(shape[0], limits)
        request.tensor = _fp32_elements(data, shape)
    else:
        raise ProtocolError(
            400, f"unknown input '{name}': the model takes '{TENSOR_INPUT}' (FP32) or '{IMAGE_INPUT}' (BYTES)"
        )
    _check_count(request.count, limits)
    _outputs(header, request)
    return request


def _shape(shape) -> list[int]:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ProtocolError(400, f"shape must be a list of non-negative integers, got {shape!r}")
    return shape


def _input_data(tensor: dict, binary: bytes) -> tuple[object, int]:
    """The input's data: its bytes from the binary part (and how many it took), or its JSON data."""
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(400, "an input's parameters must be an object")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in tensor:
            raise ProtocolError(400, f"input '{tensor.get('name')}' has neither data nor binary_data_size")
        return tensor["data"], 0
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ProtocolError(400, f"binary_data_size must be a byte count, got {size!r}")
    if size > len(binary):
        raise ProtocolError(
            400, f"binary_data_size is {size} but only {len(binary)} binary bytes follow the header"
        )
    return binary[:size], size


def _check_count(count: int, limits: Limits) -> None:
    if count == 0:
        raise ProtocolError(400, "the request holds no image: send at least one")
    if count > limits.max_items:
        raise ProtocolError(
            413, f"{count} items in one request is over the limit of {limits.max_items}: split it"
        )


def _bytes_elements(data, count: int, limits: Limits) -> list[bytes]:
    """BYTES elements: from the binary extension (each a 4-byte little-endian length, then its
    bytes), or from JSON (base64 strings: an encoded image is not text)."""
    _check_count(count, limits)
    if isinstance(data, bytes):
        elements, at = [], 0
        while at < len(data):
            if at + 4 > len(data):
                raise ProtocolError(400, "a BYTES element's 4-byte length is cut off")
            (length,) = struct.unpack_from("<I", data, at)
            at += 4
            if at + length > len(data):
                raise ProtocolError(400, f"a BYTES element says {length} bytes, past the end of its input")
            if length > limits.max_image_bytes:
                raise ProtocolError(
                    413, f"an image of {length} bytes is over the limit of {limits.max_image_bytes}"
                )
            elements.append(data[at : at + length])
            at += length
    else:
        if not isinstance(data, list):
            raise ProtocolError(400, "BYTES data in JSON is a list of base64 strings")
        flat = [x[0] if isinstance(x, list) and len(x) == 1 else x for x in data]
        if not all(isinstance(x, str) for x in flat):
            raise ProtocolError(
                400, "BYTES data in JSON is a list of base64 strings (one encoded image each)"
            )
        elements = [_b64(x) for x in flat]
    if len(elements) != count:
        raise ProtocolError(400, f"the shape says {count} images but the data holds {len(elements)}")
    return elements


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(400, "an image in JSON must be base64: this one is not") from None


def _fp32_elements(data, shape: list[int]) -> np.ndarray:
    expected = math.prod(shape)
    if isinstance(data, bytes):
        if len(data) != expected * 4:
            raise ProtocolError(
                400, f"FP32 {shape} is {expected * 4} bytes, but binary_data_size gives {len(data)}"
            )  # fmt: skip
        array = np.frombuffer(data, dtype="<f4")
    else:
        try:
            array = _finite_fp32(data)
        except (ValueError, TypeError):
            raise ProtocolError(
                400, "FP32 data must be numbers (a flat list, or nested to the shape)"
            ) from None
        if array.size != expected:
            raise ProtocolError(400, f"FP32 {shape} has {expected} elements, but the data holds {array.size}")
    if not np.isfinite(array).all():
        raise ProtocolError(400, "the tensor holds NaN or Inf: send finite values")
    return array.reshape(shape).astype(np.float32, copy=True)


def _finite_fp32(values) -> np.ndarray:
    """JSON numbers as float32; one past float32's range becomes Inf (refused by the caller)."""
    wide = np.asarray(values, dtype=np.float64)
    return np.where(np.abs(wide) > np.finfo(np.float32).max, np.inf, wide).astype(np.float32)


def _outputs(header: dict, request: InferRequest) -> None:
    parameters = header.get("parameters") or {}
    request.binary_outputs = bool(isinstance(parameters, dict) and parameters.get("binary_data_output"))
    wanted = header.get("outputs")
    if wanted is None:
        return
    if not isinstance(wanted, list) or not wanted:
        raise ProtocolError(400, f"'outputs' is a list of requested outputs ('{OUTPUT}')")
    for output in wanted:
        if not isinstance(output, dict) or output.get("name") != OUTPUT:
            name = output.get("name") if isinstance(output, dict) else output
            raise ProtocolError(400, f"unknown output '{name}': the model gives '{OUTPUT}'")
        options = output.get("parameters") or {}
        request.binary_outputs = bool(options.get("binary_data", request.binary_outputs))
        count = options.get("classification", 0)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ProtocolError(400, f"classification must be a count of classes, got {count!r}")
        request.class_count = count


def infer_response(
    request: InferRequest, probabilities: np.ndarray, classes: list[tuple[str, str]], name: str, version: str
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: the probabilities (N x classes FP32), or with the
    classification extension the top `class_count` as "value:index:label" strings."""
    if request.class_count:
        k = min(request.class_count, probabilities.shape[1])
        top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        strings = [
            [f"{probabilities[row, i]:.6f}:{i}:{classes[i][1]}" for i in indices]
            for row, indices in enumerate(top)
        ]
        output = {"name": OUTPUT, "datatype": "BYTES", "shape": [len(strings), k]}
        raw = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for row in strings for s in row)
        data = [s for row in strings for s in row]
    else:
        output = {"name": OUTPUT, "datatype": "FP32", "shape": list(probabilities.shape)}
        raw = probabilities.astype("<f4").tobytes()
        data = probabilities.reshape(-1).tolist()
    response = {"model_name": name, "model_version": version, "outputs": [output]}
    if request.id is not None:
        response["id"] = request.id
    if not request.binary_outputs:
        output["data"] = data
        return json.dumps(response).encode(), {"content-type": "application/json"}
    output["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps(response).encode()
    return header + raw, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


# ---- MLflow's scoring protocol -------------------------------------------------------------------


def parse_invocations(body: bytes, limits: Limits) -> tuple[list[bytes] | None, np.ndarray | None]:
    """(encoded images, None) or (None, tensor) from the JSON that `mlflow models serve`
    takes: `dataframe_split` or `dataframe_records` with a column "image" of base64 strings (what
    MLflow's client sends for the registered model's binary column), `instances` or `inputs` as
    such a column, a list of base64 strings, or a tensor N x 3 x H x W."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(400, f"the request is not JSON: {e}") from None
    keys = ("dataframe_split", "dataframe_records", "instances", "inputs")
    given = [k for k in keys if isinstance(request, dict) and k in request]
    if len(given) != 1:
        raise ProtocolError(400, f"give exactly one of {', '.join(keys)} (MLflow's scoring protocol)")
    value = request[given[0]]
    if given[0] == "dataframe_split":
        if (
            not isinstance(value, dict)
            or not isinstance(value.get("columns"), list)
            or "image" not in value["columns"]
        ):
            raise ProtocolError(400, "dataframe_split needs a column 'image' of base64-encoded images")
        at = value["columns"].index("image")
        rows = value.get("data")
        if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) > at for r in rows):
            raise ProtocolError(400, "dataframe_split's data is a list of rows, each with the 'image' column")
        return _images([r[at] for r in rows], limits), None
    if given[0] == "dataframe_records" or (isinstance(value, list) and value and isinstance(value[0], dict)):
        if not isinstance(value, list) or not all(isinstance(r, dict) and "image" in r for r in value):
            raise ProtocolError(400, "records need an 'image' field each (a base64-encoded image)")
        return _images([r["image"] for r in value], limits), None
    if isinstance(value, dict):
        if set(value) != {"image"}:
            raise ProtocolError(400, f"the model's one input is 'image', not {sorted(value)}")
        value = value["image"]
    if isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        return _images(value, limits), None
    if not isinstance(value, list) or not value:
        raise ProtocolError(400, "the request holds no image: send at least one")
    try:
        array = _finite_fp32(value)
    except (ValueError, TypeError):
        raise ProtocolError(400, "inputs are base64 images or a tensor N x 3 x H x W of numbers") from None
    expected = (3, limits.crop_px, limits.crop_px)
    if array.ndim != 4 or array.shape[1:] != expected:
        raise ProtocolError(
            400, f"a tensor input has shape [N, {', '.join(map(str, expected))}], not {list(array.shape)}"
        )
    _check_count(len(array), limits)
    if not np.isfinite(array).all():
        raise ProtocolError(400, "the tensor holds NaN or Inf: send finite values")
    return None, array


def _images(values: list, limits: Limits) -> list[bytes]:
    _check_count(len(values), limits)
    if not all(isinstance(v, str) for v in values):
        raise ProtocolError(400, "each image is a base64 string")
    return [_b64(v) for v in values]
