"""The pipeline list: every pipeline under the prefixes with its state, read with narrow listings.

One listing per prefix, of the objects directly under it and only configs and
results (`delimiter=/` and a `matchGlob`, as GCS offers them), gives every
pipeline's state but the running/queued split; that comes from the logs of
each waiting config's generation (a node uploads its log as it starts). The
listing is shared by every viewer for a couple of seconds, so ten people
watching cost what one does; after that, while it is less than a minute old,
a page is drawn from it at once and a new listing is made in the background
for the next (pages refresh themselves every few seconds), so nobody waits
for a listing while watching. A finished pipeline's columns come with the
listing too, as its result object's metadata (`run.summary`); only a result
written before that is read, once, when it is on screen (or in the chart):
a result file's generation never changes.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Iterable, TypeVar

import yaml

from poltergust import layout
from poltergust.config import MAX_FILE_SIZE, ConfigError, load_yaml
from poltergust.run import claim
from poltergust.run.log_index import node_logs
from poltergust.run.summary import moment, summary_from_metadata
from poltergust.storage import ObjectInfo, ObjectStore, StorageError

T = TypeVar("T")
STATES = ("queued", "running", "done", "error")
SNAPSHOT_SECONDS = 2.0
"""How long one listing serves every viewer."""
HELD_SECONDS = 60.0
"""A listing older than this is not shown: the page waits for a new one (nobody has watched for a while)."""
CONCURRENT_READS = 16
SECTION_LIMIT = 16 * 1024
RESULT_LIMIT = 2 * MAX_FILE_SIZE
"""A result file holds its config (at most MAX_FILE_SIZE) and the node's section: larger is not a node's."""


@dataclass
class Pipeline:
    """One pipeline name under one prefix, as the listing and its result file show it."""

    path: int
    """Index of its prefix among the dashboard's `--path`s."""
    bucket: str
    name: str
    state: str
    updated: datetime
    """Time of its newest object: submission while waiting or running, the result's write once finished."""
    config: ObjectInfo | None = None
    result: ObjectInfo | None = None
    nodes: list[str] = field(default_factory=list)
    """Nodes running the config's current generation."""
    section: dict[str, Any] = field(default_factory=dict)
    """The result's `poltergust:` section: its summary from the listing, or the file's once read."""

    @property
    def finishing(self) -> str | None:
        """The outcome a node has claimed but not yet written as a result file."""
        return claim.claimed_outcome(self.config.metadata) if self.config else None

    @property
    def submitted(self) -> datetime | None:
        return self.config.updated if self.config else moment(self.section.get("submitted"))

    @property
    def started(self) -> datetime | None:
        return None if self.config else moment(self.section.get("started"))

    @property
    def finished(self) -> datetime | None:
        return None if self.config else moment(self.section.get("finished"))

    @property
    def duration(self) -> float | None:
        value = None if self.config else self.section.get("duration_seconds")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def pickup(self) -> float | None:
        """Seconds from submission until the finishing node started the run."""
        submitted, started = self.submitted, self.started
        return (started - submitted).total_seconds() if submitted and started else None

    @property
    def reason(self) -> str:
        return str(self.section.get("reason") or self.section.get("unreadable") or "") if self.result else ""


@dataclass
class Page:
    rows: list[Pipeline]
    listed: datetime
    """When the listing the page is drawn from was made."""
    matching: int
    """Pipelines matching the filter, over all pages."""
    counts: dict[str, int]
    """Pipelines by state, unfiltered."""
    number: int
    pages: int


