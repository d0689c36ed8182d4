"""`bench/data_scale.py`: its sets are what `dgkit samples make` draws, and a tiny run of it
measures memory and disk runs and the auto line, as a user runs it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from cli_helpers import bench_script

from dgkit.samples import make_samples


def _module():
    path = Path(__file__).resolve().parents[1] / "bench" / "data_scale.py"
    spec = importlib.util.spec_from_file_location("data_scale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sets_are_the_sample_generators(tmp_path):
    sets = _module().make_sets(tmp_path / "work", [24, 48], 16, jobs=1)
    made = make_samples(tmp_path / "made", per_class=1, size=16, quiet=True)
    small = sorted(p.relative_to(sets[24]) for p in sets[24].rglob("*.png"))
    assert len(small) == 24 and len(list(sets[48].rglob("*.png"))) == 48
    for rel in small:  # the same bytes, under the large set's zero-padded names
        assert (sets[24] / rel).read_bytes() == (made / rel.parent / "0.png").read_bytes()
        assert (sets[24] / rel).stat().st_ino == (sets[48] / rel).stat().st_ino  # hard links
    assert json.loads((sets[24] / "samples.json").read_text())["per_class"] == 1


@pytest.mark.slow
def test_a_tiny_run_measures_both_stores_and_the_auto_line(tmp_path):
    out = tmp_path / "data_scale.json"
    proc = bench_script("data_scale.py", "--work", tmp_path / "work", "--sizes", "48",
                        "--image-size", "16", "--steps", "3", "--skip-steps", "1",
                        "--batch-size", "8", "--jobs", "1", "--out", out, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert row["images"] == 48 and row["store_cold"]["images"] == 48
    for store in ("memory", "disk"):
        assert row[store]["images_per_s"] > 0 and row[store]["peak_rss_mb"] > 0
    assert result["auto"]["line"].startswith("data store: disk: the 48 decoded images")
    assert "load_average" in result["provenance"]
    assert "| 48 |" in proc.stdout
