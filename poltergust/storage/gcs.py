"""`ObjectStore` on Google Cloud Storage, through gcloud-aio-storage; honours `STORAGE_EMULATOR_HOST`.

Transient faults (5xx, 429, timeouts, dropped connections) are retried with
backoff for a bounded time, so a node rides out a storage blip instead of
failing a run; answers (404, 412) are never retried. An answer that follows a
failure which may have taken effect (timeout, reset, 5xx) may be to the first
attempt itself: conditional writes and deletes then settle it (see `base`).
"""
from __future__ import annotations

import asyncio
import builtins
import dataclasses
import fnmatch
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, TypeVar

import aiohttp
from gcloud.aio.storage import Storage as _GcsClient

from poltergust.backoff import Backoff
from poltergust.node.metrics import STORAGE_ERRORS
from poltergust.storage.base import (
    Blob,
    ClosingStore,
    NotFound,
    ObjectInfo,
    PreconditionFailed,
    StorageError,
    TooLarge,
    conditional_metadata,
    own_write,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
LIST_FIELDS = "items(name,generation,updated,timeCreated,metadata,size),nextPageToken"
"""Only what the node reads: listing a busy prefix moves a fraction of the full resources."""
PAGE_SIZE = 1000
GLOB_SPECIALS = set("*?[]{}\\!")
"""A prefix holding these would change the meaning of a `matchGlob` built from it."""


class GcsStore(ClosingStore):
    """`ObjectStore` on gcloud-aio-storage; honours `STORAGE_EMULATOR_HOST`.

    Writes always go as multipart uploads: GCS and its emulator both enforce
    `ifGenerationMatch` on those, which the claim depends on.
    """

    def __init__(self, bucket: str, *, retry_for: float = 60.0) -> None:
        self.bucket = bucket
        self._retry_for = retry_for
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        self._client = _GcsClient(session=self._session)  # type: ignore[arg-type]  # gcloud-aio wraps it

    async def list(self, prefix: str, *, glob: str | None = None, recursive: bool = False) -> builtins.list[ObjectInfo]:
        return [info async for page in self.pages(prefix, glob=glob, recursive=recursive) for info in page]

    async def pages(self, prefix: str, *, glob: str | None = None,
                    recursive: bool = False) -> AsyncIterator[builtins.list[ObjectInfo]]:
        """Objects under `prefix`, a page at a time, so a huge prefix is never held whole."""
        params: dict[str, str] = {"prefix": prefix, "fields": LIST_FIELDS, "maxResults": str(PAGE_SIZE)}
        if not recursive:
            params["delimiter"] = "/"
        if glob and not GLOB_SPECIALS & set(prefix):  # else only the filter below applies
            params["matchGlob"] = prefix + glob
        while True:
            page = await self._call(lambda: self._client.list_objects(self.bucket, params=dict(params)))
            yield [object_info(item) for item in page.get("items", [])
                   if (recursive or "/" not in item["name"][len(prefix):])
                   and (not glob or fnmatch.fnmatchcase(item["name"][len(prefix):], glob))]
            if not page.get("nextPageToken"):
                return
            params["pageToken"] = page["nextPageToken"]

    async def stat(self, name: str) -> ObjectInfo:
        return object_info(await self._call(lambda: self._client.download_metadata(self.bucket, name)))

    async def read(self, name: str, generation: int | None = None, *, max_bytes: int | None = None,
                   known: ObjectInfo | None = None) -> Blob:
        if (known is not None and generation is not None and max_bytes is not None and known.name == name
                and known.generation == generation and known.size <= max_bytes):
            # One request instead of two: the size came with the notification or the listing. Reading at
            # most one byte more than allowed shows whether that size was right.
            data = await self._read_at_most(name, generation, max_bytes + 1)
            if len(data) > max_bytes:
                raise TooLarge(f"{name} is more than the {max_bytes} bytes accepted")
            return Blob(dataclasses.replace(known, size=len(data)), data)
        params = {"alt": "json"} if generation is None else {"alt": "json", "generation": str(generation)}
        meta = json.loads(await self._call(
            lambda: self._client._download(self.bucket, name, params=dict(params))  # noqa: SLF001 -- see below
        ))
        size = int(meta.get("size", 0))
        if max_bytes is not None and size > max_bytes:
            raise TooLarge(f"{name} is {size} bytes, more than the {max_bytes} accepted")
        # The public download() cannot pin a generation, which a run must read.
        data = await self._call(
            lambda: self._client._download(  # noqa: SLF001
                self.bucket, name, params={"alt": "media", "generation": str(meta["generation"])}
            )
        )
        return Blob(object_info(meta), data[:max_bytes] if max_bytes is not None else data)

    async def _read_at_most(self, name: str, generation: int, limit: int) -> bytes:
        chunks: builtins.list[bytes] = []

        async def keep(chunk: bytes) -> None:
            chunks.append(chunk)

        async def download() -> bytes:
            chunks.clear()
            await self._stream(name, generation, limit, keep)
            return b"".join(chunks)

        return await self._call(download)

    async def read_to(self, name: str, path: Path, generation: int, limit: int) -> int:
        async def download() -> int:
            with path.open("wb") as handle:
                return await self._stream(
                    name, generation, limit + 1, lambda chunk: asyncio.to_thread(handle.write, chunk),
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=60),
                )

        return await self._call(download)

    async def _stream(self, name: str, generation: int, limit: int, take: Callable[[bytes], Awaitable[Any]],
                      **options: Any) -> int:
        """Download one generation, handing its chunks to `take`, and stop after `limit` bytes; how many taken."""
        stream = await self._client._download_stream(  # noqa: SLF001 -- the public one cannot pin a generation
            self.bucket, name, params={"alt": "media", "generation": str(generation)}, **options)
        taken = 0
        async with stream:
            while taken < limit:
                chunk = await stream.read(min(1 << 20, limit - taken))
                if not chunk:
                    break
                await take(chunk)
                taken += len(chunk)
        return taken

    async def write(
        self, name: str, data: bytes, *, if_generation_match: int | None = None,
        metadata: Mapping[str, str] | None = None, content_type: str = "text/plain",
    ) -> ObjectInfo:
        parameters = {} if if_generation_match is None else {"ifGenerationMatch": str(if_generation_match)}
        token = None
        if if_generation_match is not None:
            metadata, token = conditional_metadata(metadata)
        # gcloud-aio turns "Content-Type" into the resource's "contentType".
        resource: dict[str, Any] = {"Content-Type": content_type, "metadata": dict(metadata or {})}
        try:
            result = await self._call(
                lambda: self._client.upload(
                    self.bucket, name, data, content_type=content_type,
                    parameters=dict(parameters), metadata=resource, force_resumable_upload=False,
                )
            )
        except PreconditionFailed as refused:
            if token is None or not refused.after_lost_answer:
                raise
            return await own_write(self, name, token, refused)
        return object_info(result)

    async def delete(self, name: str, *, if_generation_match: int | None = None) -> None:
        params = {} if if_generation_match is None else {"ifGenerationMatch": str(if_generation_match)}
        try:
            await self._call(lambda: self._client.delete(self.bucket, name, params=dict(params)))
        except NotFound as gone:
            if not gone.after_lost_answer:
                raise
            log.info("storage: %s is gone after a retried delete (its first answer was lost)", name)

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
    backoff = Backoff(first=0.2, cap=10.0)
    lost_answer = False
    while True:
        try:
            return await operation()
        except Exception as exc:  # noqa: BLE001 -- classified just below
            error = translate(exc)
            if isinstance(error, (NotFound, PreconditionFailed)):
                error.after_lost_answer = lost_answer
                raise error from exc  # answers, not faults
            lost_answer = lost_answer or _may_have_taken_effect(exc)
            STORAGE_ERRORS.labels(type(exc).__name__).inc()
            delay = backoff.next()
            if not _is_transient(exc) or loop.time() + delay > deadline:
                raise error from exc
            log.warning("storage: %s; retrying in %.1fs", error, delay)
            await asyncio.sleep(delay)


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, aiohttp.ClientResponseError):
        return exc.status in (408, 429) or exc.status >= 500
    return isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError))


def _may_have_taken_effect(exc: Exception) -> bool:
    """Whether a failed request may have been carried out, unanswered: all but refused connections and 408/429."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return exc.status not in (408, 429)
    return not isinstance(exc, aiohttp.ClientConnectorError)


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, aiohttp.ClientResponseError):
        if exc.status == 404:
            return NotFound(f"not found ({exc.request_info.url.path})")
        if exc.status == 412:
            return PreconditionFailed("generation changed (HTTP 412)")
        return StorageError(f"HTTP {exc.status}: {exc.message.splitlines()[0][:200] if exc.message else ''}")
    return StorageError(f"{type(exc).__name__}: {exc}")


def object_info(resource: Mapping[str, Any]) -> ObjectInfo:
    """An object resource of GCS's JSON API (an answer, an item of a listing, a notification's payload)."""
    updated = resource.get("updated") or resource.get("timeCreated")
    return ObjectInfo(
        name=resource["name"],
        generation=int(resource["generation"]),
        updated=_timestamp(updated) if updated else datetime.now(timezone.utc),
        metadata=dict(resource.get("metadata") or {}),
        size=int(resource.get("size") or 0),
    )


def _timestamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
