"""The dashboard's web server: pages rendered with Jinja2, script and styles served from the package.

Read-only by construction: it lists and reads the buckets the nodes use and
never writes. Pages refresh themselves by fetching their own URL every few
seconds; a pipeline page also follows its logs through `/api/log`.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Sequence
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from poltergust import layout
from poltergust.dashboard import charts
from poltergust.dashboard.details import DetailsReader
from poltergust.dashboard.pipelines import STATES, PipelineList
from poltergust.hosts import allowed_hosts, host_name
from poltergust.node.heartbeat import Heartbeat, read_heartbeats, version
from poltergust.run.log_index import log_parts, read_log
from poltergust.storage import NotFound, ObjectStore, StorageError, open_store

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 50
RETRY_SECONDS = 5.0
"""A person is waiting: an unreachable bucket is reported after this long, not ridden out."""
NODES_SECONDS = 2.0
SEEN_RECENTLY = 24 * 3600
"""Nodes silent for longer are left out of the nodes page."""
NODE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class Dashboard:
    """Everything the pages show, read from the stores of the given pipeline prefixes."""

    def __init__(self, paths: list[str], scheduler_url: str = "") -> None:
        self.locations = [layout.Location.parse(path) for path in paths]
        self.stores: dict[str, ObjectStore] = {}
        for location in self.locations:
            if location.bucket not in self.stores:
                self.stores[location.bucket] = open_store(location.bucket, RETRY_SECONDS)
        self.scheduler_url = scheduler_url
        self.pipelines = PipelineList(self.locations, self.stores)
        self.details = DetailsReader(self.stores, scheduler_url)
        self._nodes: tuple[float, list[Heartbeat], list[str]] | None = None
        self._nodes_lock = asyncio.Lock()

    async def nodes(self) -> tuple[list[Heartbeat], list[str]]:
        async with self._nodes_lock:
            if self._nodes is None or time.monotonic() - self._nodes[0] > NODES_SECONDS:
                found, problems = await read_heartbeats(self.stores)
                self._nodes = (time.monotonic(), found, problems)
            return self._nodes[1], self._nodes[2]

    async def close(self) -> None:
        await self.pipelines.close()
        await self.details.close()
        for store in self.stores.values():
            await store.close()


def _templates() -> jinja2.Environment:
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                     autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True,
                                     lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    environment.filters.update(ago=_ago, iso=_iso, seconds=_seconds, size=_size)
    return environment


def _iso(moment: datetime | None) -> str:
    return moment.astimezone(timezone.utc).isoformat() if moment else ""


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return ""
    seconds = max(0, int((datetime.now(timezone.utc) - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    value = max(0.0, value)
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{int(value // 60)} min {int(value % 60)} s"
    return f"{int(value // 3600)} h {int(value % 3600 // 60)} min"


def _size(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return ""


def _link(request: web.Request, changes: dict[str, Any]) -> str:
    """This page's URL with some query parameters changed (None removes one)."""
    query = {key: value for key, value in request.query.items() if key not in changes}
    query.update({key: str(value) for key, value in changes.items() if value is not None})
    return f"{request.path}?{urlencode(query)}" if query else request.path


def host_check(hosts: frozenset[str]) -> Any:
    """Refuse requests for a name the dashboard does not serve (a rebound name reads nothing)."""
    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if host_name(request.headers.get("Host", "")) not in hosts:
            raise web.HTTPForbidden(text=f"Host {request.headers.get('Host', '')!r} is not one of this dashboard's "
                                         "names (see --allowed-host)\n")
        return await handler(request)
    return check


