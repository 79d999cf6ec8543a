"""`ObjectStore` on a local directory: a directory behaves like a bucket.

Same semantics as GCS, so that nodes sharing a directory on one machine act
exactly like nodes sharing a bucket:

- writes are atomic (temporary file, then rename);
- every object has a generation (its modification time in nanoseconds; our
  own writes make it strictly increasing);
- conditional writes and deletes hold an exclusive lock on the object while
  they compare generations, so two nodes cannot both claim a run;
- custom metadata lives in a hidden side file named after the generation;
- conditional writes carry the writer's token, as on GCS; a local call is
  never retried, so it never meets its own earlier write (see `base`).

Events for such a directory come from the file system: see `events.local`.
"""
from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import AsyncIterator, Mapping

from poltergust.locks import locked
from poltergust.storage.base import (
    Blob, ClosingStore, NotFound, ObjectInfo, PreconditionFailed, TooLarge, conditional_metadata,
)

log = logging.getLogger(__name__)

HIDDEN = ".poltergust"
"""Per-directory folder for locks, metadata and temporary files; never listed."""
METADATA_CACHED = 100_000


class LocalStore(ClosingStore):
    """`ObjectStore` on a directory; object names are paths relative to it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._metadata: dict[tuple[str, int], dict[str, str]] = {}
        """Custom metadata read, by object and generation: a generation's side file never changes, and a listing
        of thousands of results with metadata would otherwise read every side file again."""

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if self.root.resolve() not in path.parents or any(part.startswith(".") for part in Path(name).parts):
            raise NotFound(f"{name}: not an object name in {self.root}")
        return path

    async def list(self, prefix: str, *, glob: str | None = None, recursive: bool = False) -> list[ObjectInfo]:
        return await asyncio.to_thread(self._list, prefix, glob, recursive)

    async def pages(self, prefix: str, *, glob: str | None = None,
                    recursive: bool = False) -> AsyncIterator[list[ObjectInfo]]:
        yield await self.list(prefix, glob=glob, recursive=recursive)

    def _list(self, prefix: str, glob: str | None, recursive: bool) -> list[ObjectInfo]:
        top = self.root / prefix if prefix.endswith("/") else (self.root / prefix).parent
        objects = []
        for directory, folders, files in os.walk(top):
            folders[:] = [folder for folder in folders if not folder.startswith(".")] if recursive else []
            for file in files:
                name = os.path.relpath(os.path.join(directory, file), self.root)
                if (not file.startswith(".") and name.startswith(prefix)
                        and (not glob or fnmatch.fnmatchcase(name[len(prefix):], glob))):
                    with contextlib.suppress(FileNotFoundError):
                        objects.append(self._info(name, os.stat(os.path.join(directory, file))))
        return sorted(objects, key=lambda info: info.name)

    async def stat(self, name: str) -> ObjectInfo:
        return await asyncio.to_thread(self._stat, name)

    def _stat(self, name: str) -> ObjectInfo:
        try:
            return self._info(name, self._path(name).stat())
        except FileNotFoundError:
            raise NotFound(f"{self.root}/{name} does not exist") from None

    async def read(self, name: str, generation: int | None = None, *, max_bytes: int | None = None) -> Blob:
        return await asyncio.to_thread(self._read, name, generation, max_bytes)

    def _read(self, name: str, generation: int | None, max_bytes: int | None) -> Blob:
        path = self._path(name)
        try:
            with path.open("rb") as handle:
                info = self._info(name, os.fstat(handle.fileno()))
                if generation is not None and info.generation != generation:
                    raise NotFound(f"{self.root}/{name} generation {generation} no longer exists")
                if max_bytes is not None and info.size > max_bytes:
                    raise TooLarge(f"{name} is {info.size} bytes, more than the {max_bytes} accepted")
                return Blob(info, handle.read(max_bytes if max_bytes is not None else -1))
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"{self.root}/{name} does not exist") from None

    async def read_to(self, name: str, path: Path, generation: int, limit: int) -> int:
        return await asyncio.to_thread(self._read_to, name, path, generation, limit)

    def _read_to(self, name: str, destination: Path, generation: int, limit: int) -> int:
        try:
            source = self._path(name).open("rb")
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"{self.root}/{name} does not exist") from None
        with source, destination.open("wb") as target:
            if self._info(name, os.fstat(source.fileno())).generation != generation:
                raise NotFound(f"{self.root}/{name} generation {generation} no longer exists")
            written = 0
            while written <= limit:
                chunk = source.read(min(1 << 20, limit + 1 - written))
                if not chunk:
                    break
                target.write(chunk)
                written += len(chunk)
            return written

    async def write(
        self, name: str, data: bytes, *, if_generation_match: int | None = None,
        metadata: Mapping[str, str] | None = None, content_type: str = "text/plain",
    ) -> ObjectInfo:
        if if_generation_match is not None:
            metadata, _ = conditional_metadata(metadata)
        return await asyncio.to_thread(self._write, name, data, if_generation_match, metadata)

    def _write(self, name: str, data: bytes, match: int | None, metadata: Mapping[str, str] | None) -> ObjectInfo:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(path):
            current = self._generation(path)
            if match is not None and match != current:
                raise PreconditionFailed(f"{name}: generation is {current}, not {match}")
            temporary = self._hidden(path) / f"tmp-{uuid.uuid4().hex}"
            with temporary.open("wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            generation = max(time.time_ns(), current + 1)
            os.utime(temporary, ns=(generation, generation))
            if metadata:
                self._metadata_path(path, generation).write_text(json.dumps(dict(metadata)))
            os.replace(temporary, path)
            self._forget_metadata(path, keep=generation)
            return self._info(name, path.stat())

    async def delete(self, name: str, *, if_generation_match: int | None = None) -> None:
        await asyncio.to_thread(self._delete, name, if_generation_match)

    def _delete(self, name: str, match: int | None) -> None:
        path = self._path(name)
        with self._locked(path):
            current = self._generation(path)
            if current == 0:
                raise NotFound(f"{self.root}/{name} does not exist")
            if match is not None and match != current:
                raise PreconditionFailed(f"{name}: generation is {current}, not {match}")
            path.unlink()
            self._forget_metadata(path)

    # -- helpers -----------------------------------------------------------

    def _info(self, name: str, stat: os.stat_result) -> ObjectInfo:
        metadata = self._metadata.get((name, stat.st_mtime_ns))
        if metadata is None:
            try:
                metadata = json.loads(self._metadata_path(self.root / name, stat.st_mtime_ns).read_text())
            except (FileNotFoundError, ValueError):
                metadata = {}
            if metadata:  # written before the object got this generation, so final once found
                if len(self._metadata) >= METADATA_CACHED:
                    self._metadata.clear()
                self._metadata[(name, stat.st_mtime_ns)] = metadata
        return ObjectInfo(name, stat.st_mtime_ns, datetime.fromtimestamp(stat.st_mtime, timezone.utc), metadata,
                          stat.st_size)

    @staticmethod
    def _generation(path: Path) -> int:
        try:
            return path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    @staticmethod
    def _hidden(path: Path) -> Path:
        hidden = path.parent / HIDDEN
        hidden.mkdir(exist_ok=True)
        return hidden

    def _metadata_path(self, path: Path, generation: int) -> Path:
        return path.parent / HIDDEN / f"{path.name}.{generation}.meta.json"

    def _forget_metadata(self, path: Path, keep: int | None = None) -> None:
        for stale in self._hidden(path).glob(f"{path.name}.*.meta.json"):
            if keep is None or stale.name != f"{path.name}.{keep}.meta.json":
                stale.unlink(missing_ok=True)

    def _locked(self, path: Path) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock per object, shared by every process using the directory."""
        return locked(self._hidden(path) / f"{path.name}.lock")
