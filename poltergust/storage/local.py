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
- a symbolic link is never followed below the directory: a linked object is
  no object (it is not listed and reads as missing; a write replaces the link
  itself), and a linked folder (`.poltergust` included) is refused, so that
  whoever can write to the directory cannot make a node read, write, lock or
  delete a file elsewhere through a name it handles.

Events for such a directory come from the file system: see `events.local`.
"""
from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import fnmatch
import json
import logging
import os
import stat
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import AsyncIterator, Mapping

from poltergust.locks import locked
from poltergust.storage.base import (
    Blob,
    ClosingStore,
    NotFound,
    ObjectInfo,
    PreconditionFailed,
    StorageError,
    TooLarge,
    conditional_metadata,
)

log = logging.getLogger(__name__)

HIDDEN = ".poltergust"
"""Per-directory folder for locks, metadata and temporary files; never listed."""
METADATA_CACHED = 100_000
NO_FOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class LinkRefused(StorageError):
    """A folder on the way to an object is a symbolic link: following it could leave the directory."""


def no_links(root: Path, directory: Path) -> None:
    """Refuse if a folder from `root` (exclusive) down to `directory` (inclusive) is a symbolic link."""
    current = root
    for part in directory.relative_to(root).parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISLNK(mode):
            raise LinkRefused(f"{current} is a symbolic link: a local bucket's folders may not be links")


def open_no_follow(path: Path, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """`os.open` that never follows a link in the last component (ELOOP reads as missing)."""
    try:
        return os.open(path, flags | NO_FOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileNotFoundError(errno.ENOENT, "a symbolic link, not an object", str(path)) from None
        raise


class LocalStore(ClosingStore):
    """`ObjectStore` on a directory; object names are paths relative to it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._metadata: dict[tuple[str, int], dict[str, str]] = {}
        """Custom metadata read, by object and generation: a generation's side file never changes, and a listing
        of thousands of results with metadata would otherwise read every side file again."""

    def _path(self, name: str) -> Path:
        """Where object `name` lies: below the (resolved) root, through no link."""
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or any(part.startswith(".") for part in parts):
            raise NotFound(f"{name}: not an object name in {self.root}")
        root = self.root.resolve()
        path = root.joinpath(*parts)
        no_links(root, path.parent)
        return path

    async def list(self, prefix: str, *, glob: str | None = None, recursive: bool = False) -> builtins.list[ObjectInfo]:
        return await asyncio.to_thread(self._list, prefix, glob, recursive)

    async def pages(self, prefix: str, *, glob: str | None = None,
                    recursive: bool = False) -> AsyncIterator[builtins.list[ObjectInfo]]:
        yield await self.list(prefix, glob=glob, recursive=recursive)

    def _list(self, prefix: str, glob: str | None, recursive: bool) -> builtins.list[ObjectInfo]:
        root = self.root.resolve()
        top = root / prefix if prefix.endswith("/") else (root / prefix).parent
        try:
            no_links(root, top)
        except LinkRefused as exc:
            log.warning("not listing %s: %s", prefix, exc)
            return []
        objects = []
        for directory, folders, files in os.walk(top):  # never into a linked folder
            folders[:] = [folder for folder in folders if not folder.startswith(".")] if recursive else []
            for file in files:
                name = os.path.relpath(os.path.join(directory, file), root)
                if (not file.startswith(".") and name.startswith(prefix)
                        and (not glob or fnmatch.fnmatchcase(name[len(prefix):], glob))):
                    with contextlib.suppress(FileNotFoundError):
                        info = os.lstat(os.path.join(directory, file))
                        if stat.S_ISREG(info.st_mode):  # a link is no object
                            objects.append(self._info(name, info))
        return sorted(objects, key=lambda info: info.name)

    async def stat(self, name: str) -> ObjectInfo:
        return await asyncio.to_thread(self._stat, name)

    def _stat(self, name: str) -> ObjectInfo:
        path = self._path(name)
        if not self._generation(path):
            raise NotFound(f"{self.root}/{name} does not exist")
        return self._info(name, os.lstat(path))

    async def read(self, name: str, generation: int | None = None, *, max_bytes: int | None = None,
                   known: ObjectInfo | None = None) -> Blob:
        return await asyncio.to_thread(self._read, name, generation, max_bytes)

    def _read(self, name: str, generation: int | None, max_bytes: int | None) -> Blob:
        path = self._path(name)
        try:
            with os.fdopen(open_no_follow(path), "rb") as handle:
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
            source = os.fdopen(open_no_follow(self._path(name)), "rb")
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
            with os.fdopen(open_no_follow(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            generation = max(time.time_ns(), current + 1)
            os.utime(temporary, ns=(generation, generation))
            if metadata:
                meta = self._metadata_path(path, generation)
                with os.fdopen(open_no_follow(meta, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w") as handle:
                    handle.write(json.dumps(dict(metadata)))
            os.replace(temporary, path)
            self._forget_metadata(path, keep=generation)
            return self._info(name, os.lstat(path))

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
            metadata_path = self._metadata_path(self.root / name, stat.st_mtime_ns)
            try:
                if os.path.islink(metadata_path.parent):
                    raise FileNotFoundError(metadata_path.parent)
                with os.fdopen(open_no_follow(metadata_path), "rb") as handle:
                    metadata = json.loads(handle.read(1 << 20))
            except (FileNotFoundError, NotADirectoryError, ValueError):
                metadata = {}
            if metadata:  # written before the object got this generation, so final once found
                if len(self._metadata) >= METADATA_CACHED:
                    self._metadata.clear()
                self._metadata[(name, stat.st_mtime_ns)] = metadata
        return ObjectInfo(name, stat.st_mtime_ns, datetime.fromtimestamp(stat.st_mtime, timezone.utc), metadata,
                          stat.st_size)

    @staticmethod
    def _generation(path: Path) -> int:
        """The object's generation; 0 when there is none (a link, or anything but a file, is none)."""
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return 0
        return info.st_mtime_ns if stat.S_ISREG(info.st_mode) else 0

    @staticmethod
    def _hidden(path: Path) -> Path:
        hidden = path.parent / HIDDEN
        with contextlib.suppress(FileExistsError):
            hidden.mkdir()
        if not stat.S_ISDIR(os.lstat(hidden).st_mode):
            raise LinkRefused(f"{hidden} is not a folder (a symbolic link?): refusing to use it")
        return hidden

    def _metadata_path(self, path: Path, generation: int) -> Path:
        return path.parent / HIDDEN / f"{path.name}.{generation}.meta.json"

    def _forget_metadata(self, path: Path, keep: int | None = None) -> None:
        for stale in self._hidden(path).glob(f"{path.name}.*.meta.json"):
            if keep is None or stale.name != f"{path.name}.{keep}.meta.json":
                stale.unlink(missing_ok=True)

    def _locked(self, path: Path) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock per object, shared by every process using the directory."""
        lock = self._hidden(path) / f"{path.name}.lock"
        if os.path.islink(lock):  # (locks open with O_NOFOLLOW too; this names the problem)
            raise LinkRefused(f"{lock} is a symbolic link: refusing to lock through it")
        return locked(lock)
