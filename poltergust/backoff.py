"""Capped, jittered exponential backoff: the one way this package waits before trying again.

Retrying at a fixed rate from many nodes hammers whatever is struggling; a
delay that doubles up to a cap, with jitter so nodes drift apart, does not.
"""
from __future__ import annotations

import asyncio
import random


class Backoff:
    """Successive delays `first`, `2*first`, ... up to `cap`, each scaled by a random factor in `jitter`."""

    def __init__(self, first: float = 1.0, cap: float = 30.0, jitter: tuple[float, float] = (0.5, 1.0)) -> None:
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self.current = first
        """The next delay before jitter."""

    def next(self) -> float:
        """The next delay to wait (jittered), advancing the sequence."""
        delay = self.current * random.uniform(*self.jitter)
        self.current = min(self.current * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.current = self.first

    async def sleep(self, stop: asyncio.Event | None = None) -> bool:
        """Wait the next delay; True if `stop` was set meanwhile (the caller should give up)."""
        delay = self.next()
        if stop is None:
            await asyncio.sleep(delay)
            return False
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return True
        except asyncio.TimeoutError:
            return False
