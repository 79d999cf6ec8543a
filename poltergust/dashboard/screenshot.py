"""Make the README's screenshot of the dashboard: `python -m poltergust.dashboard.screenshot [docs/dashboard.png]`.

It fills a temporary directory with a day of made-up pipelines in every state
and three nodes (one of them silent), serves the dashboard on it, and has
headless Chromium (Debian's `chromium` and `chromium-driver`, driven through
`selenium`, the test extra) take the picture. `chrome()` is also what the
browser tests use.
"""
from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Sequence

import yaml

from poltergust import layout
from poltergust.node.heartbeat import Heartbeat
from poltergust.storage.local import LocalStore

PIPELINES = ("daily-sales", "crm-export", "top-artists", "churn-model", "ad-spend", "inventory-sync",
             "invoice-batch", "web-sessions", "forecast", "ledger-close", "search-index", "geo-enrich")
NODES = ("node-eu-1", "node-eu-2", "node-eu-3")


def chrome(width: int = 1360, height: int = 1000, timezone_name: str | None = None):  # -> selenium WebDriver
    """Headless Chromium through the system's chromedriver (nothing is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        raise RuntimeError("needs Debian's chromium and chromium-driver packages (tests/run.sh installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--hide-scrollbars", f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    env = dict(os.environ, **({"TZ": timezone_name} if timezone_name else {}))
    return webdriver.Chrome(options=options, service=Service(executable_path=driver, env=env))


def _write(store: LocalStore, name: str, data: bytes, when: datetime) -> int:
    """Write an object as if at `when`; returns its generation."""
    asyncio.run(store.write(name, data))
    path = store.root / name
    stamp = int(when.timestamp() * 1e9)
    os.utime(path, ns=(stamp, stamp))
    return stamp


def sample_bucket(root: Path, now: datetime, seed: int = 7) -> str:
    """A bucket directory with a day of pipelines and three nodes' heartbeats; returns the pipeline URL."""
    rng = random.Random(seed)
    store = LocalStore(root)
    location = layout.Location.parse(str(root / "pipeline"))
    _write(store, "environment/analytics.yaml", b"dependencies:\n  - luigi\n  - pandas\n", now - timedelta(days=3))
    for index in range(64):
        name = f"{rng.choice(PIPELINES)}-{(now - timedelta(hours=index * 0.37)):%m%d-%H%M}"
        submitted = now - timedelta(hours=index * 0.37 + rng.uniform(0.05, 0.2))
        pickup = rng.lognormvariate(-1.2, 0.5)
        duration = rng.uniform(20, 900)
        config = {"environment": "../environment/analytics.yaml",
                  "task": {"name": "Report", "module": "reports", "date": f"{submitted:%Y-%m-%d}"}}
        if index < 3:
            _write(store, location.config(name), yaml.safe_dump(config).encode(), now - timedelta(seconds=20 * index))
            continue
        if index < 6:
            generation = _write(store, location.config(name), yaml.safe_dump(config).encode(),
                                now - timedelta(minutes=index * 2))
            for node in NODES[: 1 + index % 3]:
                text = f"[poltergust {now - timedelta(minutes=index):%Y-%m-%d %H:%M:%S}Z] node {node} starts\n"
                _write(store, layout.log_name(location.config(name), generation, node), text.encode(), now)
            continue
        failed = rng.random() < 0.12
        started = submitted + timedelta(seconds=pickup)
        finished = started + timedelta(seconds=duration)
        if finished > now:
            continue
        config["poltergust"] = {
            "outcome": "error" if failed else "done", "node": rng.choice(NODES),
            "submitted": submitted.isoformat(), "started": started.isoformat(), "finished": finished.isoformat(),
            "duration_seconds": round(duration, 3),
            **({"reason": rng.choice(["a luigi task failed: ValueError: no rows for 2024-05-31",
                                      "timed out after 600s (the config's timeout)",
                                      "environment build failed: No matching distribution for pandas==9"])}
               if failed else {}),
        }
        outcome = "error" if failed else "done"
        _write(store, layout.result_name(location.config(name), outcome), yaml.safe_dump(config).encode(), finished)
    for index, node in enumerate(NODES):
        seen = now - timedelta(seconds=8 if index < 2 else 900)
        heartbeat = Heartbeat(node=node, version="0.1.0", started=now - timedelta(days=2, hours=index), written=seen,
                              interval=60, ready=True, runs=[], max_concurrent=4, environments_cached=3 + index,
                              disk_free=(42 - 17 * index) * 10**9, disk_total=100 * 10**9,
                              paths=[location.url()])
        _write(store, layout.heartbeat_name(node), heartbeat.to_json(), seen)
    return location.url()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    output = Path(arguments[0] if arguments else "docs/dashboard.png").resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="poltergust-screenshot-") as directory:
        url = sample_bucket(Path(directory) / "bucket", datetime.now(timezone.utc))
        port = _free_port()
        server = subprocess.Popen([sys.executable, "-m", "poltergust", "dashboard", "--path", url,
                                   "--port", str(port)], stdout=subprocess.DEVNULL)
        try:
            _wait_http(f"http://127.0.0.1:{port}/")
            browser = chrome(1360, 1180, "Europe/Berlin")
            try:
                browser.get(f"http://127.0.0.1:{port}/")
                browser.find_element("css selector", "table.pipelines tbody tr")
                browser.save_screenshot(str(output))
            finally:
                browser.quit()
        finally:
            server.terminate()
            server.wait(10)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
