"""Object storage: the few operations the claim protocol needs, on GCS.

Every object carries a generation, and writes and deletes can be made
conditional on it. That is what lets many nodes race to finish a run with
exactly one winner: see `results.py`.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Protocol, TypeVar
from urllib.parse import urlparse

import aiohttp
from gcloud.aio.storage import Storage as _GcsClient

from .metrics import STORAGE_ERRORS

log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(Exception):
    """A storage operation failed for a reason other than the ones below."""


class NotFound(StorageError):
    """The object (or that generation of it) does not exist."""


class PreconditionFailed(StorageError):
    """A conditional write or delete lost: the object's generation had changed."""


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    generation: int
    updated: datetime
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Blob:
    info: ObjectInfo
    data: bytes


@dataclass(frozen=True)
class Location:
    """A pipeline prefix: `gs://bucket/pipeline`, or a local `file:///dir/pipeline` (or plain path).

    A local directory's parent plays the bucket, so environment files beside
    the pipeline directory resolve as they would in a bucket.
    """

    bucket: str
    """Bucket URL: `gs://NAME`, or `file:///ABSOLUTE/DIR`."""
    prefix: str
    """Object-name prefix, always ending in `/` (or empty for a bucket root)."""

    @classmethod
    def parse(cls, url: str) -> "Location":
        bucket, name = split_url(url)
        name = name.strip("/")
        return cls(bucket, f"{name}/" if name else "")

    @property
    def bucket_path(self) -> str:
        """The directory of a local bucket."""
        return self.bucket[len("file://"):]

    def url(self, name: str = "") -> str:
        return f"{self.bucket}/{name or self.prefix}".rstrip("/")


def split_url(url: str) -> tuple[str, str]:
    """Split an object URL into bucket URL and object name; plain paths are local files."""
    parsed = urlparse(url)
    if parsed.scheme == "gs":
        if not parsed.netloc:
            raise ValueError(f"{url}: expected gs://BUCKET/PATH")
        return f"gs://{parsed.netloc}", parsed.path.lstrip("/")
    if parsed.scheme not in ("", "file"):
        raise ValueError(f"{url}: expected gs://BUCKET/PATH, file:///PATH or a local path")
    path = Path(parsed.path if parsed.scheme else url).expanduser().resolve()
    return f"file://{path.parent}", path.name


def open_store(bucket: str, retry_for: float = 60.0) -> "ObjectStore":
    """The store for a bucket URL from `split_url` or `Location.bucket`.

    `retry_for` bounds how long transient GCS faults are retried: long for
    nodes, which must ride out outages, short for the interactive CLI.
    """
    if bucket.startswith("gs://"):
        return GcsStore(bucket[len("gs://"):], retry_for=retry_for)
    from .localdir import LocalStore

    return LocalStore(Path(bucket[len("file://"):]))


class ObjectStore(Protocol):
    """What the node needs from a bucket; one instance serves one bucket."""

    async def list(self, prefix: str, *, delimiter: str | None = None,
                   match_glob: str | None = None) -> list[ObjectInfo]:
        """Objects whose names start with `prefix`; with `delimiter="/"` only those directly under it,
        with `match_glob` only names matching it (GCS `matchGlob` syntax: `*` stops at `/`)."""
        ...

    async def stat(self, name: str) -> ObjectInfo: ...

    async def read(self, name: str, generation: int | None = None) -> Blob: ...

    async def write(
        self, name: str, data: bytes, *, if_generation_match: int | None = None,
        metadata: Mapping[str, str] | None = None, content_type: str = "text/plain",
    ) -> ObjectInfo: ...

    async def delete(self, name: str, *, if_generation_match: int | None = None) -> None: ...

    async def close(self) -> None: ...


