"""Reading the Markdown tables the benchmarks print, for the tests that run them in quick mode."""
from __future__ import annotations

import math
import re


def tables(text: str) -> dict[str, list[list[str]]]:
    """The Markdown tables of the output, by the ### heading above each, as rows of cells."""
    found: dict[str, list[list[str]]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("### "):
            heading = line[4:].strip()
        elif line.startswith("|") and not re.match(r"^\|(\s*---\s*\|)+$", line):
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            found.setdefault(heading, []).append(cells)
    return {name: rows[1:] for name, rows in found.items()}  # without the header row


def number(cell: str) -> float:
    value = float(cell)
    assert math.isfinite(value), cell
    return value