def create_app(dashboard: Dashboard, hosts: frozenset[str] = allowed_hosts((), None)) -> web.Application:
    templates = _templates()
    app = web.Application(middlewares=[host_check(hosts)])

    def render(name: str, request: web.Request, **context: Any) -> web.Response:
        context.update(paths=[location.url() for location in dashboard.locations], version=version(),
                       now=datetime.now(timezone.utc), request=request,
                       link=lambda **changes: _link(request, changes))
        return web.Response(text=templates.get_template(name).render(**context), content_type="text/html",
                            headers={"Cache-Control": "no-store"})

    def location(request: web.Request) -> tuple[int, layout.Location]:
        try:
            index = int(request.query.get("path", "0"))
            return index, dashboard.locations[index]
        except (ValueError, IndexError):
            raise web.HTTPNotFound(text="no such path") from None

    async def overview(request: web.Request) -> web.Response:
        state = request.query.get("state") or None
        if state not in (None, *STATES):
            raise web.HTTPBadRequest(text=f"state must be one of {', '.join(STATES)}")
        try:
            number = int(request.query.get("page", "1"))
        except ValueError:
            number = 1
        query = request.query.get("q", "")
        page = await dashboard.pipelines.page(state, query, number, PAGE_SIZE)
        everything = await dashboard.pipelines.all()
        now = datetime.now(timezone.utc)
        recent = charts.recent_finished(everything, now)
        await dashboard.pipelines.read_sections(charts.unsummarised(recent))
        nodes, node_problems = await dashboard.nodes()
        return render(
            "pipelines.html", request, page=page, state=state, query=query, states=STATES,
            finished_chart=charts.svg(charts.finished_per_hour(everything, now), "Finished runs per hour",
                                      ("done", "error")),
            pickup_chart=charts.svg(charts.pickup_per_hour(recent, now), "Pickup latency per hour", ("pickup",),
                                    unit="s"),
            alive=sum(1 for node in nodes if node.status(now) == "alive"), node_count=len(nodes),
            problems=dashboard.pipelines.problems + node_problems, multiple=len(dashboard.locations) > 1,
        )

    async def pipeline(request: web.Request) -> web.Response:
        index, where = location(request)
        name = request.query.get("name", "")
        generation = request.query.get("generation")
        try:
            details = await dashboard.details.read(index, where, name, int(generation) if generation else None)
        except (StorageError, ValueError) as exc:
            return render("problem.html", request, title=name, problem=str(exc))
        if details is None:
            return render("problem.html", request, title=name, problem=f"no pipeline {name} under {where.url()}")
        return render("pipeline.html", request, d=details, p=details.pipeline, path=index, where=where,
                      scheduler_url=dashboard.scheduler_url)

    async def nodes_page(request: web.Request) -> web.Response:
        nodes, problems = await dashboard.nodes()
        now = datetime.now(timezone.utc)
        recent = [node for node in nodes if (now - node.written).total_seconds() < SEEN_RECENTLY]
        return render("nodes.html", request, nodes=recent, hidden=len(nodes) - len(recent), problems=problems)

    async def log_tail(request: web.Request) -> web.Response:
        """New complete lines of one node's log from byte `offset` on."""
        _, where = location(request)
        node = request.query.get("node", "")
        try:
            generation = int(request.query.get("generation", ""))
            offset = max(0, int(request.query.get("offset", "0")))
        except ValueError:
            raise web.HTTPBadRequest(text="generation and offset must be numbers") from None
        pipeline_name = request.query.get("name", "")
        if not NODE_NAME.fullmatch(node) or not pipeline_name or "/" in pipeline_name:
            raise web.HTTPBadRequest(text="not a node or pipeline name")
        name = f"{layout.log_prefix(where.config(pipeline_name), generation)}{node}.log.txt"
        store = dashboard.stores[where.bucket]
        try:
            parts = await log_parts(store, name)
            reset = offset > sum(part.size for part in parts)
            start = 0 if reset else offset
            data = await read_log(store, parts, start)
        except NotFound:
            return web.json_response({"text": "", "offset": 0, "reset": False})
        except StorageError as exc:
            raise web.HTTPServiceUnavailable(text=str(exc)) from None
        end = data.rfind(b"\n") + 1
        return web.json_response({"text": data[:end].decode("utf-8", errors="replace"), "offset": start + end,
                                  "reset": reset})

    app.router.add_get("/", overview)
    app.router.add_get("/pipeline", pipeline)
    app.router.add_get("/nodes", nodes_page)
    app.router.add_get("/api/log", log_tail)
    app.router.add_static("/static", HERE / "static")
    return app


@contextlib.asynccontextmanager
async def dashboard_server(paths: list[str], scheduler_url: str = "", host: str = "127.0.0.1",
                           port: int = 8090, allowed: Sequence[str] = ()) -> AsyncIterator[str]:
    """Serve the dashboard on the running loop; yields its URL. `allowed`: names besides loopback and `host`."""
    dashboard = Dashboard(paths, scheduler_url)
    runner = web.AppRunner(create_app(dashboard, allowed_hosts(allowed, host)), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        yield f"http://{host}:{port}/"
    finally:
        await runner.cleanup()
        await dashboard.close()


async def serve(paths: list[str], scheduler_url: str, host: str, port: int, allowed: Sequence[str] = ()) -> None:
    """Serve until cancelled (Ctrl-C)."""
    async with dashboard_server(paths, scheduler_url, host, port, allowed) as url:
        print(f"dashboard: {url}  (reading {', '.join(paths)})", flush=True)
        await asyncio.Event().wait()
