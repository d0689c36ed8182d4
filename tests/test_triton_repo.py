"""`dgkit.export.triton` writes a Triton model repository whose config.pbtxt Triton's own
ModelConfig protobuf (shipped in tritonclient) parses and which matches the ONNX graph."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from serve_helpers import CLASSES, make_model

from dgkit.errors import DgkitError
from dgkit.export.triton import write_repository

pb = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                         reason="needs tritonclient[grpc] (the 'dev' extra)")
text_format = pytest.importorskip("google.protobuf.text_format")

# onnx TensorProto element types -> Triton's, independently of the module's own table.
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: pb.TYPE_FP32, onnx.TensorProto.FLOAT16: pb.TYPE_FP16}


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_config_parses_with_tritons_protobuf_and_matches_the_graph(tmp_path: Path,
                                                                   precision: str) -> None:
    model = tmp_path / f"model.{precision}.onnx"
    make_model(model, precision=precision)
    folder = write_repository(model, tmp_path / "repo", "tiny", max_batch=16, max_delay_us=500)
    config = text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())

    graph = onnx.load(folder / "1" / "model.onnx").graph
    assert (folder / "1" / "model.onnx").read_bytes() == model.read_bytes()
    assert config.name == "tiny" and config.backend == "onnxruntime"
    assert config.max_batch_size == 16
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    for ours, theirs in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in ours] == [t.name for t in theirs]
        for t, g in zip(ours, theirs, strict=True):
            dims = [d.dim_value for d in g.type.tensor_type.shape.dim]
            assert g.type.tensor_type.shape.dim[0].dim_param  # batch: dynamic in the graph
            assert list(t.dims) == dims[1:]
            assert t.data_type == ONNX_TO_TRITON[g.type.tensor_type.elem_type]
    assert config.output[0].label_filename == "labels.txt"
    assert (folder / "labels.txt").read_text().splitlines() == CLASSES


def test_bad_name_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    make_model(model)
    with pytest.raises(DgkitError, match="model name"):
        write_repository(model, tmp_path / "repo", "a b")
