"""The dynamic-requirements benchmark (benchmarks/dynamic.py) keeps working: run it in quick mode, read its table.

Only the table's shape and the work it accounts for are checked, never the timings.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from harness import ROOT, leftovers
from harness.markdown import number, tables

pytestmark = pytest.mark.stack  # the benchmarks start luigid, the emulators and nodes

HEADING = "## Dynamic requirements over nodes"


def test_quick_dynamic_benchmark(tmp_path: Path) -> None:
    readme = ROOT / "benchmarks" / "README.md"
    before = readme.read_text()
    workdir = tmp_path / "work"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dynamic.py"), "--quick", "--workdir",
                             str(workdir)], capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.startswith(HEADING)
    rows = tables(result.stdout)[""]
    assert [row[1] for row in rows] == ["plain luigi, --workers 1", "1 node", "3 nodes"]
    for row in rows:
        assert row[0] == "poltergust_testpipes.Dynamic: 4 tasks of 0.5 s" and row[2] == "1", row
        assert number(row[3]) > 0
        assert sum(int(part) for part in row[6].split(" + ")) == 4, row  # every yielded task ran, once
    assert "Not measured: luigi's own example: left out in quick mode." in result.stdout
    assert readme.read_text() == before  # quick mode writes no file
    assert leftovers(workdir) == []
