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
the starter refreshes three times per window.
"""
from __future__ import annotations

import random
import time
from datetime import datetime, timezone

from .layout import RunKey, run_marker
from .storage import NotFound, ObjectInfo, ObjectStore, PreconditionFailed

STALE_SECONDS = 180.0
"""By default, a start marker older than this belongs to a node that died: another node may take the run over."""
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


async def take_over_if_stale(store: ObjectStore, key: RunKey, node: str,
                             stale_after: float = STALE_SECONDS) -> ObjectInfo | None:
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
