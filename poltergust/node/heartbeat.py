"""Node heartbeats: each node says, about once a minute, that it lives and what it holds.

A heartbeat is one small JSON object per node in each bucket the node watches,
`_poltergust/nodes/NODE.json` (see `layout.heartbeat_name`), outside the
notified prefix, so writing it reaches no subscription: one write per node per
interval, whatever the fleet's size. The node writes it (`beat`); the
dashboard reads it (`read_heartbeats`) to show which nodes are alive, gone
(silent for three intervals) or stopped (they said so on the way out), and
which are short of disk.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Callable, Iterable, Mapping, Protocol

from poltergust import layout
from poltergust.storage import ObjectStore, StorageError

log = logging.getLogger(__name__)

GONE_AFTER_INTERVALS = 3
"""A node silent for this many of its own intervals is shown as gone."""
LOW_DISK_FRACTION = 0.1
"""Below this share of free space a node's disk is shown as nearly full."""
FINAL_WRITE_SECONDS = 5.0
"""How long a stopping node spends at most saying so."""


class _Settings(Protocol):
    """What the heartbeat needs from the node's settings."""

    @property
    def locations(self) -> list[layout.Location]: ...
    @property
    def node_name(self) -> str: ...
    @property
    def data_dir(self) -> os.PathLike[str]: ...
    @property
    def env_dir(self) -> os.PathLike[str]: ...
    @property
    def max_concurrent(self) -> int: ...
    @property
    def heartbeat_interval(self) -> float: ...


