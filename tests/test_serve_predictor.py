"""dgkit.serve.Predictor on a tiny real ONNX model: numbers, inputs, threads, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import CLASSES, encode, huge_png, make_model, photo, reference_logits

from dgkit.errors import DgkitError
from dgkit.preprocess import ImageError, load_prepared, to_model_input
from dgkit.serve import Predictor
from dgkit.serve.backends import BACKENDS, physical_cores
from dgkit.serve.tensorrt_backend import check_engine_fits, cuda_gpu


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("model") / "model.fp32.onnx"
    return path, make_model(path)


@pytest.fixture(scope="module")
def predictor(model: tuple[Path, dict]) -> Predictor:
    return Predictor(model[0], backend="ort-cpu", threads=1)


def _expected_probs(source: object, predictor: Predictor, weights: dict) -> np.ndarray:
    x = to_model_input(load_prepared(source, predictor.spec)[None])
    logits = reference_logits(x, weights)[0]
    e = np.exp(logits - logits.max())
    return e / e.sum()


def test_matches_numpy_reimplementation(tmp_path: Path, model: tuple[Path, dict],
                                        predictor: Predictor) -> None:
    images = []
    for seed in (0, 3, 8):  # seeds whose pictures the tiny model puts in different classes
        images.append(tmp_path / f"{seed}.png")
        images[-1].write_bytes(encode(photo(seed, 80, 50)))
    results = predictor.predict(images, top_k=3, batch_size=2)  # two batches: 2 + 1
    assert len(results) == 3
    for path, result in zip(images, results, strict=True):
        want = _expected_probs(path, predictor, model[1])
        order = np.argsort(-want)[:3]
        assert list(result.indices) == list(order)
        assert list(result.labels) == [CLASSES[i] for i in order]
        np.testing.assert_allclose(result.probs, want[order], rtol=1e-4, atol=1e-6)
    assert len({r.label for r in results}) > 1, "fixed weights should not give one answer"


def test_probabilities_sorted_and_sum_to_one(predictor: Predictor) -> None:
    [full] = predictor.predict(photo(7), top_k=len(CLASSES))
    assert list(full.probs) == sorted(full.probs, reverse=True)
    assert sum(full.probs) == pytest.approx(1.0, abs=1e-9)
    assert sorted(full.labels) == sorted(CLASSES)
    [top2] = predictor.predict(photo(7), top_k=2)
    assert top2.labels == full.labels[:2] and top2.probs == full.probs[:2]
    [capped] = predictor.predict(photo(7), top_k=50)  # more than there are classes
    assert len(capped.labels) == len(CLASSES)


def test_run_batch_and_meta(model: tuple[Path, dict], predictor: Predictor) -> None:
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(predictor.run_batch(x), reference_logits(x, model[1]),
                               rtol=1e-4, atol=1e-4)
    assert predictor.meta.classes == CLASSES
    assert predictor.meta.preprocess.input_size == 32
    assert predictor.backend == "ort-cpu"
    info = predictor.describe()
    assert info["classes"] == CLASSES and info["input_size"] == 32
    assert info["precision"] == "fp32" and info["backend"] == "ort-cpu"


def test_input_kinds_agree(tmp_path: Path, predictor: Predictor) -> None:
    path = tmp_path / "img.png"
    path.write_bytes(encode(photo(3, 70, 90)))
    sources = [path, str(path), path.read_bytes(), Image.open(path),
               np.asarray(Image.open(path).convert("RGB"))]
    results = predictor.predict(sources, top_k=5)
    assert all(r == results[0] for r in results), results
    # one image given alone, and an NHWC batch array, are accepted too
    assert predictor.predict(path.read_bytes()) == [results[0]]
    batch = np.stack([np.asarray(Image.open(path).convert("RGB"))] * 2)
    assert predictor.predict(batch) == [results[0]] * 2


def test_thread_safe(predictor: Predictor) -> None:
    images = [photo(seed) for seed in range(6)]
    want = predictor.predict(images)
    got: dict[int, list] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            got[i] = [predictor.predict(images[j:j + 1 + i % 2])[0]
                      for j in range(len(images)) for _ in range(3)]
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        assert got[i] == [want[j] for j in range(len(images)) for _ in range(3)]


def _odd_image(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.img"
    rgb = photo(5)
    if kind == "grayscale":
        path.write_bytes(encode(Image.fromarray(rgb).convert("L")))
    elif kind == "rgba":
        alpha = np.full(rgb.shape[:2], 128, np.uint8)
        path.write_bytes(encode(np.dstack([rgb, alpha])))
    elif kind == "cmyk":
        path.write_bytes(encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"))
    elif kind == "png16":
        path.write_bytes(encode(Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)))
    elif kind == "1x1":
        path.write_bytes(encode(np.array([[[200, 30, 60]]], np.uint8)))
    return path


@pytest.mark.parametrize("kind", ["grayscale", "rgba", "cmyk", "png16", "1x1"])
def test_odd_images_decode(kind: str, tmp_path: Path, model: tuple[Path, dict],
                           predictor: Predictor) -> None:
    path = _odd_image(kind, tmp_path)
    [result] = predictor.predict(path, top_k=5)
    want = _expected_probs(path, predictor, model[1])
    np.testing.assert_allclose(result.probs, np.sort(want)[::-1], rtol=1e-4, atol=1e-6)


def test_png16_keeps_its_range(tmp_path: Path, predictor: Predictor) -> None:
    """A 16-bit image must not saturate to white: it matches its 8-bit version."""
    gray = photo(5)[:, :, 0]
    deep, flat = tmp_path / "deep.png", tmp_path / "flat.png"
    deep.write_bytes(encode(Image.fromarray(gray.astype(np.uint16) * 257)))
    flat.write_bytes(encode(Image.fromarray(gray)))
    np.testing.assert_array_equal(predictor.prepare(deep), predictor.prepare(flat))


@pytest.mark.parametrize(("kind", "reason"), [
    ("corrupt", "cannot be decoded"),
    ("empty", "empty"),
    ("text", "not an image"),
    ("missing", "cannot read"),
    ("huge", r"too large|megapixel"),
])
def test_bad_images_rejected(kind: str, reason: str, tmp_path: Path,
                             predictor: Predictor) -> None:
    path = tmp_path / f"{kind}.png"
    if kind == "corrupt":
        path.write_bytes(encode(photo(1, 200, 200), "JPEG")[:300])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a picture\n")
    elif kind == "huge":
        huge_png(path)
    with pytest.raises(ImageError, match=reason) as info:
        predictor.predict([path])
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_model_files(tmp_path: Path, model: tuple[Path, dict]) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(DgkitError, match="does not exist") as info:
        Predictor(missing)
    assert str(missing) in str(info.value)

    text = tmp_path / "notes.onnx"
    text.write_text("definitely not protobuf")
    with pytest.raises(DgkitError, match="not a loadable ONNX model") as info:
        Predictor(text)
    assert str(text) in str(info.value) and "\n" not in str(info.value)

    bare = tmp_path / "bare.onnx"
    make_model(bare, meta=False)
    with pytest.raises(DgkitError, match="not a dgkit model") as info:
        Predictor(bare)
    assert str(bare) in str(info.value)

    with pytest.raises(DgkitError, match="is not a file") as info:
        Predictor(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_unknown_backend_lists_choices(model: tuple[Path, dict]) -> None:
    with pytest.raises(DgkitError, match="unknown backend 'cuda'") as info:
        Predictor(model[0], backend="cuda")
    assert all(name in str(info.value) for name in BACKENDS)


def test_backend_choice(model: tuple[Path, dict]) -> None:
    import onnxruntime as ort

    auto = Predictor(model[0])
    gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    assert auto.backend == ("ort-cuda" if gpu else "ort-cpu")
    with pytest.raises(DgkitError, match="runs TensorRT engines"):
        Predictor(model[0], backend="tensorrt")
    if not gpu:
        with pytest.raises(DgkitError, match="CUDAExecutionProvider"):
            Predictor(model[0], backend="ort-cuda")


def test_both_onnxruntime_packages_are_named_with_the_fix(model: tuple[Path, dict],
                                                           monkeypatch) -> None:
    import importlib.metadata

    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the conflict cannot be shown here")
    from dgkit.serve import backends

    installed = {"onnxruntime": "1.32.0"}  # the CPU package alone: the usual message

    def version(name: str) -> str:
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert not backends.both_onnxruntimes()
    with pytest.raises(DgkitError, match="install dgkit\\[gpu\\]"):
        Predictor(model[0], backend="ort-cuda")
    installed["onnxruntime-gpu"] = "1.32.0"  # pip put the GPU package beside it
    assert backends.both_onnxruntimes()
    with pytest.raises(DgkitError, match="onnxruntime and onnxruntime-gpu are both installed") \
            as info:
        Predictor(model[0], backend="ort-cuda")
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in str(
        info.value)


def test_engine_without_tensorrt_or_sidecar(tmp_path: Path, model: tuple[Path, dict]) -> None:
    engine = tmp_path / "model.fp16.plan"
    engine.write_bytes(b"not really an engine")
    with pytest.raises(DgkitError, match="no sidecar"):
        Predictor(engine)
    props = json.loads(json.dumps(Predictor(model[0], "ort-cpu").meta.to_props()))
    Path(f"{engine}.json").write_text(json.dumps(
        {"tensorrt_version": "10.0.1", "gpu_name": "NVIDIA L4", "compute_capability": "8.9",
         "metadata": props}))
    with pytest.raises(DgkitError, match="only the 'tensorrt' backend"):
        Predictor(engine, backend="ort-cpu")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(DgkitError, match="tensorrt package is not installed"):
            Predictor(engine)


def test_engine_mismatch_is_one_sentence() -> None:
    info = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA L4", "compute_capability": "8.9"}
    check_engine_fits(Path("m.plan"), info, "10.3.0", ("NVIDIA L4", "8.9"))  # fits
    with pytest.raises(DgkitError, match=r"built with TensorRT 10\.3\.0 .* has TensorRT 10\.8"):
        check_engine_fits(Path("m.plan"), info, "10.8.0", ("NVIDIA L4", "8.9"))
    with pytest.raises(DgkitError, match="built for a NVIDIA L4 .* this GPU is a NVIDIA H100"):
        check_engine_fits(Path("m.plan"), info, "10.3.0", ("NVIDIA H100", "9.0"))


def test_physical_cores_counts_cores_not_hyperthreads() -> None:
    """Against the topology counted here from each usable CPU's (package, core) ids, a
    different sysfs file from the sibling lists physical_cores() reads, capped by a cgroup
    quota where there is one."""
    import os

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    topology = [Path(f"/sys/devices/system/cpu/cpu{c}/topology") for c in cpus]
    if not cpus or not all((t / "core_id").is_file() for t in topology):
        pytest.skip("needs Linux sysfs CPU topology")
    cores = {((t / "physical_package_id").read_text().strip(), (t / "core_id").read_text().strip())
             for t in topology}
    want = len(cores)
    quota = Path("/sys/fs/cgroup/cpu.max")
    if quota.is_file() and quota.read_text().split()[0] != "max":
        limit, period = (int(v) for v in quota.read_text().split()[:2])
        want = min(want, max(1, limit // period))
    assert physical_cores() == want


def test_no_torch_in_the_edge_runtime(tmp_path: Path, model: tuple[Path, dict]) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(encode(photo(2)))
    code = (
        "import sys\n"
        "import importlib.util, dgkit.serve, dgkit.serve.commands, dgkit.serve.bench\n"
        "if importlib.util.find_spec('fastapi'):\n"
        "    import dgkit.serve.app\n"
        f"r = dgkit.serve.Predictor({str(model[0])!r}).predict([{str(image)!r}])\n"
        "assert r[0].label, r\n"
        "print('torch' in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.startswith("False"), out.stdout + out.stderr


def test_commands_module_imports_light() -> None:
    """Every CLI start imports dgkit.serve.commands: it must not load numpy or onnxruntime."""
    code = ("import sys, dgkit.serve.commands\n"
            "print(sorted(m for m in ('numpy', 'onnxruntime', 'fastapi', 'PIL') "
            "if sys.modules.get(m) is not None))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _tensorrt_and_gpu() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None and cuda_gpu() is not None


needs_trt = pytest.mark.skipif(not _tensorrt_and_gpu(), reason="needs tensorrt and a CUDA GPU")


@needs_trt
def test_tensorrt_engine_matches_onnx(tmp_path: Path, model: tuple[Path, dict]) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model[0].read_bytes()), [parser.get_error(i) for i in
                                                 range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("image", (1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32))
    config.add_optimization_profile(profile)
    engine = tmp_path / "model.fp32.plan"
    engine.write_bytes(bytes(builder.build_serialized_network(network, config)))
    name, cc = cuda_gpu()
    onnx_predictor = Predictor(model[0], "ort-cpu")
    Path(f"{engine}.json").write_text(json.dumps(
        {"tensorrt_version": trt.__version__, "gpu_name": name, "compute_capability": cc,
         "metadata": onnx_predictor.meta.to_props()}))

    trt_predictor = Predictor(engine)
    assert trt_predictor.backend == "tensorrt"
    x = np.random.default_rng(1).random((11, 3, 32, 32), dtype=np.float32)  # > max batch 8
    np.testing.assert_allclose(trt_predictor.run_batch(x), reference_logits(x, model[1]),
                               rtol=1e-3, atol=1e-3)
    images = [photo(s) for s in range(3)]
    assert [r.labels for r in trt_predictor.predict(images)] == \
        [r.labels for r in onnx_predictor.predict(images)]

    Path(f"{engine}.json").write_text(json.dumps(
        {"tensorrt_version": "9.0.0", "gpu_name": name, "compute_capability": cc,
         "metadata": onnx_predictor.meta.to_props()}))
    with pytest.raises(DgkitError, match="built with TensorRT 9.0.0"):
        Predictor(engine)
