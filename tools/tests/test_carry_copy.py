"""tools/carry_copy.py: grey images lossless, the rest JPEG, whole domains packed into parts."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "carry_copy.py"


def _carry_copy(*args: object) -> subprocess.CompletedProcess:
    """Run tools/carry_copy.py with this Python, as a user would."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one-line error the script printed; fails if it printed a traceback instead."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _noise_domains(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for domain, grey, count in [("sketch", True, 3), ("photo", False, 4), ("cartoon", False, 2)]:
        for cls in ("a", "b"):
            (root / domain / cls).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 1 if grey else 3), dtype=np.uint8)
                Image.fromarray(np.repeat(pixels, 3, axis=2) if grey else pixels).save(
                    root / domain / cls / f"{i}.png")
    return root


def _bytes_by_domain(part: Path) -> dict[str, int]:
    return {d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            for d in (part / "src").iterdir()}


def test_grey_images_stay_lossless_and_domains_pack_into_parts_under_the_limit(tmp_path):
    src = _noise_domains(tmp_path / "src")
    one = tmp_path / "one"
    assert _carry_copy(src, one, "--part-mb", 100).returncode == 0
    assert [p.name for p in one.iterdir()] == ["part0"]
    sizes = _bytes_by_domain(one / "part0")

    sketch = Image.open(one / "part0" / "src" / "sketch" / "a" / "0.png")
    assert sketch.mode == "L"
    assert np.array_equal(np.asarray(sketch.convert("RGB")),
                          np.asarray(Image.open(src / "sketch" / "a" / "0.png")))
    assert sorted(p.name for p in (one / "part0" / "src" / "photo" / "b").iterdir()) == [
        "0.jpg", "1.jpg", "2.jpg", "3.jpg"]

    limit = max(sizes.values())  # the largest domain fills a part by itself
    split = tmp_path / "split"
    proc = _carry_copy(src, split, "--part-mb", limit / 1e6)
    assert proc.returncode == 0, proc.stderr
    parts = sorted(split.iterdir())
    packed = [_bytes_by_domain(p) for p in parts]
    assert sorted(d for part in packed for d in part) == ["cartoon", "photo", "sketch"]
    assert all(sum(part.values()) <= limit for part in packed)
    others_share_a_part = sum(sizes.values()) - limit <= limit
    assert len(parts) == (2 if others_share_a_part else 3)


def test_a_domain_over_the_limit_is_one_error_and_leaves_no_folder(tmp_path):
    src = _noise_domains(tmp_path / "src")
    proc = _carry_copy(src, tmp_path / "out", "--part-mb", 0.001)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: domain ") and "--part-mb" in lines[0]
    assert not (tmp_path / "out").exists()


def test_an_unreadable_image_is_one_error_and_leaves_no_folder(tmp_path):
    src = _noise_domains(tmp_path / "src")
    (src / "photo" / "a" / "9.jpg").write_bytes(b"not a jpeg")
    proc = _carry_copy(src, tmp_path / "out")
    assert proc.returncode == 1
    assert error_line(proc).startswith(f"error: {src / 'photo' / 'a' / '9.jpg'} cannot be read")
    assert not (tmp_path / "out").exists()


def test_an_existing_destination_is_refused_and_left_as_it_was(tmp_path):
    src = _noise_domains(tmp_path / "src")
    keep = tmp_path / "out" / "all" / "mine.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("kept")
    proc = _carry_copy(src, tmp_path / "out")
    assert proc.returncode == 1
    assert error_line(proc) == f"error: {tmp_path / 'out'} already exists; pass a new folder"
    assert keep.read_text() == "kept" and len(list((tmp_path / "out").rglob("*"))) == 2


def test_a_missing_or_empty_source_is_one_error_and_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    for source, said in [(tmp_path / "nope", "does not exist"),
                         (tmp_path / "empty", "has no domain folders")]:
        proc = _carry_copy(source, tmp_path / "out")
        assert proc.returncode == 1
        assert error_line(proc).startswith(f"error: data root {source} {said}")
        assert not (tmp_path / "out").exists()
