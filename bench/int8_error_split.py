"""Where the CPU INT8 model's disagreement with FP32 comes from: its weights or its activations.

For a run exported with `--int8`: runs `model.int8.onnx` exactly (its QDQ graph with
onnxruntime's graph optimisations off) in variants that keep one side of the quantization and
undo the other, on every validation set `dgkit validate` uses, and prints each variant's top-1
agreement with the FP32 ONNX model. Undoing the activations' quantization keeps their ranges
(each Q/DQ pair becomes a clip to the values it can represent), because `quantize_static` folds
ReLU and ReLU6 into the quantization that follows them. Prints a table and writes JSON.

    python bench/int8_error_split.py runs/pacs-sketch --json bench/results/int8_error_split.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dgkit.errors import DgkitError
from dgkit.export.exporter import require_export, run_context
from dgkit.export.quantize import pre_process
from dgkit.export.rounding import QUANTIZED_SUFFIX
from dgkit.export.validate import Logits, file_candidate
from dgkit.preprocess import to_model_input
from dgkit.provenance import provenance
from dgkit.rundir import RunDir

BATCH = 64


def float_initializers(fp32: Path) -> dict[str, np.ndarray]:
    """The FP32 initializers `quantize_static` started from (BatchNorm folded, names kept)."""
    import onnx
    from onnx import numpy_helper

    with tempfile.TemporaryDirectory(prefix="dgkit-split-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        pre_process(fp32, pre)
        return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(pre)).graph.initializer}


def round_per_channel(weight: np.ndarray, bits: int) -> np.ndarray:
    """`weight` rounded to symmetric `bits`-bit levels, one scale per output channel (axis 0)."""
    levels = 2 ** (bits - 1) - 1
    flat = weight.reshape(len(weight), -1)
    scale = np.abs(flat).max(1, keepdims=True) / levels
    scale[scale == 0] = 1  # an all-zero channel stays zero
    return (np.round(flat / scale) * scale).reshape(weight.shape).astype(np.float32)


def undo(model, activations: bool, weights: dict[str, np.ndarray] | None):
    """A copy of the QDQ `model` with the activations' rounding undone (each Q/DQ pair becomes a
    clip to its range) and/or every quantized initializer replaced by `weights[name]`."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    init = {i.name: i for i in graph.initializer}
    rename: dict[str, str] = {}
    nodes = []
    for node in graph.node:
        source = node.input[0]
        if node.op_type == "QuantizeLinear" and source not in init and activations:
            scale = float(numpy_helper.to_array(init[node.input[1]]))
            zero = numpy_helper.to_array(init[node.input[2]])
            info = np.iinfo(zero.dtype)
            bounds = [node.output[0] + "_low", node.output[0] + "_high"]
            for name, value in zip(bounds, (info.min, info.max), strict=True):
                graph.initializer.append(numpy_helper.from_array(
                    np.array(scale * (value - int(zero)), np.float32), name))
            nodes.append(helper.make_node("Clip", [source, *bounds], [node.output[0]]))
        elif node.op_type == "DequantizeLinear" and source in init and weights is not None:
            name = node.output[0] + "_float"
            graph.initializer.append(numpy_helper.from_array(
                weights[source.removesuffix(QUANTIZED_SUFFIX)].astype(np.float32), name))
            rename[node.output[0]] = name
        elif node.op_type == "DequantizeLinear" and activations and source not in init:
            rename[node.output[0]] = source  # the clip above already gave the range
        else:
            nodes.append(node)
    for node in nodes:
        node.input[:] = [rename.get(x, x) for x in node.input]
    for output in graph.output:
        output.name = rename.get(output.name, output.name)
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def exact(model) -> Logits:
    import onnxruntime as ort

    from dgkit.serve.backends import physical_cores

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = physical_cores()
    options.log_severity_level = 3  # one warning per unused scale otherwise
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, {session.get_inputs()[0].name: batch})[0]


def variants(export: Path) -> dict[str, Callable[[], Logits]]:
    """Each variant's name and how to build its runner (built one at a time: they are large)."""
    import onnx

    path = export / "model.int8.onnx"
    model = onnx.load(str(path))
    floats = float_initializers(export / "model.onnx")
    eight_bit = {k: round_per_channel(v, 8) if v.ndim > 1 else v for k, v in floats.items()}
    return {
        "int8, onnxruntime's fused kernels": lambda: file_candidate(path).run,
        "int8, exact": lambda: exact(model),
        "weights only": lambda: exact(undo(model, True, None)),
        "activations only": lambda: exact(undo(model, False, floats)),
        "8-bit weights only (no 7-bit layers)": lambda: exact(undo(model, True, eight_bit)),
        "neither (ranges only)": lambda: exact(undo(model, True, floats)),
    }


def predictions(run: Logits, pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([run(to_model_input(pixels[i:i + BATCH])).argmax(1)
                           for i in range(0, len(pixels), BATCH)])


def measure(args: argparse.Namespace) -> None:
    run, export = RunDir(args.run), args.run / "export"
    require_export(run, "model.onnx", "model.int8.onnx")
    _, _, sets = run_context(run, None, args.max_images)
    fp32 = file_candidate(export / "model.onnx").run
    reference = {s.name: predictions(fp32, s.pixels) for s in sets}
    rows = []
    for variant, build in variants(export).items():
        runner = build()
        row: dict[str, object] = {"variant": variant}
        for s in sets:
            pred = predictions(runner, s.pixels)
            row[f"{s.name}_accuracy"] = round(100 * float((pred == s.labels).mean()), 2)
            row[f"{s.name}_agreement"] = round(100 * float((pred == reference[s.name]).mean()), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| variant | " + " | ".join(f"{s.name} % | agree %" for s in sets) + " |")
    print("|---|" + "---:|---:|" * len(sets))
    for r in rows:
        cells = [f"{r[f'{s.name}_accuracy']} | {r[f'{s.name}_agreement']}" for s in sets]
        print(f"| {r['variant']} | " + " | ".join(cells) + " |")
    if args.json:
        fp32_accuracy = {s.name: round(100 * float((reference[s.name] == s.labels).mean()), 2)
                         for s in sets}
        args.json.write_text(json.dumps({"run": str(args.run), "fp32_accuracy": fp32_accuracy,
                                         "rows": rows, "provenance": provenance()},
                                        indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--max-images", type=int, default=None, help="per validation set")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    try:
        measure(args)
    except DgkitError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
