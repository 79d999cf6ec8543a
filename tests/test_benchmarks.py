"""The benchmarks keep working: run them in quick mode and read their tables.

Quick mode of the pipelines benchmark (benchmarks/run.py) installs
luigi-poltergust 0.0.5 from the package index, starts luigid, the emulators
and nodes of both systems, and measures every figure on tiny sizes; the fleet
benchmark (benchmarks/fleet.py) runs 1 and 3 nodes on the emulators. Only the
shape of the results and what holds at any speed are checked here, never the
timings.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from harness import ROOT, leftovers
from harness.markdown import number
from harness.markdown import tables as markdown_tables

pytestmark = pytest.mark.stack  # the benchmarks start luigid, the emulators and nodes

SECTION = "## Pipelines:"


def _pipelines_section(path: Path) -> str:
    text = path.read_text() if path.exists() else ""
    start = text.find(SECTION)
    if start < 0:
        return ""
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


@pytest.mark.timeout(900)
def test_quick_benchmark_measures_everything(tmp_path: Path) -> None:
    readme = ROOT / "benchmarks" / "README.md"
    section_before = _pipelines_section(readme)
    markdown = tmp_path / "benchmark.md"
    workdir = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--markdown", str(markdown),
         "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=850, cwd=ROOT, check=False,
    )
    assert result.returncode == 0, result.stderr[-6000:]

    text = markdown.read_text()
    assert text.startswith(SECTION)
    assert "Command: `python benchmarks/run.py --quick" in text
    for fact in ("nproc", "CPU", "memory", "Python"):
        assert f"{fact} " in text, fact
    tables = markdown_tables(text)
    compare = tables["Poltergust against the original"]
    alone = tables["Poltergust alone, and the floor"]
    targets = tables["Targets"]

    # Every measure has rows, with numbers where numbers belong.
    assert {row[0] for row in compare + alone} == {"1", "2", "3", "4", "5", "6"}
    for row in compare:  # measure, label, n, warm p50, p95, spawn p50, p95, original p50, p95, ratios, note
        assert len(row) == 12, row
        if row[7] == "—":  # the original can be left out of the slowest makespans, saying so
            assert "not run" in row[11], row
            continue
        ours, original = number(row[3]), number(row[7])
        if not row[1].startswith("overhead"):  # a difference, which noise can make negative
            assert ours >= 0 and original >= 0, row
        if original > 0:
            assert number(row[9]) == pytest.approx(ours / original, rel=0.1, abs=0.01), row
            if row[5] != "—":  # spawn runs beside warm except on several nodes
                assert number(row[10]) == pytest.approx(number(row[5]) / original, rel=0.1, abs=0.01), row
    for row in alone:
        assert len(row) == 6, row
        assert number(row[3]) >= 0, row

    measures = [row[1] for row in compare + alone]

    def rows(pattern: str) -> list[str]:
        return [m for m in measures if re.search(pattern, m)]

    assert len(rows(r"^pickup: config written → ")) == 4 and rows(r"^luigi's own start")
    assert rows(r"^makespan, K=3 no-op pipelines on N=1 node ") and rows(r"^makespan, K=3 no-op pipelines on N=2 nodes")
    assert rows(r"^idle CPU per node") and rows(r"^idle storage operations per node-hour")
    assert len(rows(r"^upload → ")) == 8, "warm and spawn on the emulators"
    assert rows(r"^floor: plain") and rows(r"^CPU floor for K=3") and rows(r"^overhead per pipeline")
    assert len(rows(r"^floor of warm starts: ")) == 2
    assert rows(r"^RSS of an idle node") and rows(r"^PSS of the node and its luigi processes")
    in_flight = next(row for row in compare if row[1].startswith("luigi task processes running at once"))
    assert number(in_flight[3]) == number(in_flight[5]) == 3, "every run in flight at once, warm and spawn"

    # The latencies are positive and ordered as the milestones happen.
    pickup = {row[1]: number(row[3]) for row in compare if row[1].startswith("pickup")}
    values = list(pickup.values())
    assert 0 < values[0] <= values[1] <= values[2] <= values[3], pickup

    # The original really ran: it listed the directory while idle, and finished its pipelines.
    listings = next(row for row in compare if row[1].startswith("idle storage operations per node in"))
    assert number(listings[7]) > 0

    assert len(targets) == 8  # quick mode has no K=20 makespan: its targets are one "not measured" row
    assert all(row[3] in ("met", "**missed**", "—") for row in targets), targets

    # Quick mode with --markdown leaves the README alone; nothing is left running or installed.
    assert _pipelines_section(readme) == section_before
    assert leftovers(workdir) == []
    assert not (Path("/tmp/environments") / str(workdir).lstrip("/")).exists()


def test_dashboard_benchmark_runs_and_counts_right(tmp_path: Path) -> None:
    """Quick mode: 500 finished pipelines on a local directory and on the emulator, with and without summaries
    on the result objects; the benchmark itself checks the counts the overview shows, and prints (never asserts)
    how long each page took and how many storage requests a cold overview made."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dashboard.py"), "--quick", "--workdir",
                             str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = markdown_tables(result.stdout)["Dashboard with 500 finished pipelines and 5 waiting"]
    assert {row[0] for row in rows} == {"local directory", "GCS emulator"}
    assert {row[1] for row in rows} == {"summaries", "old format"}
    assert len(rows) == 32 and all(number(row[3]) > 0 for row in rows)
    assert sum(row[2] == "overview, warm: until a page shows the new listing" for row in rows) == 4, \
        "a held listing is renewed in the background and shown"
    counted = markdown_tables(result.stdout)["Storage requests of one cold overview on the GCS emulator"]
    requests = {row[0]: row[2] for row in counted}
    assert re.fullmatch(r"list \d+", requests["summaries"]), "with summaries, a cold overview only lists"
    assert "download" in requests["old format"]
    assert leftovers(tmp_path) == []


