"""Torch student -> ONNX FP32 (opset 17, dynamic batch, normalisation in the graph) and FP16.

Uses torch's TorchScript-based exporter (`dynamo=False`): it needs no onnxscript, exports these
CNNs in about a second (the dynamo exporter takes several times longer) and names the aten
operator it cannot translate, which `unexportable_message` turns into one sentence.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dgkit.atomic import write_atomic
from dgkit.errors import DgkitError
from dgkit.export.formats import OPSET
from dgkit.model_meta import INPUT_NAME, OUTPUT_NAME, ModelMeta
from dgkit.preprocess import to_model_input
from dgkit.records import RunConfig
from dgkit.rundir import RunDir

if TYPE_CHECKING:
    import onnx
    import torch

PARITY_IMAGES = 64
PARITY_MAX_ABS = 1e-4
# FP32 rounding grows with the logits' size: heads that multiply cosines by 100 (RISE, VL2V)
# get 1e-5 of their largest logit, never less than PARITY_MAX_ABS.
PARITY_MAX_REL = 1e-5


def run_id(run: RunDir) -> str:
    """The run folder's name and the first 8 hex digits of its weights' SHA-256."""
    digest = hashlib.sha256(run.student.read_bytes()).hexdigest()[:8]
    return f"{run.path.name}-{digest}"


def model_meta(run: RunDir, config: RunConfig, precision: str) -> ModelMeta:
    return ModelMeta(
        classes=list(config.classes),
        prompt_names=list(config.prompt_names or config.classes),
        preprocess=config.preprocess,
        precision=precision,
        run_id=run_id(run),
        student=config.student,
        method=config.method,
        target_domains=tuple(config.target_domains),
    )


def unexportable_message(student: str, exc: BaseException) -> str:
    text = str(exc)
    op = re.search(r"operator '([\w:.]+)'", text) or re.search(r"\b(aten::\w+)", text)
    if op:
        return (f"the student '{student}' cannot be exported to ONNX: its operator {op.group(1)} "
                f"has no ONNX translation at opset {OPSET}; replace that layer and train again")
    first = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
    return f"the student '{student}' cannot be exported to ONNX ({first})"


def set_metadata(model: onnx.ModelProto, meta: ModelMeta) -> None:
    """Replace the model's metadata_props with exactly ModelMeta's."""
    del model.metadata_props[:]
    for key, value in meta.to_props().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    import onnx

    write_atomic(path, lambda tmp: onnx.save_model(model, str(tmp)))


def to_onnx(student: torch.nn.Module, meta: ModelMeta, example: np.ndarray) -> onnx.ModelProto:
    """Export and check the FP32 graph; `example` is N x S x S x 3 uint8 (N >= 1)."""
    import onnx
    import torch

    x = torch.from_numpy(to_model_input(example[:2]))
    with tempfile.TemporaryDirectory(prefix="dgkit-export-") as tmp:
        raw = Path(tmp) / "model.onnx"
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    student, (x,), str(raw), dynamo=False, opset_version=OPSET,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    do_constant_folding=True,
                )
        except Exception as exc:  # UnsupportedOperatorError, SymbolicValueError, ...
            raise DgkitError(unexportable_message(meta.student, exc)) from exc
        model = onnx.load(str(raw))
    model.producer_name = "dgkit"
    set_metadata(model, meta)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise DgkitError(f"the exported ONNX graph fails onnx.checker "
                         f"({str(exc).splitlines()[0]})") from exc
    return model


def torch_logits(student: torch.nn.Module, pixels: np.ndarray, batch: int = 64) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch):
            out.append(student(torch.from_numpy(to_model_input(pixels[i:i + batch]))).numpy())
    return np.concatenate(out).astype(np.float32)


def parity_rows(n: int, count: int = PARITY_IMAGES) -> np.ndarray:
    """`count` rows spread evenly over `n` images."""
    return np.unique(np.linspace(0, n - 1, min(n, count)).round().astype(np.int64))


def check_parity(model_path: Path, reference: np.ndarray, pixels: np.ndarray) -> float:
    """ONNX FP32 (run as serve runs it) against torch: max |logit diff| within the parity limit
    and the same top-1 on every image. Returns the max difference."""
    from dgkit.serve.predictor import Predictor

    logits = Predictor(model_path, backend="ort-cpu").run_batch(to_model_input(pixels))
    diff = float(np.abs(logits - reference).max())
    limit = max(PARITY_MAX_ABS, PARITY_MAX_REL * float(np.abs(reference).max()))
    same = int((logits.argmax(1) == reference.argmax(1)).sum())
    if diff > limit or same != len(pixels):
        raise DgkitError(f"the ONNX export of this student does not match torch on {len(pixels)} "
                         f"images (max |logit difference| {diff:.2e}, limit {limit:.1e}; "
                         f"same top-1 on {same}/{len(pixels)})")
    return diff


def to_fp16(model: onnx.ModelProto, meta: ModelMeta) -> onnx.ModelProto:
    """FP16 weights and compute; FP32 input and output (onnxconverter-common, keep_io_types)."""
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns for every weight it clamps to fp16's range
        half = float16.convert_float_to_float16(model, keep_io_types=True)
    set_metadata(half, meta)
    return half
