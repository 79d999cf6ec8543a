"""The storage contract: errors, object descriptions and the `ObjectStore` protocol both backends follow."""
from __future__ import annotations

import builtins
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Protocol

from poltergust.errors import PoltergustError

log = logging.getLogger(__name__)

TOKEN_KEY = "poltergust-token"
"""Metadata of every conditional write: a token unique to that call, so that a retry can recognise its own write."""


class StorageError(PoltergustError):
    """A storage operation failed for a reason other than the ones below."""

    after_lost_answer = False
    """Set on an answer (404, 412) to a request retried after a failure that may have taken effect unanswered
    (a timeout, a reset connection, a 5xx): the answer may be to this very request's first attempt."""


class NotFound(StorageError):
    """The object (or that generation of it) does not exist."""


class PreconditionFailed(StorageError):
    """A conditional write or delete lost: the object's generation had changed."""


class TooLarge(StorageError):
    """The object is larger than the reader accepts; nothing of it was read."""


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    generation: int
    updated: datetime
    metadata: Mapping[str, str] = field(default_factory=dict)
    size: int = 0


@dataclass(frozen=True)
class Blob:
    info: ObjectInfo
    data: bytes


class ObjectStore(Protocol):
    """What the node needs from a bucket; one instance serves one bucket."""

    async def list(self, prefix: str, *, glob: str | None = None, recursive: bool = False) -> builtins.list[ObjectInfo]:
        """Objects directly under `prefix` (or in sub-folders too, if `recursive`), optionally only names
        matching `glob` (relative to `prefix`)."""

    def pages(self, prefix: str, *, glob: str | None = None,
              recursive: bool = False) -> AsyncIterator[builtins.list[ObjectInfo]]:
        """`list`, a page at a time, so that a huge prefix is never held in memory whole."""

    async def stat(self, name: str) -> ObjectInfo: ...

    async def read(self, name: str, generation: int | None = None, *, max_bytes: int | None = None,
                   known: ObjectInfo | None = None) -> Blob:
        """One generation of an object; `TooLarge` if it exceeds `max_bytes` (having read none of it, or at
        most one byte past the limit).

        `known`: that generation as a notification or a listing described it. A store may then skip asking
        for it, but never reads more than one byte past `max_bytes` on its word (it is a hint, as events are).
        """

    async def read_to(self, name: str, path: Path, generation: int, limit: int) -> int:
        """Stream one generation of an object into the file `path` (never whole in memory).

        Writes at most `limit + 1` bytes, so a caller learns that an object is
        larger than it may be without downloading it all; returns the bytes written.
        """

    async def write(
        self, name: str, data: bytes, *, if_generation_match: int | None = None,
        metadata: Mapping[str, str] | None = None, content_type: str = "text/plain",
    ) -> ObjectInfo:
        """Write an object; with `if_generation_match`, only if its generation is that one (0: if absent).

        A conditional write carries the writer's token (metadata `TOKEN_KEY`,
        unique to the call). If a request retried after a failure that may
        have taken effect (`after_lost_answer`) meets HTTP 412, the object is
        read back: holding the token, it is this call's own write, returned
        as a success. So a lost answer never turns a won write into a lost one.
        """

    async def delete(self, name: str, *, if_generation_match: int | None = None) -> None:
        """Delete an object (only that generation, with `if_generation_match`).

        A request retried after a failure that may have taken effect that then
        meets 404 counts as done: what it was to delete is gone.
        """

    async def close(self) -> None: ...

    async def __aenter__(self) -> "ObjectStore": ...

    async def __aexit__(self, *exc: Any) -> None: ...


def conditional_metadata(metadata: Mapping[str, str] | None) -> tuple[dict[str, str], str]:
    """`metadata` with a fresh writer's token added, and the token (see `ObjectStore.write`)."""
    token = uuid.uuid4().hex
    return {**(metadata or {}), TOKEN_KEY: token}, token


async def own_write(store: ObjectStore, name: str, token: str, refused: PreconditionFailed) -> ObjectInfo:
    """The object a retried conditional write was `refused` (412) on, if it holds this writer's `token`.

    Else `refused` stands: another writer's object is there (or none is).
    """
    try:
        current = await store.stat(name)
    except NotFound:
        raise refused from None
    if current.metadata.get(TOKEN_KEY) != token:
        raise refused
    log.info("storage: %s was written by this very call (its answer was lost before a retry)", name)
    return current


class ClosingStore:
    """Makes a store an async context manager that closes itself."""

    async def close(self) -> None:
        pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
