"""The built-in sample dataset: deterministic, complete, and `dgkit samples make` on the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from cli_helpers import dgkit, error_line
from PIL import Image

from dgkit.data import discover
from dgkit.samples import CLASSES, DOMAINS, draw_sample, make_samples


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_same_seed_gives_byte_identical_images_and_another_seed_different_ones(tmp_path):
    a = make_samples(tmp_path / "a", seed=3, per_class=2, size=40, quiet=True)
    b = make_samples(tmp_path / "b", seed=3, per_class=2, size=40, quiet=True)
    c = make_samples(tmp_path / "c", seed=4, per_class=2, size=40, quiet=True)
    files_a, files_b, files_c = _files(a), _files(b), _files(c)
    assert len(files_a) == 2 * len(CLASSES) * len(DOMAINS)
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    assert all(files_a[k] != files_c[k] for k in files_a)
    # Image n depends on (seed, domain, class, n) only: a smaller set is a prefix of a larger one.
    more = _files(make_samples(tmp_path / "d", seed=3, per_class=3, size=40, quiet=True))
    assert all(more[k] == v for k, v in files_a.items()) and len(more) > len(files_a)
    # ... and drawing that one image alone gives the pixels of the file the set holds.
    for domain, cls, n in (("photo", "star", 1), ("sketch", "arrow", 0)):
        alone = np.asarray(draw_sample(domain, cls, n, 3, size=40).convert("RGB"))
        with Image.open(a / domain / cls / f"{n}.png") as saved:
            assert np.array_equal(np.asarray(saved.convert("RGB")), alone)


def test_every_domain_has_every_class_and_the_domains_differ(tmp_path):
    root = make_samples(tmp_path / "s", per_class=3, size=32, quiet=True)
    data = discover(root)
    assert data.domains == sorted(DOMAINS) and data.classes == sorted(CLASSES)
    assert (data.counts() == 3).all() and not data.warnings
    manifest = json.loads((root / "samples.json").read_text())
    assert manifest["seed"] == 0 and manifest["per_class"] == 3 and manifest["size"] == 32
    # Crude style check: sketches are grey pencil on pale paper, the other domains are coloured.
    saturation = {}
    for domain in DOMAINS:
        img = np.asarray(draw_sample(domain, "heart", 0, size=64), np.float32)
        saturation[domain] = float((img.max(-1) - img.min(-1)).mean())
        assert img.shape == (64, 64, 3)
    assert saturation["sketch"] < 20 < min(saturation[d] for d in DOMAINS if d != "sketch")


def test_cli_writes_the_layout_and_refuses_a_non_empty_folder(tmp_path):
    out = tmp_path / "samples"
    proc = dgkit("samples", "make", out, "--per-class", "2", "--size", "32", "--seed", "1",
                 check=True)
    assert "wrote 48 images" in proc.stderr
    for domain in DOMAINS:
        for cls in CLASSES:
            assert sorted(p.name for p in (out / domain / cls).iterdir()) == ["0.png", "1.png"]
    before = _files(out)
    assert "not empty" in error_line(dgkit("samples", "make", out, "--size", "32"))
    assert _files(out) == before  # untouched
    dgkit("samples", "make", out, "--per-class", "1", "--size", "32", "--overwrite", check=True)
    assert len(_files(out)) == len(DOMAINS) * len(CLASSES)
    assert not list(tmp_path.glob(".samples.*"))  # no temporary folders left behind
    (tmp_path / "file").write_text("x")
    assert "not a folder" in error_line(dgkit("samples", "make", tmp_path / "file"))
    assert "--per-class" in error_line(dgkit("samples", "make", tmp_path / "x", "--per-class",
                                             "0"))


def test_the_cli_module_imports_no_numpy_and_making_samples_no_torch(tmp_path):
    code = ("import sys; import dgkit.samples as s; assert 'numpy' not in sys.modules; "
            f"s.make_samples({str(tmp_path / 'd')!r}, per_class=1, size=16, quiet=True); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shortcut_mark_names_the_class_except_in_the_free_domain(tmp_path):
    from dgkit.samples import CUE_COLOURS

    def marks(root, domain):
        """(class index, mark colour index) of every image, read from its corner pixel."""
        out = []
        for c, cls in enumerate(CLASSES):
            for path in sorted((root / domain / cls).glob("*.png")):
                pixel = Image.open(path).convert("RGB").getpixel((1, 1))
                out.append((c, CUE_COLOURS.index(pixel)))
        return out

    always = make_samples(tmp_path / "always", per_class=12, size=32, quiet=True, shortcut=1.0)
    for domain in ("cartoon", "painting", "photo"):
        assert all(c == m for c, m in marks(always, domain))
    free = marks(always, "sketch")
    assert sum(c == m for c, m in free) < len(free) / 2  # chance is 1/6
    assert len({m for _, m in free}) == len(CLASSES)
    never = make_samples(tmp_path / "never", per_class=12, size=32, quiet=True, shortcut=0.0,
                         shortcut_free="photo")
    assert not any(c == m for c, m in marks(never, "sketch"))
    manifest = json.loads((never / "samples.json").read_text())["shortcut"]
    assert manifest["probability"] == 0.0 and manifest["free_domain"] == "photo"
    plain = make_samples(tmp_path / "plain", per_class=1, size=32, quiet=True)
    assert "shortcut" not in json.loads((plain / "samples.json").read_text())


def test_shortcut_options_are_checked(tmp_path):
    assert "--shortcut must be between 0 and 1" in error_line(
        dgkit("samples", "make", tmp_path / "a", "--shortcut", "1.5"))
    assert "--shortcut-free 'clay' is not one of the domains" in error_line(
        dgkit("samples", "make", tmp_path / "b", "--shortcut", "0.9", "--shortcut-free", "clay"))
