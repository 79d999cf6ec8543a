"""One pipeline in full: its config or result, its environment, every node's log, its runs, luigid's page.

Each submission of a config is a generation, and every node that ran it left
a log under that generation; the runs' timeline comes from those logs (their
first line's time, their last write, and what the node said last), so it
covers earlier submissions too, whose result files were overwritten since.
"""
from __future__ import annotations

import asyncio
import functools
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping
from urllib.parse import quote

import aiohttp

from poltergust import layout
from poltergust.config import ConfigError, TaskSpec, parse_pipeline
from poltergust.dashboard.pipelines import LruCache, Pipeline, gather_limited, group, section_of
from poltergust.run.log_index import NodeLog, node_logs, read_log
from poltergust.storage import NotFound, ObjectInfo, ObjectStore, StorageError

MAX_GENERATIONS = 20
"""Runs shown in the timeline; older ones are left out."""
MAX_SHOWN = 512 * 1024
"""The tail of a log, or of a YAML file, shown in the page; the rest is one click away."""
STAMP = re.compile(r"^\[poltergust (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)Z\]", re.MULTILINE)
ENDINGS = (("finished locally: done", "done"), ("finished locally: error", "error"),
           ("run stopped on this node", "stopped"))


@dataclass
class NodeRun:
    """One node's part of one run, as its log tells it."""

    node: str
    object_name: str
    updated: datetime
    began: datetime | None
    outcome: str | None
    """done, error or stopped; None while it goes on."""
    claimed: bool
    """This node wrote the result."""
    parts: tuple[ObjectInfo, ...] = ()
    """The log's parts (see `log_index`)."""


@dataclass
class Run:
    """One generation of the config: one submission and what the nodes did with it."""

    generation: int
    nodes: list[NodeRun]
    current: bool
    """The config waiting or running now."""

    @property
    def began(self) -> datetime | None:
        return min((n.began for n in self.nodes if n.began), default=None)

    @property
    def ended(self) -> datetime:
        return max(n.updated for n in self.nodes)

    @property
    def outcome(self) -> str:
        claimed = [n.outcome for n in self.nodes if n.claimed and n.outcome]
        if claimed:
            return claimed[0]
        if self.current or any(n.outcome is None for n in self.nodes):
            return "running"
        return "stopped"


@dataclass
class Details:
    pipeline: Pipeline
    config_name: str
    document_text: str = ""
    """The config while it waits or runs, else the result file."""
    task: TaskSpec | None = None
    environment_url: str = ""
    environment_text: str = ""
    environment_note: str = ""
    runs: list[Run] = field(default_factory=list)
    """Newest first."""
    shown: Run | None = None
    logs: dict[str, tuple[str, int]] = field(default_factory=dict)
    """The shown run's logs by node: their text up to the last complete line, and that line's end in bytes."""
    luigi_url: str = ""


def summarise(text: str) -> tuple[datetime | None, str | None, bool]:
    """(first time stamp, how the node's part ended, whether it claimed the run) from a log."""
    first = STAMP.search(text)
    began = datetime.strptime(first.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc) if first else None
    tail = text[-4000:]
    ending = max(((tail.rfind(marker), outcome) for marker, outcome in ENDINGS), default=(-1, None))
    return began, ending[1] if ending[0] >= 0 else None, "claimed the run" in tail


