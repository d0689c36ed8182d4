"""`dgkit export` and `dgkit validate`: from a run directory to checked, deployable artifacts.

Every artifact is written atomically (temporary file, then rename) and only after its checks
pass, so a crash, a full disk or a failed check never leaves a half-written or unchecked file
beside a good one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape

from dgkit.atomic import atomic_path
from dgkit.errors import DgkitError, require_extra
from dgkit.export import formats
from dgkit.export.formats import CALIB_CACHE, TIMING_CACHE, Format
from dgkit.export.quantize import DEFAULT_CALIB_METHOD
from dgkit.progress import console
from dgkit.rundir import RunDir


@dataclass
class ExportOptions:
    fp16: bool = False
    int8: bool = False
    trt: bool = False
    calib_method: str = DEFAULT_CALIB_METHOD
    calib_images: int = 512
    max_batch: int = 32
    data: Path | None = None  # default: the run's data root
    validate: bool = True
    max_images: int | None = None
    max_drop: float = 1.0
    latency_runs: int = 50


def _check_export_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise DgkitError(f"{path} is a file, not a folder; move it away so that dgkit export can "
                         "write its artifacts there")


def require_export(run: RunDir, *names: str) -> None:
    """A trained run whose export/ holds `names`; checked before minutes of image decoding."""
    run.require_trained()  # a path that is no run gets that sentence, not the export's
    for name in names:
        if not (run.export / name).is_file():
            raise DgkitError(f"{run.export / name} is missing; run dgkit export {run.path} "
                             "--int8 first")


def run_context(run: RunDir, data_root: Path | None, max_images: int | None):
    """The run's config, its validation sets (decoded once) and the data they came from."""
    from dgkit.export.images import eval_sets, load_data
    from dgkit.preprocess import PreprocessSpec

    config = run.require_trained()
    root = data_root or Path(config["data_root"])
    data = load_data(root, [*config["target_domains"], *config["source_domains"]],
                     config["classes"])
    spec = PreprocessSpec(**config["preprocess"])
    sets = eval_sets(data, config["classes"], config["target_domains"],
                     config["source_domains"], int(config["config"]["seed"]), spec, max_images)
    return config, data, spec, sets


def export_run(run: RunDir, opts: ExportOptions) -> dict[str, Any]:
    """Write the artifacts `opts` asks for under RUN/export/, then validate them."""
    from dgkit.export.images import MIN_CALIB_IMAGES
    from dgkit.export.quantize import CALIB_METHODS

    if opts.calib_method not in CALIB_METHODS:
        raise DgkitError(f"--calib-method '{opts.calib_method}' is not one of: "
                         f"{', '.join(CALIB_METHODS)}")
    if opts.max_batch < 1:
        raise DgkitError(f"--max-batch must be at least 1, got {opts.max_batch}")
    if opts.int8 and opts.calib_images < MIN_CALIB_IMAGES:
        raise DgkitError(f"--calib-images {opts.calib_images} is too few: INT8 calibration "
                         f"needs at least {MIN_CALIB_IMAGES} images")
    plan = formats.wanted(opts.fp16, opts.int8, opts.trt)
    for fmt in plan:
        if fmt.extra != "trt":
            for module in fmt.needs:
                require_extra(fmt.extra, module)
    run.require_trained()
    _check_export_dir(run.export)
    import numpy as np
    import onnx

    from dgkit.export import onnx_export as ox

    started = time.perf_counter()
    # Without validation only the parity images are needed: 32 from each validation set.
    limit = opts.max_images if opts.validate else ox.PARITY_IMAGES // 2
    config, data, spec, sets = run_context(run, opts.data, limit)

    out = run.export
    written: dict[str, Path] = {}
    timing: dict[str, float] = {}
    student = ox.load_student(run, config)

    pixels = np.concatenate([s.pixels for s in sets])
    parity = pixels[ox.parity_rows(len(pixels))]
    t = time.perf_counter()
    model = ox.to_onnx(student, ox.model_meta(run, config, "fp32"), parity)
    reference = ox.torch_logits(student, parity)
    fp32 = out / formats.BY_KEY["onnx-fp32"].filename
    with atomic_path(fp32) as tmp:  # renamed into place only when the parity check passes
        onnx.save_model(model, str(tmp))
        diff = ox.check_parity(tmp, reference, parity)
    written["onnx-fp32"] = fp32
    timing["onnx"] = time.perf_counter() - t
    console.print(f"wrote {fp32} (parity with torch on {len(parity)} images: max |logit diff| "
                  f"{diff:.1e}, same top-1)")

    if "onnx-fp16" in {f.key for f in plan}:  # asked for, or implied by --trt alone
        t = time.perf_counter()
        path = out / formats.BY_KEY["onnx-fp16"].filename
        ox.save_onnx(ox.to_fp16(model, ox.model_meta(run, config, "fp16")), path)
        written["onnx-fp16"] = path
        timing["fp16"] = time.perf_counter() - t
        console.print(f"wrote {path}")

    calib: dict[str, Any] = {}
    if opts.int8:
        from dgkit.export.images import calibration_pixels
        from dgkit.export.quantize import quantize

        t = time.perf_counter()
        calib_px, calib = calibration_pixels(
            data, config["source_domains"], int(config["config"]["seed"]), opts.calib_images,
            spec, out / CALIB_CACHE)
        metas = {k: ox.model_meta(run, config, k) for k in ("int8", "int8-trt")}
        for flavour, qmodel in quantize(fp32, calib_px, opts.calib_method, metas).items():
            path = out / formats.BY_KEY[f"onnx-{flavour}"].filename
            ox.save_onnx(qmodel, path)
            written[f"onnx-{flavour}"] = path
            console.print(f"wrote {path}")
        timing["int8"] = time.perf_counter() - t
        calib = {**calib, "method": opts.calib_method}

    if opts.trt:
        from dgkit.export import tensorrt

        reason = tensorrt.unavailable()
        if reason:
            console.print(f"[yellow]--trt: no TensorRT engine built: {escape(reason)}")
        else:
            t = time.perf_counter()
            for fmt in plan:
                if fmt.runtime != "tensorrt":
                    continue
                source = written["onnx-fp16" if fmt.key == "trt-fp16" else "onnx-int8-trt"]
                path = out / fmt.filename
                props = {p.key: p.value for p in onnx.load(str(source)).metadata_props}
                tensorrt.build_engine(source, path, props, opts.max_batch, out / TIMING_CACHE,
                                      fmt.precision)
                written[fmt.key] = path
                console.print(f"wrote {path}")
            timing["tensorrt"] = time.perf_counter() - t
    timing["export_total"] = time.perf_counter() - started

    summary: dict[str, Any] = {"artifacts": {k: str(p) for k, p in written.items()},
                               "calibration": calib, "seconds": _rounded(timing)}
    if opts.validate:
        candidates = _candidates(run, student, [(formats.BY_KEY[k], p)
                                                for k, p in written.items()])
        summary["report"] = _validate(candidates, sets, opts.max_drop, opts.latency_runs, out,
                                      run, {"export": summary})
    return summary


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in d.items()}


