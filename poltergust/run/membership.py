"""Who takes part in a run: one node starts it, others join only when luigid has tasks free for them.

Every node hears of every config, but starting luigi everywhere would cost
each node a luigi start and a walk of the graph per pipeline. Instead each
node tries once to create the run's `start` marker (a create-if-absent write:
exactly one succeeds); that node starts luigi. While it runs, it watches the
graph in luigid and, when tasks wait that nobody runs, publishes a call for
help; a node hearing it tries once for one of the helper places named in
the call (`helper-WAVE-I`), and the winners join. The cost per pipeline is
one extra storage write per node, and luigid hears only from nodes that
take part. A starter refreshes its marker; a marker left stale by a dead
node is taken over (a conditional rewrite) by whichever node notices first.
How long "stale" is, `--start-stale-after`, must be the same on every node:
the starter refreshes three times per window. Each of these writes carries
the writer's token, so a node whose answer was lost still wins its own write
(see `storage.base`): a lost answer never leaves a run to nobody.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import datetime, timezone
from typing import Awaitable, Callable

from poltergust.events import Event
from poltergust.layout import RunKey, run_marker
from poltergust.settings import Settings
from poltergust.storage import NotFound, ObjectInfo, ObjectStore, PreconditionFailed, StorageError

log = logging.getLogger(__name__)

REFRESHES_PER_WINDOW = 3
"""A starter rewrites its marker this many times per staleness window: a slow write or two never looks dead."""


def refresh_interval(stale_after: float) -> float:
    """How often a starter rewrites its marker to show it is alive."""
    return stale_after / REFRESHES_PER_WINDOW


async def take_start(store: ObjectStore, key: RunKey, node: str, restarted: bool = False) -> ObjectInfo | None:
    """Become the node that starts this run; None if another node did.

    A node `restarted` after a crash (the run was found by its first scan)
    also takes back a run its earlier self started, at the cost of a read.
    """
    name = run_marker(key.name, key.generation, "start")
    try:
        return await store.write(name, node.encode(), if_generation_match=0)
    except PreconditionFailed:
        if not restarted:
            return None
    try:
        marker = await store.read(name)
        if marker.data.decode(errors="replace") != node:
            return None
        return await store.write(name, node.encode(), if_generation_match=marker.info.generation)
    except (NotFound, PreconditionFailed):
        return None


async def release_start(store: ObjectStore, marker: ObjectInfo) -> None:
    """Give up starting a run (this node stops before it ended), so that another node starts it at once."""
    try:
        await store.delete(marker.name, if_generation_match=marker.generation)
    except (NotFound, PreconditionFailed):
        pass


async def refresh_start(store: ObjectStore, key: RunKey, node: str, marker: ObjectInfo) -> ObjectInfo | None:
    """Show the run's starter is alive; None if another node took the run over meanwhile."""
    try:
        return await store.write(marker.name, node.encode(), if_generation_match=marker.generation)
    except PreconditionFailed:
        return None


async def take_over_if_stale(store: ObjectStore, key: RunKey, node: str, stale_after: float) -> ObjectInfo | None:
    """Take over a run whose starter left its marker unrefreshed for `stale_after` s; None if alive (or taken)."""
    name = run_marker(key.name, key.generation, "start")
    try:
        marker = await store.stat(name)
    except NotFound:
        return await take_start(store, key, node)
    if (datetime.now(timezone.utc) - marker.updated).total_seconds() < stale_after:
        return None
    try:
        return await store.write(name, node.encode(), if_generation_match=marker.generation)
    except PreconditionFailed:
        return None


async def take_helper_place(store: ObjectStore, key: RunKey, node: str, wave: int, places: int) -> bool:
    """Try once for one of the `places` helper places of a call for help; True: join the run."""
    index = random.randrange(places)
    try:
        await store.write(run_marker(key.name, key.generation, f"helper-{wave}-{index}"), node.encode(),
                          if_generation_match=0)
        return True
    except PreconditionFailed:
        return False


CallForHelp = Callable[[RunKey, int, int], None]
"""Publishes a call for help: (run, nodes wanted, wave), in the background (the node does it)."""
TakePart = Callable[[], Awaitable[None]]
"""This node's part in a run, once membership has a slot for it."""


class Recruiting:
    """A starter's calls for help: each has its own places, and they grow rarer (every one reaches every node)."""

    FIRST_GAP = 2.0
    MAX_GAP = 60.0

    def __init__(self, limit: int | None) -> None:
        self.left = None if limit is None else limit - 1
        """Helper places still to offer (None: as many as the graph has tasks for)."""
        self.wave = 0
        self._gap = self.FIRST_GAP
        self._next = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self._next and self.left != 0

    def places(self, takeable: int) -> int:
        wanted = takeable if self.left is None else min(takeable, self.left)
        if self.left is not None:
            self.left -= wanted
        self.wave += 1
        self._next = time.monotonic() + self._gap
        self._gap = min(self._gap * 2, self.MAX_GAP)
        return wanted


