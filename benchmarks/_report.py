"""What the benchmark scripts share in their reports: number formatting, Markdown tables, the machine, and
replacing one section of benchmarks/README.md."""
from __future__ import annotations

import math
import platform
from pathlib import Path


def fmt(value: float | None, digits: int | None = None) -> str:
    """A number for a table: 3 decimals below 10, 1 below 1000, none above; "—" for nothing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if digits is None:
        magnitude = abs(value)
        digits = 3 if magnitude < 10 else 1 if magnitude < 1000 else 0
    return f"{value:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, str]:
    """The facts about this machine that every published table states."""
    model = "unknown"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as handle:
        memory = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal")) * 1024
    return {
        "CPU": model,
        "memory": f"{memory / 1024 ** 3:.1f} GiB",
        "Python": platform.python_version(),
        "OS": f"{platform.system()} {platform.release()}",
    }


def write_section(path: Path, heading: str, text: str, append: bool = True) -> None:
    """Replace the section of `path` whose heading line starts with `heading` by `text`.

    A file without that section gets `text` appended, or with `append=False` becomes `text` alone (as a
    scratch file named by --markdown does); a file that does not exist gets `text` as its whole content.
    """
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    if start is None:
        body = "".join(lines).rstrip("\n") if append else ""
        path.write_text(body + "\n\n" + text.rstrip("\n") + "\n" if body else text)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + text.rstrip("\n") + "\n" + ("\n" + tail if tail else ""))
