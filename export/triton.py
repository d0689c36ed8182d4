"""A Triton Inference Server model repository from a dgkit ONNX artifact (FP32, FP16 or INT8):

    REPO/NAME/config.pbtxt    onnxruntime backend, dynamic batching, names, types and dims
    REPO/NAME/labels.txt      the classes, one a line, for Triton's classification extension
    REPO/NAME/1/model.onnx    the artifact

Torch-free: the input and output are read from the graph with onnxruntime, the classes from the
model's dgkit metadata. config.pbtxt is written as protobuf text, which Triton parses with its
ModelConfig message (the tests parse it the same way).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from dgkit.errors import DgkitError

LABELS = "labels.txt"
# ONNX tensor types -> Triton's DataType names.
DATATYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16",
             "tensor(uint8)": "TYPE_UINT8", "tensor(int8)": "TYPE_INT8",
             "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32"}


def write_repository(model: Path, repo: Path, name: str = "dgkit", max_batch: int = 32,
                     max_delay_us: int = 2000) -> Path:
    """Write REPO/NAME for `model` (replacing an earlier one) and return that folder."""
    import onnxruntime as ort

    from dgkit.model_meta import ModelMeta

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise DgkitError(f"Triton model name {name!r} must be letters, digits, '_', '.' or '-'")
    if max_batch < 1 or max_delay_us < 0:
        raise DgkitError(f"max_batch ({max_batch}) must be at least 1 and max_delay_us "
                         f"({max_delay_us}) at least 0")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    meta = ModelMeta.from_props(dict(session.get_modelmeta().custom_metadata_map),
                                source=str(model))
    tensors = [_tensor(t, str(model)) for t in (*session.get_inputs(), *session.get_outputs())]
    (inp, in_type, in_dims), (out, out_type, out_dims) = tensors[0], tensors[-1]
    if len(tensors) != 2 or out_dims != [len(meta.classes)]:
        raise DgkitError(f"{model} should have one input and one output of its "
                         f"{len(meta.classes)} classes, not {[t[0] for t in tensors]}")
    folder = repo / name
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "1").mkdir(parents=True)
    shutil.copyfile(model, folder / "1" / "model.onnx")
    (folder / LABELS).write_text("".join(f"{c}\n" for c in meta.classes))
    (folder / "config.pbtxt").write_text(f"""\
name: {json.dumps(name)}
backend: "onnxruntime"
max_batch_size: {max_batch}
input [
  {{
    name: {json.dumps(inp)}
    data_type: {in_type}
    dims: {in_dims}
  }}
]
output [
  {{
    name: {json.dumps(out)}
    data_type: {out_type}
    dims: {out_dims}
    label_filename: "{LABELS}"
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {max_delay_us}
}}
""")
    return folder


def _tensor(node: object, source: str) -> tuple[str, str, list[int]]:
    """Name, Triton type and dims without the batch dimension (which must be dynamic)."""
    name, kind, shape = node.name, node.type, node.shape  # type: ignore[attr-defined]
    if kind not in DATATYPES:
        raise DgkitError(f"{source}: {name} is {kind}, which has no Triton type here")
    if not shape or isinstance(shape[0], int) or not all(isinstance(d, int) for d in shape[1:]):
        raise DgkitError(f"{source}: {name} has shape {shape}; Triton's batching needs a "
                         "dynamic first dimension and fixed others")
    return name, DATATYPES[kind], list(shape[1:])
