"""`dgkit data check` at 80 columns, in a terminal and in a log: every line fits and every count
is there, checked against the files each test wrote, for 65 classes (OfficeHome) and 345
(DomainNet); and the plain tables that dgkit data check and dgkit bench dg print."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from cli_helpers import dgkit
from data_helpers import Counts, write_dataset

from dgkit.text_table import text_table

OFFICE_HOME = [
    "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator",
    "Calendar", "Candles", "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp",
    "Drill", "Eraser", "Exit_Sign", "Fan", "File_Cabinet", "Flipflops", "Flowers", "Folder",
    "Fork", "Glasses", "Hammer", "Helmet", "Kettle", "Keyboard", "Knives", "Lamp_Shade", "Laptop",
    "Marker", "Monitor", "Mop", "Mouse", "Mug", "Notebook", "Oven", "Pan", "Paper_Clip", "Pen",
    "Pencil", "Postit_Notes", "Printer", "Push_Pin", "Radio", "Refrigerator", "Ruler", "Scissors",
    "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda", "Speaker", "Spoon", "TV", "Table",
    "Telephone", "ToothBrush", "Toys", "Trash_Can", "Webcam"]
DOMAIN_NET = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
WIDTH = 80


@pytest.fixture(scope="module")
def office_home(tmp_path_factory) -> tuple[Path, Counts]:
    """65 classes x 4 domains, 0 to 4 images each: every class misses at most one domain."""
    counts = {domain: {cls: (7 * c + 3 * d) % 5 for c, cls in enumerate(OFFICE_HOME)}
              for d, domain in enumerate(("Art", "Clipart", "Product", "Real_World"))}
    return write_dataset(tmp_path_factory.mktemp("oh") / "officehome", counts), counts


def run_check(root: Path, *args: str, columns: str | None = None, tty: bool = False
              ) -> tuple[int, str, str]:
    """`dgkit data check ROOT` with its stdout a pipe (as in a log) or an 80-column terminal,
    and COLUMNS set or not; returns (exit status, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    if columns is not None:
        env["COLUMNS"] = columns
    if not tty:
        proc = dgkit("data", "check", root, *args, env=env)
        return proc.returncode, proc.stdout, proc.stderr
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, WIDTH, 0, 0))
    with tempfile.TemporaryFile() as err:  # a file: a full stderr pipe would stall the child
        proc = subprocess.Popen([sys.executable, "-m", "dgkit", "data", "check", str(root),
                                 *args], stdout=slave, stderr=err, env=env)
        os.close(slave)
        chunks = []
        while True:  # until the terminal closes: EIO once the child has exited
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        proc.wait(timeout=300)
        err.seek(0)
        stderr = err.read().decode()
    return proc.returncode, b"".join(chunks).decode().replace("\r\n", "\n"), stderr


def table(lines: list[str], first: str) -> tuple[list[str], dict[str, list[str]]]:
    """The printed table whose first header cell is `first`: its other header words, and each
    row's cells by the row's name; the blocks of a table wider than the width joined."""
    header: list[str] = []
    rows: dict[str, list[str]] = {}
    for i, line in enumerate(lines[:-1]):
        if line.split()[:1] == [first] and set(lines[i + 1]) == {"-", " "}:
            header += line.split()[1:]
            for row in lines[i + 2:]:
                if not row.strip():
                    break
                name, *cells = row.split()
                rows.setdefault(name, []).extend(cells)
    return header, rows


def full_name(shown: str, names: list[str]) -> str:
    """The class a grid row names: in full, or cut with "…" when too long for the width."""
    found = [n for n in names if n == shown or (shown.endswith("…") and n.startswith(shown[:-1]))]
    assert len(found) == 1, (shown, found)
    return found[0]


def check_grid(lines: list[str], counts: Counts, classes: list[str]) -> None:
    """The grid's rows are exactly `classes`, each with its images per domain and in total."""
    header, rows = table(lines, "class")
    assert header == [*counts, "total"]
    names = list(counts[next(iter(counts))])
    shown = {full_name(name, names): cells for name, cells in rows.items()}
    assert sorted(shown) == sorted(classes)
    for cls, cells in shown.items():
        want = [counts[d][cls] for d in counts]
        assert cells == [str(n) for n in [*want, sum(want)]], cls


@pytest.mark.parametrize("columns, tty", [("80", False), (None, False), (None, True)],
                         ids=["COLUMNS=80", "log", "terminal"])