class GcsStore:
    """`ObjectStore` on gcloud-aio-storage; honours `STORAGE_EMULATOR_HOST`.

    Writes always go as multipart uploads: GCS and its emulator both enforce
    `ifGenerationMatch` on those, which the claim depends on.
    """

    def __init__(self, bucket: str, *, retry_for: float = 60.0) -> None:
        self.bucket = bucket
        self._retry_for = retry_for
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        self._client = _GcsClient(session=self._session)

    async def list(self, prefix: str, *, delimiter: str | None = None,
                   match_glob: str | None = None) -> list[ObjectInfo]:
        objects: list[ObjectInfo] = []
        params: dict[str, str] = {"prefix": prefix}
        if delimiter:
            params["delimiter"] = delimiter
        if match_glob:
            params["matchGlob"] = match_glob
        while True:
            page = await self._call(lambda: self._client.list_objects(self.bucket, params=dict(params)))
            objects.extend(_info(item) for item in page.get("items", []))
            if not page.get("nextPageToken"):
                # Filtered here too: the emulator ignores matchGlob.
                return [info for info in objects if listed(info.name, prefix, delimiter, match_glob)]
            params["pageToken"] = page["nextPageToken"]

    async def stat(self, name: str) -> ObjectInfo:
        return _info(await self._call(lambda: self._client.download_metadata(self.bucket, name)))

    async def read(self, name: str, generation: int | None = None) -> Blob:
        if generation is None:
            meta = await self._call(lambda: self._client.download_metadata(self.bucket, name))
            generation = int(meta["generation"])
        else:
            meta = await self._call(
                lambda: self._client._download(  # noqa: SLF001 -- the public download() cannot pin a generation
                    self.bucket, name, params={"alt": "json", "generation": str(generation)}
                )
            )
            meta = json.loads(meta)
        data = await self._call(
            lambda: self._client._download(  # noqa: SLF001 -- as above
                self.bucket, name, params={"alt": "media", "generation": str(generation)}
            )
        )
        return Blob(_info(meta), data)

    async def write(
        self, name: str, data: bytes, *, if_generation_match: int | None = None,
        metadata: Mapping[str, str] | None = None, content_type: str = "text/plain",
    ) -> ObjectInfo:
        parameters = {} if if_generation_match is None else {"ifGenerationMatch": str(if_generation_match)}
        # gcloud-aio turns "Content-Type" into the resource's "contentType".
        resource: dict[str, Any] = {"Content-Type": content_type, "metadata": dict(metadata or {})}
        result = await self._call(
            lambda: self._client.upload(
                self.bucket, name, data, content_type=content_type,
                parameters=dict(parameters), metadata=resource, force_resumable_upload=False,
            )
        )
        return _info(result)

    async def delete(self, name: str, *, if_generation_match: int | None = None) -> None:
        params = {} if if_generation_match is None else {"ifGenerationMatch": str(if_generation_match)}
        await self._call(lambda: self._client.delete(self.bucket, name, params=dict(params)))

    async def close(self) -> None:
        await self._session.close()

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one request, retrying transient faults with capped, jittered backoff."""
        return await retry_transient(operation, self._retry_for, _translate)


async def retry_transient(
    operation: Callable[[], Awaitable[T]], retry_for: float,
    translate: Callable[[Exception], Exception],
) -> T:
    """Retry `operation` while it fails transiently, for at most `retry_for` seconds.

    A node must not fail a run because the storage API blinked; only a fault
    that outlasts `retry_for` is reported (as the translated error).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_for
    delay = 0.2
    while True:
        try:
            return await operation()
        except Exception as exc:  # noqa: BLE001 -- classified just below
            error = translate(exc)
            if isinstance(error, (NotFound, PreconditionFailed)):
                raise error from exc  # answers, not faults
            STORAGE_ERRORS.labels(type(exc).__name__).inc()
            transient = _is_transient(exc)
            if not transient or loop.time() + delay > deadline:
                raise error from exc
            log.warning("storage: %s; retrying in %.1fs", error, delay)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 10.0)


def listed(name: str, prefix: str, delimiter: str | None, match_glob: str | None) -> bool:
    """Whether a listing with these options includes `name` (client-side, as GCS decides it)."""
    if not name.startswith(prefix) or (delimiter and delimiter in name[len(prefix):]):
        return False
    return match_glob is None or _glob(match_glob).fullmatch(name) is not None


@functools.lru_cache(maxsize=64)
def _glob(pattern: str) -> re.Pattern[str]:
    """The part of GCS `matchGlob` we use, as a regular expression: `**` any text, `*` and `?`
    within one `/` segment, `{a,b}` alternatives; every other character stands for itself."""
    out = []
    for part in re.split(r"(\*\*|\*|\?|\{[^{}]*\})", pattern):
        if part in ("**", "*", "?"):
            out.append({"**": ".*", "*": "[^/]*", "?": "[^/]"}[part])
        elif part.startswith("{") and part.endswith("}"):
            out.append("(?:" + "|".join(re.escape(choice) for choice in part[1:-1].split(",")) + ")")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out), re.DOTALL)


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, aiohttp.ClientResponseError):
        return exc.status in (408, 429) or exc.status >= 500
    return isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError))


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, aiohttp.ClientResponseError):
        if exc.status == 404:
            return NotFound(f"not found ({exc.request_info.url.path})")
        if exc.status == 412:
            return PreconditionFailed("generation changed (HTTP 412)")
        return StorageError(f"HTTP {exc.status}: {exc.message.splitlines()[0][:200] if exc.message else ''}")
    return StorageError(f"{type(exc).__name__}: {exc}")


def _info(resource: Mapping[str, Any]) -> ObjectInfo:
    updated = resource.get("updated") or resource.get("timeCreated")
    return ObjectInfo(
        name=resource["name"],
        generation=int(resource["generation"]),
        updated=_timestamp(updated) if updated else datetime.now(timezone.utc),
        metadata=dict(resource.get("metadata") or {}),
    )


def _timestamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