FLEET = "## Fleet scale"


@pytest.mark.timeout(600)
def test_quick_fleet_benchmark_measures_every_count(tmp_path: Path) -> None:
    readme = ROOT / "benchmarks" / "README.md"
    before = readme.read_text()
    markdown = tmp_path / "fleet.md"
    workdir = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fleet.py"), "--quick", "--markdown", str(markdown),
         "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=550, cwd=ROOT, check=False,
    )
    assert result.returncode == 0, result.stderr[-6000:]

    text = markdown.read_text()
    assert text.startswith(FLEET) and "Command: `python benchmarks/fleet.py --quick" in text
    tables = markdown_tables(text)
    single = tables["(a) a one-task pipeline"]
    wide = tables["(b) a graph of 6 independent 1 s tasks"]
    idle = tables["Idle nodes"]
    assert [row[0] for row in single] == [row[0] for row in wide] == [row[0] for row in idle] == ["1", "3"]
    for row in single + wide:
        n, runs, starts, running = (int(cell) for cell in row[:4])
        numbers = [number(cell) for cell in row[4:]]
        assert runs == 1 and starts >= running >= 1 and all(value >= 0 for value in numbers[1:]), row
        watched, delivered = int(row[6]), int(row[7])
        assert n <= watched <= delivered, "every node heard of the upload; the emulator delivers a superset"
    assert all(int(row[2]) <= 2 for row in single), "a one-task pipeline starts luigi on at most two nodes"
    for row in wide:
        first, last_first, last_end, ideal = (number(cell) for cell in row[12:16])
        assert 0 < first <= last_first < last_end <= number(row[10]) and ideal > 0, row
    for row in idle:
        assert number(row[3]) == 0, "idle nodes make no luigid request"
        assert row[5] == "0", "stopped nodes leave no subscription behind"

    busy = tables["(c) 2 wide graphs at once: luigid under load"]
    assert [row[0] for row in busy] == ["3"], "(c) runs from N=3 in quick mode"
    pipelines, makespan, ideal, requests = int(busy[0][1]), number(busy[0][2]), number(busy[0][3]), int(busy[0][4])
    p50, p99, slowest = (number(cell) for cell in busy[0][6:9])
    # The ideal counts one task at a time per node; a node taking part in both graphs runs a task of each at
    # once, so only half of it bounds the makespan.
    assert pipelines == 2 and makespan >= ideal / pipelines > 0 and requests > 0 and 0 < p50 <= p99 <= slowest, busy
    growth = {row[0]: row for row in tables["What grows how"]}
    assert "(a) storage requests" in growth and "idle luigid requests per node-minute" in growth
    targets = tables["Targets"]
    assert len(targets) == 6 and all(row[3] in ("met", "**missed**") for row in targets), targets
    assert ("Why targets are missed:" in text) == any(row[3] == "**missed**" for row in targets)

    assert readme.read_text() == before
    assert leftovers(workdir) == []
