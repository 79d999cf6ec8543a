"""The event contract: what a change to a config looks like, and what a node needs from an event source."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from poltergust.storage.base import ObjectInfo

EventKind = Literal["finalize", "delete", "help"]
"""A config generation written, gone (deleted, replaced or archived), or a call for help for its run."""


@dataclass(frozen=True)
class Event:
    """A change to one generation of one pipeline config."""

    kind: EventKind
    bucket: str
    """Bucket URL, as in `Location.bucket`."""
    name: str
    generation: int
    replaced_by: int | None = None
    """For a delete caused by an overwrite: the generation that replaced this one."""
    wanted: int = 0
    """For a call for help: how many more nodes the run could use."""
    wave: int = 0
    """For a call for help: its number within the run (each call has its own helper places)."""
    info: ObjectInfo | None = None
    """For an upload: the config as the notification describes it (its size), which spares the node a request
    before it reads the config."""


class EventSource(Protocol):
    """Where a node hears about config changes: Pub/Sub for GCS, the file system for local directories.

    `attach` starts listening and returns once no later change can be missed;
    `broken` says whether the stream has ended by itself (then close and
    attach again). Sources are async context managers that close on exit.
    """

    async def attach(self) -> None: ...

    async def get(self) -> Event: ...

    async def call_for_help(self, bucket: str, name: str, generation: int, wanted: int, wave: int) -> None:
        """Tell every node that this run could use `wanted` more nodes."""

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

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
