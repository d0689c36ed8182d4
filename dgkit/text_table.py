"""Plain text tables that fit a width: readable at 80 columns, in a terminal and in a log.

A rich table squeezes every column into the width, which leaves an empty grid for 60 classes
and cuts headers. Here every row stays one line (so it can be grepped), long names in the first
column are cut with "…", and columns that still do not fit go to a further block of lines that
repeats the first column, as pandas prints a wide frame.
"""

from __future__ import annotations

from collections.abc import Sequence

GAP = "  "
MIN_FIRST = 12  # a first column cut shorter than this no longer names anything


def human_bytes(n: float | None) -> str:
    """12 B, 3.4 KB, 5.6 MB, 7.8 GB, 9.0 TB (powers of 1000); "—" when unknown."""
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], width: int) -> list[str]:
    """Lines of `header` and `rows`: the first column left-aligned, the others right-aligned,
    no line longer than `width` unless a single column is wider than that."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows,
                                                                       strict=True)]
    rest = widths[1:]
    first = min(widths[0], max(MIN_FIRST, width - sum(len(GAP) + w for w in rest)))
    blocks: list[list[int]] = [[]]
    used = first
    for j, w in enumerate(rest, start=1):
        if blocks[-1] and used + len(GAP) + w > width:
            blocks.append([])
            used = first
        blocks[-1].append(j)
        used += len(GAP) + w
    rule = ["-" * first, *("-" * w for w in rest)]
    lines: list[str] = []
    for block in blocks:
        if lines:
            lines.append("")
        for row in (header, rule, *rows):
            cells = [cut(str(row[0]), first).ljust(first)]
            cells += [str(row[j]).rjust(widths[j]) for j in block]
            lines.append(GAP.join(cells))
    return lines
