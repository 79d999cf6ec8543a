"""The node's small HTTP server: `/healthz` for load balancers and managed instance groups, `/metrics`.

Ready (200) while the node can take work: its event stream attached and not
broken, and room on the data and environment disks (`--min-free-disk`);
503 with the reason otherwise. The handler runs on the node's
own event loop, so a stalled loop does not answer at all, which a health
check counts as a failure too.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import AsyncIterator, Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)


def disk_shortage(paths: Iterable[Path], min_free: int | None) -> str | None:
    """Which of `paths` sits on a disk with less than `min_free` bytes free, if any.

    A node that cannot build environments or write logs fails every run it
    takes; reporting it unhealthy lets autohealing replace it instead.
    """
    if not min_free:
        return None
    for path in paths:
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is None:
            continue
        free = shutil.disk_usage(existing).free
        if free < min_free:
            return f"disk nearly full: {free // 2**20} MiB free for {path}, below --min-free-disk"
    return None


@contextlib.asynccontextmanager
async def health_server(problem: Callable[[], str | None], host: str, port: int) -> AsyncIterator[None]:
    """Serve /healthz (503 with `problem()` when it says something is wrong) and /metrics."""
    async def healthz(_: web.Request) -> web.Response:
        wrong = problem()
        return web.Response(status=503, text=f"{wrong}\n") if wrong else web.Response(text="ok\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("health check at http://%s:%d/healthz, metrics at /metrics", host, port)
    try:
        yield
    finally:
        await runner.cleanup()
