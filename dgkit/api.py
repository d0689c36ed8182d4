"""dgkit as a library: the stages as functions, the same ones the command line calls.

```python
from dgkit import api
from dgkit.train_config import TrainConfig

summary = api.train(TrainConfig(data="PACS", targets=["sketch"], method="erm"), "runs/erm")
report = api.export("runs/erm", api.ExportOptions(int8=True))["report"]
predictor = api.load_predictor("runs/erm/export/model.int8.onnx")
print(predictor.predict(["photo.jpg"])[0].label)
```
Heavy libraries (torch, onnx, onnxruntime) are imported when a function runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dgkit.records import Summary, ValidationReport
from dgkit.rundir import RunDir
from dgkit.train_config import TrainConfig

if TYPE_CHECKING:
    from dgkit.distill.students import Student
    from dgkit.export.exporter import ExportOptions
    from dgkit.serve.predictor import Predictor

__all__ = ["ExportOptions", "TrainConfig", "export", "load_predictor", "load_student", "resume",
           "train", "validate"]


def __getattr__(name: str) -> Any:
    if name == "ExportOptions":  # torch-free, but it lives with the exporter
        from dgkit.export.exporter import ExportOptions

        return ExportOptions
    raise AttributeError(name)


def train(config: TrainConfig, out: str | Path, *, overwrite: bool = False,
          quiet: bool = False, runs_root: Path | None = None) -> Summary | None:
    """Distill one run into the new run directory `out` and point `runs_root/latest` (default:
    out's parent) at it; a failed run that leaves nothing restores `latest`. Returns its summary
    (None on torchrun ranks other than 0)."""
    from dgkit.distill import distributed
    from dgkit.distill.trainer import Trainer
    from dgkit.errors import DgkitError
    from dgkit.rundir import new_run

    out = Path(out)
    trainer = Trainer(config, run=None, quiet=quiet)
    run_config = trainer.run_config()  # checks data, targets and names before touching disk
    if distributed.world() == 1:
        with new_run(out, overwrite, runs_root) as run:
            trainer.run = run
            run.write_config(run_config)
            return trainer.train()
    # Under torchrun rank 0 creates the run directory; the others learn whether it could.
    error = None
    if distributed.is_main():
        try:
            with new_run(out, overwrite, runs_root) as run:
                run.write_config(run_config)
        except DgkitError as exc:
            error = str(exc)
    error = distributed.broadcast_object(error)
    if error:
        raise DgkitError(error)
    trainer.run = RunDir(out)
    return trainer.train()


def resume(run: str | Path, *, quiet: bool = False, data_store: str | None = None,
           memory_budget: float | None = None) -> Summary | None:
    """Continue an interrupted run from its last checkpoint, with the options it was made with.
    A finished run is refused; temporary files of writes that were killed are removed.
    `data_store` and `memory_budget`, where given, replace the run's own and are recorded in its
    run.json: they decide where the decoded images live, not the weights, so a run stopped
    because its images did not fit in memory goes on from the disk store."""
    import dataclasses

    from dgkit.atomic import remove_stale_temps
    from dgkit.distill.trainer import Trainer
    from dgkit.errors import DgkitError

    path = Path(run)
    if not path.exists():
        raise DgkitError(f"--resume {path} does not exist")
    run_dir = RunDir(path)
    config = run_dir.config()
    summary = run_dir.summary()
    if summary is not None and summary.finished:
        raise DgkitError(f"--resume {path} is a finished run (its summary.json says so), so "
                         f"there is nothing to continue; export it with dgkit export {path}, or "
                         f"train it again with --out {path} --overwrite")
    remove_stale_temps(run_dir.path, run_dir.cache)
    if data_store is not None or memory_budget is not None:
        store = data_store or config.train.data_store
        budget = memory_budget if memory_budget is not None or store != "auto" \
            else config.train.memory_budget
        if (store, budget) != (config.train.data_store, config.train.memory_budget):
            config = dataclasses.replace(config, train=dataclasses.replace(
                config.train, data_store=store, memory_budget=budget))
            run_dir.write_config(config)
    return Trainer(config.train, run_dir, quiet=quiet).train(resume=True)


def export(run: str | Path, options: ExportOptions | None = None) -> dict[str, Any]:
    """Write the artifacts `options` asks for under RUN/export/ and validate them; the result's
    "report" is the ValidationReport."""
    from dgkit.export.exporter import ExportOptions, export_run

    return export_run(RunDir(Path(run).resolve()), options or ExportOptions())


def validate(run: str | Path, *, data: Path | None = None, max_images: int | None = None,
             max_drop: float = 1.0, latency_runs: int = 50) -> ValidationReport:
    """Validate every exported artifact of a run against its torch student."""
    from dgkit.export.exporter import validate_run

    return validate_run(RunDir(Path(run).resolve()), data, max_images, max_drop, latency_runs)


def load_student(run: str | Path) -> Student:
    """A run's trained student as a torch module (eval mode, CPU), without the trainer."""
    from dgkit.distill.students import load_student as load

    return load(RunDir(run))


def load_predictor(model: str | Path, backend: str = "auto", any_cpu: bool = False) -> Predictor:
    """An exported model (.onnx or TensorRT .plan) ready to classify images; no torch. An INT8
    model made for another kind of CPU is refused unless `any_cpu`."""
    from dgkit.serve.predictor import Predictor

    return Predictor(Path(model), backend=backend, any_cpu=any_cpu)
