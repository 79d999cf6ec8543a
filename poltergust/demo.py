"""`poltergust demo`: Luigi's Top Artists example on two local nodes, nothing else needed.

Everything lives in a fresh temporary directory: the "bucket" (a local
directory), the nodes' data, the environments and the results, which stay
there afterwards for you to look at. The dashboard serves it all while the
demo runs (and after, with `--keep`).
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from poltergust import client
from poltergust.dashboard import dashboard_server
from poltergust.layout import Location, log_prefix
from poltergust.luigid.embedded import embedded_scheduler
from poltergust.storage import open_store

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "top_artists"
NODES = ("demo-node-1", "demo-node-2")


def run_demo(keep: bool = False) -> int:
    if not (EXAMPLE / "top_artists.py").exists():
        print(f"poltergust demo: the example is missing ({EXAMPLE}); run it from a source checkout "
              "installed with `pip install -e .`", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="poltergust-demo-"))
    try:
        return asyncio.run(_demo(root, keep))
    except KeyboardInterrupt:
        print("\ninterrupted; everything is stopped")
        return 130


async def _demo(root: Path, keep: bool) -> int:
    bucket = root / "bucket"
    (bucket / "environment").mkdir(parents=True)
    (bucket / "environment" / "top_artists.yaml").write_text(
        f"dependencies:\n  - luigi\n  - {EXAMPLE}\n")
    config = root / "top_artists.config.yaml"
    config.write_text(
        "environment: ../environment/top_artists.yaml\n"
        "task:\n  name: Top10Artists\n  module: top_artists\n  date-interval: '2012-06'\n"
        f"variables:\n  TOP_ARTISTS_DATA: {root / 'data'}\n"
    )
    print(f"demo directory: {root}")
    async with embedded_scheduler(root, _free_port()) as url, \
            dashboard_server([str(bucket / "pipeline")], url, port=_free_port()) as dashboard:
        print(f"luigi scheduler: {url}  (open it in a browser to watch the task graph)")
        print(f"dashboard: {dashboard}  (open it in a browser to watch the pipeline, its logs and the nodes)")
        nodes = [_start_node(root, name, url, bucket) for name in NODES]
        try:
            await _wait_ready(root, nodes)
            print(f"nodes {', '.join(NODES)} are watching {bucket / 'pipeline'}")
            code = await _submit_and_wait(config, Location.parse(str(bucket / "pipeline")))
            results = sorted((root / "data").glob("top_artists_*.tsv"))
            if code == 0 and results:
                print(f"top 10 artists: {results[0]}")
                print(results[0].read_text(), end="")
            print(f"node logs: {bucket / log_prefix('pipeline/top_artists.config.yaml')}")
            if keep:
                print(f"still serving the dashboard at {dashboard}; press Ctrl-C to stop", flush=True)
                await asyncio.Event().wait()
            return code
        finally:
            for node in nodes:
                if node.poll() is None:
                    node.send_signal(signal.SIGTERM)
            for node in nodes:
                await asyncio.to_thread(node.wait)
            print("nodes and scheduler stopped")


async def _submit_and_wait(config: Path, target: Location) -> int:
    uploaded = await client.submit(config, target, "top_artists", print)
    print(f"submitted {target.url(uploaded.name)}", flush=True)
    async with open_store(target.bucket) as store:
        outcome, section = await client.wait(store, target, "top_artists", uploaded.generation,
                                             lambda line: print(line, flush=True))
    print(f"top_artists: {outcome} on {section.get('node')} in {section.get('duration_seconds')}s"
          + (f": {section.get('reason')}" if outcome == "error" else ""), flush=True)
    return 0 if outcome == "done" else 1


def _start_node(root: Path, name: str, url: str, bucket: Path) -> subprocess.Popen[bytes]:
    log = (root / f"{name}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "poltergust.async_worker", "--path", str(bucket / "pipeline"),
         "--scheduler-url", url, "--node-name", name, "--data-dir", str(root / name),
         "--env-dir", str(root / "environments"), "--heartbeat-interval", "5"],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=dict(os.environ),
    )


async def _wait_ready(root: Path, nodes: list[subprocess.Popen[bytes]]) -> None:
    for name, node in zip(NODES, nodes):
        log = root / f"{name}.log"
        while "ready: subscribed" not in log.read_text(errors="replace"):
            if node.poll() is not None:
                raise RuntimeError(f"{name} exited; see {log}")
            await asyncio.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