@dataclass(frozen=True)
class Heartbeat:
    """What one node said about itself, last time."""

    node: str
    version: str
    started: datetime
    written: datetime
    interval: float
    """Seconds between this node's heartbeats, so readers know when it is overdue."""
    ready: bool = False
    """Event stream attached and first scan done."""
    runs: list[dict[str, Any]] = field(default_factory=list)
    """Runs in flight (or waiting for a slot): `{"pipeline": URL, "generation": N}`."""
    max_concurrent: int = 0
    environments_cached: int = 0
    disk_free: int = 0
    disk_total: int = 0
    paths: list[str] = field(default_factory=list)
    stopped: datetime | None = None
    """Set by a node's last heartbeat when it shuts down cleanly."""

    def to_json(self) -> bytes:
        document = asdict(self)
        for key in ("started", "written", "stopped"):
            if document[key] is not None:
                document[key] = document[key].isoformat()
        return json.dumps(document, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Heartbeat":
        """Parse a heartbeat; ValueError (with the reason) for anything that is not one."""
        try:
            document = json.loads(data)
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
            known = {name: document[name] for name in cls.__dataclass_fields__ if name in document}
            for key in ("started", "written", "stopped"):
                if known.get(key) is not None:
                    known[key] = _utc(datetime.fromisoformat(known[key]))
            heartbeat = cls(**known)
        except (TypeError, KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a heartbeat: {exc}") from None
        if not isinstance(heartbeat.runs, list):
            raise ValueError("not a heartbeat: runs is not a list")
        return heartbeat

    def status(self, now: datetime) -> str:
        """`stopped`, `gone` (silent for too long) or `alive`."""
        if self.stopped is not None:
            return "stopped"
        if (now - self.written).total_seconds() > GONE_AFTER_INTERVALS * max(self.interval, 1.0):
            return "gone"
        return "alive"

    @property
    def low_disk(self) -> bool:
        return self.disk_total > 0 and self.disk_free < LOW_DISK_FRACTION * self.disk_total


def version() -> str:
    try:
        return metadata.version("poltergust")
    except metadata.PackageNotFoundError:
        return "unknown"


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _now() -> datetime:
    return datetime.now(timezone.utc)


# -- writing (the node) --------------------------------------------------------

def _environments_cached(env_dir: os.PathLike[str]) -> int:
    """Built environments are the visible directories of the cache (locks and builds are hidden)."""
    try:
        return sum(1 for entry in os.scandir(env_dir) if entry.is_dir() and not entry.name.startswith("."))
    except FileNotFoundError:
        return 0


def _disk(path: os.PathLike[str]) -> tuple[int, int]:
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return 0, 0
    return usage.free, usage.total


def snapshot(settings: _Settings, started: datetime, runs: Iterable[tuple[str, str, int]], ready: bool,
             stopped: datetime | None = None) -> Heartbeat:
    """This node's heartbeat now; `runs` are (bucket URL, object name, generation)."""
    free, total = _disk(settings.env_dir if os.path.exists(settings.env_dir) else settings.data_dir)
    return Heartbeat(
        node=settings.node_name, version=version(), started=started, written=_now(),
        interval=settings.heartbeat_interval, ready=ready,
        runs=[{"pipeline": f"{bucket}/{name}", "generation": generation} for bucket, name, generation in runs],
        max_concurrent=settings.max_concurrent, environments_cached=_environments_cached(settings.env_dir),
        disk_free=free, disk_total=total, paths=[location.url() for location in settings.locations],
        stopped=stopped,
    )


async def beat(settings: _Settings, store: Callable[[str], ObjectStore],
               runs: Callable[[], Iterable[tuple[str, str, int]]], ready: asyncio.Event) -> None:
    """Write this node's heartbeat into every watched bucket now and every interval, until cancelled;
    then once more, saying the node stopped."""
    started = _now()
    buckets = sorted({location.bucket for location in settings.locations})
    name = layout.heartbeat_name(settings.node_name)

    async def write(heartbeat: Heartbeat) -> None:
        body = heartbeat.to_json()
        for bucket in buckets:
            try:
                await store(bucket).write(name, body, content_type="application/json")
            except (StorageError, OSError) as exc:
                log.warning("could not write the heartbeat %s/%s: %s", bucket, name, exc)

    async def last_word(in_flight: asyncio.Future[None] | None, final: Heartbeat) -> None:
        if in_flight is not None:  # a write cut short would still land, maybe after the final one
            await asyncio.gather(in_flight, return_exceptions=True)
        await write(final)

    in_flight: asyncio.Future[None] | None = None
    try:
        while True:
            in_flight = asyncio.ensure_future(write(snapshot(settings, started, runs(), ready.is_set())))
            await asyncio.shield(in_flight)
            await asyncio.sleep(settings.heartbeat_interval)
    except asyncio.CancelledError:
        final = snapshot(settings, started, (), ready.is_set(), stopped=_now())
        try:
            await asyncio.wait_for(last_word(in_flight, final), FINAL_WRITE_SECONDS)
        except asyncio.TimeoutError:
            log.warning("could not say in time that this node stopped; it will show as gone")
        raise


# -- reading (the dashboard) ---------------------------------------------------

async def read_heartbeats(stores: Mapping[str, ObjectStore]) -> tuple[list[Heartbeat], list[str]]:
    """The newest heartbeat of every node found in these buckets, by node name, plus one problem line
    per heartbeat object that could not be read or parsed."""
    found: dict[str, Heartbeat] = {}
    problems: list[str] = []
    for bucket, store in stores.items():
        try:
            listing = await store.list(layout.HEARTBEATS, glob="*.json")
        except StorageError as exc:
            problems.append(f"{bucket}/{layout.HEARTBEATS}: {exc}")
            continue
        for info in listing:
            try:
                heartbeat = Heartbeat.from_json((await store.read(info.name)).data)
            except StorageError as exc:
                problems.append(f"{bucket}/{info.name}: {exc}")
                continue
            except ValueError as exc:
                problems.append(f"{bucket}/{info.name}: {exc}")
                continue
            current = found.get(heartbeat.node)
            if current is None or heartbeat.written > current.written:
                found[heartbeat.node] = heartbeat
    return sorted(found.values(), key=lambda heartbeat: heartbeat.node), problems