class LruCache(OrderedDict):
    """A bounded mapping that forgets the least recently used entries."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_fresh(self, key: Any) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


async def gather_limited(calls: Iterable[Callable[[], Awaitable[T]]], limit: int = CONCURRENT_READS) -> list[T]:
    """Run the calls concurrently, at most `limit` at once, in order."""
    semaphore = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with semaphore:
            return await call()

    return await asyncio.gather(*(one(call) for call in calls))


def group(path: int, bucket: str, prefix: str, objects: Iterable[ObjectInfo]) -> list[Pipeline]:
    """One `Pipeline` per name; a config makes it waiting, else the newer of its results decides."""
    found: dict[str, dict[str, ObjectInfo]] = {}
    for info in objects:
        split = layout.split_pipeline_object(info.name, prefix)
        if split is not None:
            found.setdefault(split[0], {})[split[1]] = info
    pipelines = []
    for name, kinds in found.items():
        config = kinds.get("config")
        if config is not None:
            pipelines.append(Pipeline(path, bucket, name, "queued", config.updated, config=config))
            continue
        state, result = max(((state, kinds[state]) for state in ("done", "error") if state in kinds),
                            key=lambda pair: pair[1].updated)
        pipelines.append(Pipeline(path, bucket, name, state, result.updated, result=result,
                                  section=summary_from_metadata(result.metadata)))
    return pipelines


class PipelineList:
    """Every pipeline under the dashboard's prefixes, refreshed at most every `SNAPSHOT_SECONDS`."""

    def __init__(self, locations: list[layout.Location], stores: dict[str, ObjectStore]) -> None:
        self.locations = locations
        self.stores = stores
        self._snapshot: tuple[float, datetime, list[Pipeline]] | None = None
        self._refreshing: asyncio.Lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        self._sections: LruCache = LruCache(50_000)
        self.problems: list[str] = []
        """Prefixes that could not be listed at the last refresh."""

    async def all(self) -> list[Pipeline]:
        return (await self.snapshot())[1]

    async def snapshot(self) -> tuple[datetime, list[Pipeline]]:
        """The pipelines and when they were listed: the held listing while it is fresh enough (see the module)."""
        held = self._snapshot
        if held is not None and time.monotonic() - held[0] <= HELD_SECONDS:
            if time.monotonic() - held[0] > SNAPSHOT_SECONDS and (self._background is None or self._background.done()):
                self._background = asyncio.create_task(self._refresh(SNAPSHOT_SECONDS))
            return held[1], held[2]
        await self._refresh(HELD_SECONDS)
        assert self._snapshot is not None
        return self._snapshot[1], self._snapshot[2]

    async def _refresh(self, older_than: float) -> None:
        async with self._refreshing:  # one listing at a time; whoever waited finds it made
            if self._snapshot is None or time.monotonic() - self._snapshot[0] > older_than:
                listed = datetime.now(timezone.utc)
                self._snapshot = (time.monotonic(), listed, await self._list())

    async def close(self) -> None:
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background

    async def _list(self) -> list[Pipeline]:
        pipelines: list[Pipeline] = []
        problems = []
        for index, location in enumerate(self.locations):
            store = self.stores[location.bucket]
            try:
                objects = await store.list(location.prefix, glob="*.yaml")
            except StorageError as exc:
                problems.append(f"{location.url()}: {exc}")
                continue
            pipelines.extend(group(index, location.bucket, location.prefix, objects))
        waiting = [pipeline for pipeline in pipelines if pipeline.config is not None]
        await gather_limited([functools.partial(self._find_nodes, pipeline) for pipeline in waiting])
        pipelines.sort(key=lambda pipeline: (pipeline.updated, pipeline.name), reverse=True)
        self.problems = problems
        return pipelines

    async def _find_nodes(self, pipeline: Pipeline) -> None:
        assert pipeline.config is not None
        try:
            logs = await node_logs(self.stores[pipeline.bucket], pipeline.config.name, pipeline.config.generation)
        except StorageError:
            return
        pipeline.nodes = [log.node for log in logs]
        if pipeline.nodes or pipeline.finishing:
            pipeline.state = "running"

    async def page(self, state: str | None, query: str, number: int, size: int) -> Page:
        listed, pipelines = await self.snapshot()
        counts = {name: 0 for name in STATES}
        for pipeline in pipelines:
            counts[pipeline.state] += 1
        needle = query.strip().lower()
        matching = [p for p in pipelines if (state is None or p.state == state) and needle in p.name.lower()]
        pages = max(1, -(-len(matching) // size))
        number = min(max(1, number), pages)
        rows = matching[(number - 1) * size: number * size]
        await self.read_sections(rows)
        return Page(rows, listed, len(matching), counts, number, pages)

    async def read_sections(self, pipelines: list[Pipeline]) -> None:
        """Fill the result section of finished pipelines the listing has no summary of, reading each file once."""
        await gather_limited([functools.partial(self._read_section, pipeline) for pipeline in pipelines
                              if pipeline.result is not None and not pipeline.section])

    async def _read_section(self, pipeline: Pipeline) -> None:
        assert pipeline.result is not None
        key = (pipeline.bucket, pipeline.result.name, pipeline.result.generation)
        section = self._sections.get_fresh(key)
        if section is None:
            section = await self._fetch_section(pipeline.bucket, pipeline.result)
            self._sections.put(key, section)
        pipeline.section = section

    async def _fetch_section(self, bucket: str, result: ObjectInfo) -> dict[str, Any]:
        try:
            blob = await self.stores[bucket].read(result.name, result.generation, max_bytes=RESULT_LIMIT)
        except StorageError as exc:
            return {"unreadable": str(exc)}
        return section_of(blob.data, f"{bucket}/{result.name}")


def section_of(data: bytes, source: str) -> dict[str, Any]:
    """The `poltergust:` section of a result file, without the log tail (the page shows the logs).

    Nodes write that section last and the log tail last in it, so only that
    slice is parsed when it can be found, with libyaml when there is one: the
    list reads hundreds of these. Anyone who can write to the bucket can write
    a result file, so the slice and the whole file get the limits configs get
    (a 672-byte alias bomb would otherwise take the process's memory).
    """
    start = data.rfind(b"\npoltergust:\n")
    end = data.find(b"\n  log_tail:", start)
    piece = data[start + 1:end if end > 0 else None] if start >= 0 else b""
    try:
        document = load_yaml(piece, source, fast=True) if 0 < len(piece) <= SECTION_LIMIT else {}
    except ConfigError:
        document = {}
    if not isinstance(document, dict):
        document = {}
    if not isinstance(document.get("poltergust"), dict):
        try:
            document = load_yaml(data, source)
        except (ConfigError, yaml.YAMLError) as exc:
            return {"unreadable": str(exc)}
    section = document.get("poltergust")
    if not isinstance(section, dict):
        return {"unreadable": "no poltergust section"}
    return {key: value for key, value in section.items() if key != "log_tail"}