def test_65_classes_fit_80_columns_with_every_count(office_home, columns, tty):
    root, counts = office_home
    rc, out, err = run_check(root, columns=columns, tty=tty)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines and all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    images = sum(n for per_class in counts.values() for n in per_class.values())
    assert f"4 domains, 65 classes, {images} images" in " ".join(lines)
    _, summary = table(lines, "domain")  # images, classes, smallest and largest class
    assert summary == {d: [str(sum(c.values())), str(sum(n > 0 for n in c.values())),
                           str(min(c.values())), str(max(c.values()))]
                       for d, c in counts.items()}
    check_grid(lines, counts, OFFICE_HOME)
    assert f"0 unreadable of {images} images" in err
    for domain, per_class in counts.items():  # each class missing from a domain is named
        missing = [c for c in OFFICE_HOME if per_class[c] == 0]
        assert f"domain '{domain}' has no images of {', '.join(missing)}" in " ".join(
            err.split())


@pytest.fixture(scope="module")
def domain_net(tmp_path_factory) -> tuple[Path, Counts, list[str]]:
    """345 classes x 6 domains, with names up to 23 characters; 20 of the classes lack
    images in one domain, so they and only they are the scarcest."""
    names = [f"class_{c:03d}" for c in range(343)] + ["The_Great_Wall_of_China",
                                                       "The_Eiffel_Tower"]
    scarce = names[::18][:19] + ["The_Great_Wall_of_China"]
    counts = {domain: {cls: 1 + (c + d) % 3 for c, cls in enumerate(names)}
              for d, domain in enumerate(DOMAIN_NET)}
    for k, cls in enumerate(scarce):
        counts[DOMAIN_NET[k % 6]][cls] = 0
    return write_dataset(tmp_path_factory.mktemp("dn") / "domainnet", counts), counts, scarce


def test_345_classes_show_the_scarcest_and_say_how_to_see_all(domain_net):
    root, counts, scarce = domain_net
    rc, out, err = run_check(root, columns="80")
    assert rc == 0, err
    lines = out.splitlines()
    assert all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    assert "The 20 of 345 classes with the fewest images in a domain (--all lists every " \
           "class, --json prints every count):" in " ".join(lines)
    check_grid(lines, counts, scarce)

    rc, out, err = run_check(root, "--all")  # a log: no COLUMNS, no terminal
    lines = out.splitlines()
    assert rc == 0 and all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    check_grid(lines, counts, list(counts["real"]))
    assert any(name.endswith("…") for name in table(lines, "class")[1])  # a name was cut

    rc, out, err = run_check(root, "--json")
    report = json.loads(out)
    assert rc == 0 and report["counts"] == counts and report["unreadable"] == []
    assert report["images"] == sum(n for c in counts.values() for n in c.values())


def test_unreadable_images_are_listed_and_fail(office_home, tmp_path):
    root, counts = office_home
    import shutil

    copy = Path(shutil.copytree(root, tmp_path / "copy"))
    bad = copy / "Art" / "Bed" / "0.png"
    assert bad.is_file()
    bad.write_bytes(b"not a png")
    rc, out, err = run_check(copy, "--json")
    report = json.loads(out)
    assert rc == 1 and [u["path"] for u in report["unreadable"]] == [str(bad)]
    assert f"unreadable: {bad}" in " ".join(err.split())


def test_text_table_splits_columns_that_do_not_fit():
    names = [f"{r}_class_with_a_long_name" for r in range(5)]
    domains = [f"domain_{k:02d}" for k in range(12)]
    rows = [[name, *(str(r * k) for k in range(12))] for r, name in enumerate(names)]
    lines = text_table(["class", *domains], rows, 40)
    assert all(len(line) <= 40 for line in lines), max(lines, key=len)
    assert lines.count("") >= 2  # 12 columns of 9 and more characters: 3 blocks or more
    header, got = table(lines, "class")
    assert header == domains
    assert {full_name(name, names): cells for name, cells in got.items()} == {
        row[0]: row[1:] for row in rows}


def test_bench_dg_table_fits_80_columns():
    """DomainNet's six domains, three seeds: "mean ± std" cells, none cut or wrapped."""
    domains = list(DOMAIN_NET)
    script = f"""
from dgkit.distill.bench_dg import _print, table_row
domains = {domains!r}
per_seed = {{s: {{d: 40.0 + 7.5 * s + k for k, d in enumerate(domains)}} for s in range(3)}}
methods = ["erm", "kd", "scmd", "vl2v_sd"]
_print({{"seeds": [0, 1, 2], "domains": domains, "methods": methods,
        "results": {{m: table_row(per_seed, domains) for m in methods}}}})
"""
    env = {**os.environ, "COLUMNS": str(WIDTH)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120, check=True)
    lines = proc.stderr.splitlines()
    assert all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    header, rows = table([line.replace(" ± ", "±") for line in lines], "method")
    assert header == [*domains, "Avg"]
    for k, d in enumerate(domains):  # seeds 0, 1, 2 step by 7.5: the mean +7.5, sample std 7.5
        assert [cells[header.index(d)] for cells in rows.values()] == [f"{47.5 + k:.1f}±7.5"] * 4
    assert list(rows) == ["erm", "kd", "scmd", "vl2v_sd"]