class DetailsReader:
    """Reads one pipeline's page; log summaries are kept per log object generation."""

    def __init__(self, stores: dict[str, ObjectStore], scheduler_url: str = "") -> None:
        self.stores = stores
        self.scheduler_url = scheduler_url.rstrip("/")
        self._summaries: LruCache = LruCache(5_000)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def read(self, path: int, location: layout.Location, name: str, generation: int | None) -> Details | None:
        store = self.stores[location.bucket]
        objects = await store.list(f"{location.prefix}{name}.")
        found = [p for p in group(path, location.bucket, location.prefix, objects) if p.name == name]
        config_name = location.config(name)
        logs = await node_logs(store, config_name)
        if not found and not logs:
            return None
        pipeline = found[0] if found else Pipeline(path, location.bucket, name, "deleted", logs[-1].info.updated)
        details = Details(pipeline, config_name)
        current = pipeline.config.generation if pipeline.config else None
        details.runs = await self._runs(store, logs, current)
        if pipeline.config is not None:
            pipeline.nodes = [run.node for run in details.runs[0].nodes] if details.runs and \
                details.runs[0].current else []
            pipeline.state = "running" if pipeline.nodes or pipeline.finishing else "queued"
        document = pipeline.config or pipeline.result
        if document is not None:
            await self._document(details, store, location, document.name, document.generation)
        details.shown = next((run for run in details.runs if run.generation == generation), None) \
            or (details.runs[0] if details.runs else None)
        if details.shown is not None:
            texts = await gather_limited([functools.partial(self._text, store, n.parts) for n in details.shown.nodes])
            details.logs = {n.node: text for n, text in zip(details.shown.nodes, texts)}
        if self.scheduler_url and details.task is not None:
            details.luigi_url = await self.luigi_link(details.task)
        return details

    async def _runs(self, store: ObjectStore, logs: list[NodeLog], current: int | None) -> list[Run]:
        generations = sorted({log.generation for log in logs}, reverse=True)[:MAX_GENERATIONS]
        wanted = [log for log in logs if log.generation in generations]
        summaries = await gather_limited([functools.partial(self._summary, store, log) for log in wanted])
        runs = {generation: Run(generation, [], generation == current) for generation in generations}
        for log, (began, outcome, claimed) in zip(wanted, summaries):
            runs[log.generation].nodes.append(
                NodeRun(log.node, log.info.name, log.updated, began, outcome, claimed, log.parts))
        return [runs[generation] for generation in generations]

    async def _summary(self, store: ObjectStore, log: NodeLog) -> tuple[datetime | None, str | None, bool]:
        key = (log.parts[-1].name, log.parts[-1].generation)  # the part a node writes to: the only one to change
        summary = self._summaries.get_fresh(key)
        if summary is None:
            summary = summarise((await self._text(store, log.parts))[0])
            self._summaries.put(key, summary)
        return summary

    async def _text(self, store: ObjectStore, parts: tuple[ObjectInfo, ...]) -> tuple[str, int]:
        """The log's last `MAX_SHOWN` bytes up to its last complete line, and where that line ends (in the whole log).

        Only the parts holding those bytes are read.
        """
        offset = max(0, sum(part.size for part in parts) - MAX_SHOWN - 1)
        try:
            data = await read_log(store, parts, offset)
        except StorageError as exc:
            return f"(cannot read {parts[0].name}: {exc})\n", 0
        end = data.rfind(b"\n") + 1
        start = max(0, end - MAX_SHOWN)
        if offset + start:  # not the log's first byte: begin at the next line
            start = data.find(b"\n", max(0, start - 1)) + 1
        return data[start:end].decode("utf-8", errors="replace"), offset + end

    async def _document(self, details: Details, store: ObjectStore, location: layout.Location, name: str,
                        generation: int) -> None:
        try:
            data = (await store.read(name, generation)).data
        except NotFound:  # finished or replaced meanwhile: the next refresh shows the new state
            return
        except StorageError as exc:
            details.document_text = f"(cannot read {name}: {exc})"
            return
        details.document_text = data[:MAX_SHOWN].decode("utf-8", errors="replace")
        if details.pipeline.result is not None:
            details.pipeline.section = section_of(data, location.url(name))
        try:
            config = parse_pipeline(data, location.url(details.config_name))
        except ConfigError as exc:
            details.environment_note = f"the config is not valid: {exc}"
            return
        details.task = config.task
        details.environment_url = config.environment
        await self._environment(details, config.environment)

    async def _environment(self, details: Details, url: str) -> None:
        """Show the environment file, only from the dashboard's own buckets (as nodes allow by default)."""
        bucket = next((b for b in self.stores if layout.under_prefix(url, b)), None)
        if bucket is None:
            details.environment_note = "outside the buckets this dashboard reads"
            return
        name = "/".join(layout.split_url(url))[len(bucket) + 1:]
        try:
            data = (await self.stores[bucket].read(name)).data
        except NotFound:
            details.environment_note = "the file does not exist (any more)"
            return
        except StorageError as exc:
            details.environment_note = f"cannot read it: {exc}"
            return
        details.environment_text = data[:MAX_SHOWN].decode("utf-8", errors="replace")

    async def luigi_link(self, task: TaskSpec) -> str:
        """luigid's graph of the root task when luigid knows it, else its task list searched by name."""
        base = f"{self.scheduler_url}/static/visualiser/index.html"
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        query = quote(json.dumps({"task_str": task.name}))
        try:
            async with self._session.get(f"{self.scheduler_url}/api/task_search?data={query}") as response:
                found = (await response.json(content_type=None)).get("response") or {}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
            found = {}
        candidates = [(task_info.get("last_updated") or 0, task_id)
                      for by_id in found.values() if isinstance(by_id, dict)
                      for task_id, task_info in by_id.items()
                      if task_info.get("name") == task.name and _same_params(task_info.get("params"), task.arguments)]
        if candidates:
            return f"{base}#tab=graph&taskId={quote(max(candidates)[1], safe='')}"
        return f"{base}#search__search={quote(task.name, safe='')}"


def _same_params(params: Any, arguments: Mapping[str, Any]) -> bool:
    """Whether luigid's serialised parameters agree with every argument the config gives."""
    if not isinstance(params, dict):
        return False
    for key, value in arguments.items():
        have = params.get(key.replace("-", "_"))
        if have is None:
            return False
        want = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        if str(have).replace(" ", "") == want.replace(" ", ""):
            continue
        try:
            if float(have) == float(want):
                continue
        except ValueError:
            pass
        return False
    return True