class Membership:
    """This node's membership in one run: start it, or stand by for a call for help, or take over a dead start.

    `take_part` is this node's part in the run (environment, luigi, the
    result); membership decides whether and when it happens, holds one of the
    node's slots for it, and keeps the start marker of a run this node started.
    """

    def __init__(self, key: RunKey, store: ObjectStore, settings: Settings, slots: asyncio.Semaphore,
                 call_for_help: CallForHelp, found_at_start: bool = False) -> None:
        self.key = key
        self.store = store
        self.settings = settings
        self.slots = slots
        """The node's room for runs taking part; a run standing by holds none."""
        self.call_for_help = call_for_help
        self.found_at_start = found_at_start
        """Found by the node's first scan: this node may have started it before a crash."""
        self.taking_part = False
        self.helping = False
        """Took a helper place: the graph is scheduled already, this node's luigi only takes free tasks."""
        self._calls: asyncio.Queue[Event] = asyncio.Queue()
        self._recruiting: Recruiting | None = None

    @property
    def started_here(self) -> bool:
        """This node started the run (and so recruits); other nodes run luigi as assistants."""
        return self._recruiting is not None

    def hear(self, event: Event) -> None:
        """A call for help for this run."""
        self._calls.put_nowait(event)

    async def join(self, all_nodes: bool, limit: int | None, take_part: TakePart) -> None:
        """Start the run, or stand by until it wants help; `nodes: all` (`all_nodes`) starts it everywhere."""
        key, node = self.key, self.settings.node_name
        if all_nodes:
            async with self.slots:
                await self._take_part(take_part)
            return
        async with self.slots:
            marker = await take_start(self.store, key, node, restarted=self.found_at_start)
            if marker is not None:
                log.info("%s: this node starts generation %d", key.url(), key.generation)
                await self._take_part(take_part, marker, limit)
                return
        log.info("%s: started by another node; standing by to help", key.url())
        # Look at the starter's marker as often as it is refreshed: a dead starter's run waits at most that long more.
        check = min(self.settings.rescan_interval, refresh_interval(self.settings.start_stale_after))
        while True:
            try:
                call = await asyncio.wait_for(self._calls.get(), check)
            except asyncio.TimeoutError:
                if not await self._still_wanted():
                    return
                marker = await take_over_if_stale(self.store, key, node, self.settings.start_stale_after)
                if marker is not None:
                    log.warning("%s: its starting node stopped showing signs of life; taking the run over", key.url())
                    async with self.slots:
                        await self._take_part(take_part, marker, limit)
                    return
                continue
            if self.slots.locked():
                continue  # no room on this node: another node will answer
            if await take_helper_place(self.store, key, node, call.wave, call.wanted):
                log.info("%s: joining the run (call for help %d)", key.url(), call.wave)
                self.helping = True
                async with self.slots:
                    await self._take_part(take_part)
                return

    def recruit(self, takeable: int) -> None:
        """Ask other nodes to join while tasks wait that nobody runs (the starter only, with backoff)."""
        recruiting = self._recruiting
        if recruiting is None or not recruiting.due():
            return
        wanted = recruiting.places(takeable)
        if wanted:
            self.call_for_help(self.key, wanted, recruiting.wave)

    async def _still_wanted(self) -> bool:
        """Whether this generation of the config is still waiting for its result (its events may be lost)."""
        try:
            return (await self.store.stat(self.key.name)).generation == self.key.generation
        except NotFound:
            return False

    async def _take_part(self, take_part: TakePart, marker: ObjectInfo | None = None,
                         limit: int | None = None) -> None:
        """This node's part; the starter also keeps its marker, and hands the run back if stopped before the end."""
        self.taking_part = True
        refresher = asyncio.create_task(self._keep_marker(marker)) if marker is not None else None
        self._recruiting = Recruiting(limit) if marker is not None else None
        try:
            await take_part()
        except asyncio.CancelledError:
            if marker is not None:  # stopping before the end: let another node start it now
                await asyncio.shield(self._release(marker))
            raise
        finally:
            if refresher is not None:
                refresher.cancel()

    async def _release(self, marker: ObjectInfo) -> None:
        try:
            await release_start(self.store, marker)
        except StorageError as exc:
            log.warning("%s: could not release the start marker (it goes stale instead): %s", self.key.url(), exc)

    async def _keep_marker(self, marker: ObjectInfo) -> None:
        while True:
            await asyncio.sleep(refresh_interval(self.settings.start_stale_after))
            try:
                refreshed = await refresh_start(self.store, self.key, self.settings.node_name, marker)
            except StorageError as exc:
                log.warning("%s: could not refresh the start marker: %s", self.key.url(), exc)
                continue
            if refreshed is None:
                log.warning("%s: another node took this run over; both go on, one result is written", self.key.url())
                return
            marker = refreshed
