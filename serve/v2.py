"""Open Inference Protocol v2 (the KServe / Triton REST protocol): the model's metadata, and
the parsing of infer requests and the writing of their answers. The endpoints are in app.py.

An infer request carries one input: either the model's own `image` (FP32 [N, 3, H, W], RGB in
[0, 1], already preprocessed) or `image_bytes` (BYTES [N], encoded image files, which the server
decodes with the model's preprocessing). Tensors come as JSON `data` or, with the binary tensor
extension that tritonclient uses by default, as raw bytes after a JSON header whose length the
`Inference-Header-Content-Length` header gives. Outputs come back the same way: as JSON, or as
raw bytes after the JSON for those asked for with `binary_data` (or, for all, with the request's
`binary_data_output`).
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dgkit.model_meta import INPUT_NAME, OUTPUT_NAME

BYTES_INPUT = "image_bytes"
HEADER_LENGTH = "inference-header-content-length"
PLATFORM = "onnxruntime_onnx"
VERSION = "1"
EXTENSIONS = ["classification", "binary_tensor_data"]


class TensorError(ValueError):
    """A malformed infer request: its message is the 400's reason."""


@dataclass
class InferRequest:
    id: str | None
    input_name: str
    tensor: np.ndarray | None = None  # FP32 [N, 3, H, W] for `image`
    files: list[bytes] = field(default_factory=list)  # for `image_bytes`
    # Requested outputs: name -> classes to report (the classification extension), or None
    # for the tensor itself.
    outputs: dict[str, int | None] = field(default_factory=dict)
    binary: set[str] = field(default_factory=set)  # the outputs to send as raw bytes

    @property
    def count(self) -> int:
        return len(self.files) if self.tensor is None else len(self.tensor)


def model_metadata(name: str, input_size: int, num_classes: int) -> dict[str, Any]:
    """`GET /v2/models/{name}`; -1 marks the batch dimension. A request sends one of the two
    inputs."""
    return {"name": name, "versions": [VERSION], "platform": PLATFORM,
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32",
                        "shape": [-1, 3, input_size, input_size]},
                       {"name": BYTES_INPUT, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, num_classes]}]}