def _candidates(run: RunDir, student: Any, artifacts: list[tuple[Format, Path]]) -> list:
    from dgkit.export.validate import file_candidate, torch_candidate

    return [torch_candidate(student, run.student.stat().st_size),
            *(file_candidate(path, fmt) for fmt, path in artifacts)]


def _validate(candidates: list, sets: list, max_drop: float, latency_runs: int, folder: Path,
              run: RunDir | None, extra: dict[str, Any], stem: str = "report") -> dict[str, Any]:
    from dgkit.export.validate import build_report, evaluate, print_table, write_report

    t = time.perf_counter()
    results = evaluate(candidates, sets, max_drop, latency_runs)
    model = str(run.path) if run else candidates[0].file
    report = build_report(model, results, sets, max_drop,
                          {**extra, "validate_seconds": round(time.perf_counter() - t, 2)})
    paths = write_report(report, folder, stem)
    print_table(report)
    console.print(f"wrote {', '.join(str(p) for p in paths)}")
    return report


def validate_run(run: RunDir, data: Path | None, max_images: int | None, max_drop: float,
                 latency_runs: int = 50) -> dict[str, Any]:
    """`dgkit validate RUN`: torch FP32 and every artifact under RUN/export/."""
    require_extra("train", "torch")
    config = run.require_trained()
    artifacts = formats.present(run.export)
    if not artifacts:
        raise DgkitError(f"{run.export} holds no exported model; run dgkit export {run.path} "
                         "first")
    config, _, _, sets = run_context(run, data, max_images)
    from dgkit.export import onnx_export as ox

    student = ox.load_student(run, config)
    return _validate(_candidates(run, student, artifacts), sets, max_drop, latency_runs,
                     run.export, run, {})


def validate_model(path: Path, data: Path | None, domains: list[str], max_images: int | None,
                   max_drop: float, latency_runs: int = 50) -> dict[str, Any]:
    """`dgkit validate MODEL --data ROOT --domain D`: one exported model, no torch reference."""
    from dgkit.export.images import eval_sets, load_data
    from dgkit.export.validate import file_candidate

    if data is None or not domains:
        raise DgkitError(f"validating a model file ({path.name}) needs --data ROOT and "
                         "--domain D (the run directory knows both: dgkit validate RUN)")
    candidate = file_candidate(path)  # refuses a file that is not a dgkit model
    if candidate.run is None:
        reason = candidate.skipped.removeprefix("not runnable here: ")
        raise DgkitError(f"{path} cannot be validated on this machine: {reason}")
    meta = candidate.meta
    loaded = load_data(data, domains, meta.classes)
    sets = eval_sets(loaded, meta.classes, domains, [], 0, meta.preprocess, max_images)
    return _validate([candidate], sets, max_drop, latency_runs, path.parent, None, {},
                     stem=f"{path.name}.report")

