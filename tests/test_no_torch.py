"""`dgkit validate MODEL.onnx --data DIR` on an edge box (dgkit without [train]: no torch, no
matplotlib): it runs, never imports either, and scores the model as its numpy twin does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from cli_helpers import dgkit
from PIL import Image
from serve_helpers import CLASSES, SPEC, make_model, photo, reference_logits

from dgkit.preprocess import load_prepared, to_model_input

# Stands in for torch ahead of the real one on PYTHONPATH: any import of torch (or of what
# needs it) writes the importing stack to $DGKIT_TORCH_MARK and fails, as without torch.
BLOCKER = """\
import os, traceback
with open(os.environ["DGKIT_TORCH_MARK"], "a") as mark:
    mark.write("".join(traceback.format_stack()))
raise ImportError("torch is not installed here (tests/test_no_torch.py)")
"""
ABSENT = 'raise ModuleNotFoundError("matplotlib is not installed here", name="matplotlib")\n'


def without_torch(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment in which torch and matplotlib cannot be imported, and the file that
    records tries to import torch."""
    for module, body in (("torch", BLOCKER), ("matplotlib", ABSENT)):
        (tmp_path / "blocker" / module).mkdir(parents=True)
        (tmp_path / "blocker" / module / "__init__.py").write_text(body)
    mark = tmp_path / "torch_imported.txt"
    path = os.pathsep.join(filter(None, [str(tmp_path / "blocker"),
                                         os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "DGKIT_TORCH_MARK": str(mark)}, mark


def test_validate_a_model_file_without_torch(tmp_path):
    env, mark = without_torch(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 1 and "torch is not installed here" in probe.stderr
    assert mark.is_file()  # the blocker is what an import of torch meets
    mark.unlink()

    weights = make_model(tmp_path / "model.onnx")
    data = tmp_path / "data"
    paths, labels = [], []
    for label, cls in enumerate(CLASSES):
        (data / "field" / cls).mkdir(parents=True)
        for i in range(4):
            path = data / "field" / cls / f"{i}.png"
            Image.fromarray(photo(10 * label + i)).save(path)
            paths.append(path)
            labels.append(label)
    proc = dgkit("validate", tmp_path / "model.onnx", "--data", data, "--domain", "field",
                 "--latency-runs", "2", env=env)
    assert not mark.exists(), f"torch was imported:\n{mark.read_text()}"
    assert proc.returncode == 0, proc.stderr
    assert "no figures: matplotlib is not installed" in proc.stderr
    assert (tmp_path / "model.onnx.report.md").is_file()

    x = to_model_input(np.stack([load_prepared(p, SPEC) for p in paths]))
    right = (reference_logits(x, weights).argmax(1) == np.array(labels)).mean()
    report = json.loads((tmp_path / "model.onnx.report.json").read_text())
    (artifact,) = report["artifacts"]
    assert artifact["accuracy"] == {"field": round(100 * right, 2)}
