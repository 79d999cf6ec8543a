"""The storage contract: errors, object descriptions and the `ObjectStore` protocol both backends follow."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Protocol

from poltergust.errors import PoltergustError


class StorageError(PoltergustError):
    """A storage operation failed for a reason other than the ones below."""


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

    async def list(self, prefix: str, *, glob: str | None = None, recursive: bool = False) -> list[ObjectInfo]:
        """Objects directly under `prefix` (or in sub-folders too, if `recursive`), optionally only names
        matching `glob` (relative to `prefix`)."""

    def pages(self, prefix: str, *, glob: str | None = None,
              recursive: bool = False) -> AsyncIterator[list[ObjectInfo]]:
        """`list`, a page at a time, so that a huge prefix is never held in memory whole."""

    async def stat(self, name: str) -> ObjectInfo: ...

    async def read(self, name: str, generation: int | None = None, *, max_bytes: int | None = None) -> Blob:
        """One generation of an object; `TooLarge` (before downloading it) if it exceeds `max_bytes`."""

    async def read_to(self, name: str, path: Path, generation: int, limit: int) -> int:
        """Stream one generation of an object into the file `path` (never whole in memory).

        Writes at most `limit + 1` bytes, so a caller learns that an object is
        larger than it may be without downloading it all; returns the bytes written.
        """

    async def write(
        self, name: str, data: bytes, *, if_generation_match: int | None = None,
        metadata: Mapping[str, str] | None = None, content_type: str = "text/plain",
    ) -> ObjectInfo: ...

    async def delete(self, name: str, *, if_generation_match: int | None = None) -> None: ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> "ObjectStore": ...

    async def __aexit__(self, *exc: Any) -> None: ...


class ClosingStore:
    """Makes a store an async context manager that closes itself."""

    async def close(self) -> None:
        pass

    async def __aenter__(self):  # type: ignore[no-untyped-def]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
