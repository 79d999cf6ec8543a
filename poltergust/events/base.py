"""The event contract: what a change to a config looks like, and what a node needs from an event source."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Event:
    """A change to one generation of one pipeline config."""

    kind: str  # "finalize" or "delete"
    bucket: str
    """Bucket URL, as in `Location.bucket`."""
    name: str
    generation: int
    replaced_by: int | None = None
    """For a delete caused by an overwrite: the generation that replaced this one."""


class EventSource(Protocol):
    """Where a node hears about config changes: Pub/Sub for GCS, the file system for local directories.

    `attach` starts listening and returns once no later change can be missed;
    `broken` says whether the stream has ended by itself (then close and
    attach again). Sources are async context managers that close on exit.
    """

    async def attach(self) -> None: ...

    async def get(self) -> Event: ...

    @property
    def broken(self) -> BaseException | None: ...

    async def close(self, delete: bool = False) -> None:
        """Stop listening; `delete` also removes what `attach` created for this node (a clean shutdown)."""

    async def __aenter__(self) -> "EventSource": ...

    async def __aexit__(self, *exc: Any) -> None: ...


class ClosingSource:
    """Makes an event source an async context manager that closes itself."""

    async def close(self, delete: bool = False) -> None:
        pass

    async def __aenter__(self):  # type: ignore[no-untyped-def]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