def parse_infer_request(body: bytes, header_length: str | None, input_size: int,
                        max_images: int) -> InferRequest:
    """The request's one input, checked against the model; TensorError says what is wrong."""
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise TensorError(f"Inference-Header-Content-Length {header_length!r} is not a "
                              f"length within the {len(body)}-byte body")
        body, binary = body[:int(header_length)], body[int(header_length):]
    try:
        head = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorError(f"the request body is not JSON: {exc}") from exc
    if not isinstance(head, dict):
        raise TensorError("the request body must be a JSON object with 'inputs'")
    inputs = head.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise TensorError(f"send exactly one input, '{INPUT_NAME}' (FP32 [N, 3, {input_size}, "
                          f"{input_size}]) or '{BYTES_INPUT}' (BYTES [N], encoded images)")
    spec = inputs[0]
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if not (isinstance(shape, list) and shape
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise TensorError(f"input '{name}' needs a shape of non-negative integers, not {shape!r}")
    raw = _binary_part(spec, binary)
    request = InferRequest(id=head.get("id"), input_name=str(name))
    _requested_outputs(head, request)
    if name == INPUT_NAME:
        want = [3, input_size, input_size]
        if datatype != "FP32" or len(shape) != 4 or shape[1:] != want:
            raise TensorError(f"input '{INPUT_NAME}' must be FP32 [N, {', '.join(map(str, want))}]"
                              f", not {datatype} {shape}")
        request.tensor = _fp32(spec, raw, shape)
    elif name == BYTES_INPUT:
        if datatype != "BYTES" or len(shape) != 1:
            raise TensorError(f"input '{BYTES_INPUT}' must be BYTES [N], not {datatype} {shape}")
        request.files = _bytes(spec, raw, shape[0])
    else:
        raise TensorError(f"unknown input {name!r}; this model takes '{INPUT_NAME}' or "
                          f"'{BYTES_INPUT}'")
    if not 1 <= request.count <= max_images:
        raise TensorError(f"send 1 to {max_images} images per request, not {request.count}")
    return request


def _binary_part(spec: dict[str, Any], binary: bytes) -> bytes | None:
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or size != len(binary):
        raise TensorError(f"binary_data_size {size!r} does not match the {len(binary)} bytes "
                          "after the JSON header")
    return binary


def _fp32(spec: dict[str, Any], raw: bytes | None, shape: list[int]) -> np.ndarray:
    count = int(np.prod(shape))
    if raw is not None:
        if len(raw) != 4 * count:
            raise TensorError(f"FP32 {shape} takes {4 * count} bytes, not {len(raw)}")
        return np.frombuffer(raw, "<f4").reshape(shape).astype(np.float32)
    try:
        data = np.asarray(spec.get("data"), dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise TensorError(f"input data is not a list of numbers: {exc}") from exc
    if data.size != count:
        raise TensorError(f"input data has {data.size} values; shape {shape} takes {count}")
    if not np.isfinite(data).all():
        raise TensorError("input data has NaN or infinite values")
    return data.reshape(shape)


def _bytes(spec: dict[str, Any], raw: bytes | None, count: int) -> list[bytes]:
    """Binary: each element a 4-byte little-endian length and its bytes. JSON: base64 strings,
    since encoded images are not text."""
    if raw is None:
        data = spec.get("data")
        if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
            raise TensorError("BYTES data in JSON must be a list of base64 strings")
        try:
            files = [base64.b64decode(d, validate=True) for d in data]
        except binascii.Error as exc:
            raise TensorError(f"BYTES data is not base64: {exc}") from exc
    else:
        files, at = [], 0
        while at < len(raw):
            if at + 4 > len(raw):
                raise TensorError("BYTES binary data ends inside an element's length")
            (n,) = struct.unpack_from("<I", raw, at)
            if at + 4 + n > len(raw):
                raise TensorError("BYTES binary data is shorter than its elements' lengths")
            files.append(raw[at + 4:at + 4 + n])
            at += 4 + n
    if len(files) != count:
        raise TensorError(f"input has {len(files)} elements; its shape says {count}")
    return files


def _requested_outputs(head: dict[str, Any], request: InferRequest) -> None:
    outputs = head.get("outputs", [{"name": OUTPUT_NAME}])
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise TensorError("'outputs' must be a list of objects")
    all_binary = bool((head.get("parameters") or {}).get("binary_data_output", False))
    for out in outputs:
        if out.get("name") != OUTPUT_NAME:
            raise TensorError(f"unknown output {out.get('name')!r}; this model has "
                              f"'{OUTPUT_NAME}'")
        params = out.get("parameters") or {}
        k = params.get("classification")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise TensorError(f"classification must be a positive integer, not {k!r}")
        request.outputs[OUTPUT_NAME] = k
        if params.get("binary_data", all_binary):
            request.binary.add(OUTPUT_NAME)


def infer_response(model: str, request: InferRequest, logits: np.ndarray,
                   classes: list[str]) -> tuple[bytes, int | None]:
    """The answer's body and, when it carries binary outputs, the length of its JSON part.

    Logits are FP32 [N, C]; with `classification` k, as Triton writes it, BYTES [N, k] of
    "value:index:label", highest first, the value being the logit."""
    outputs, blobs = [], []
    for name, k in request.outputs.items():
        if k is None:
            out = {"name": name, "datatype": "FP32", "shape": list(logits.shape)}
            values: list[Any] = logits.astype(np.float32).ravel().tolist()
            blob = logits.astype("<f4").tobytes()
        else:
            k = min(k, logits.shape[1])
            order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
            out = {"name": name, "datatype": "BYTES", "shape": [len(logits), k]}
            values = [f"{logits[n, i]:f}:{i}:{classes[i]}"
                      for n, row in enumerate(order) for i in row]
            blob = b"".join(struct.pack("<I", len(v)) + v.encode() for v in values)
        if name in request.binary:
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = values
        outputs.append(out)
    answer: dict[str, Any] = {"model_name": model, "model_version": VERSION, "outputs": outputs}
    if request.id is not None:
        answer["id"] = request.id
    head = json.dumps(answer).encode()
    return head + b"".join(blobs), len(head) if blobs else None
