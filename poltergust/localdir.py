"""The local directory backend: a directory behaves like a bucket.

Same semantics as GCS, so that nodes sharing a directory on one machine act
exactly like nodes sharing a bucket:

- writes are atomic (temporary file, then rename);
- every object has a generation (its modification time in nanoseconds; our
  own writes make it strictly increasing);
- conditional writes and deletes hold an exclusive lock on the object while
  they compare generations, so two nodes cannot both claim a run;
- custom metadata lives in a hidden side file named after the generation;
- events come from the file system (inotify through watchfiles) and carry the
  generation that was replaced or deleted, as GCS notifications do.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Mapping

import watchfiles

from .events import Event, is_config_name
from .storage import Blob, Location, NotFound, ObjectInfo, PreconditionFailed, listed

log = logging.getLogger(__name__)

HIDDEN = ".poltergust"
"""Per-directory folder for locks, metadata and temporary files; never listed."""


class LocalStore:
    """`ObjectStore` on a directory; object names are paths relative to it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if self.root.resolve() not in path.parents or any(part.startswith(".") for part in Path(name).parts):
            raise NotFound(f"{name}: not an object name in {self.root}")
        return path

    async def list(self, prefix: str, *, delimiter: str | None = None,
                   match_glob: str | None = None) -> list[ObjectInfo]:
        """As on GCS: every object under `prefix`, or with `delimiter="/"` only those directly under it."""
        if delimiter not in (None, "/"):
            raise ValueError(f"delimiter {delimiter!r}: a local directory only knows '/'")
        return await asyncio.to_thread(self._list, prefix, delimiter, match_glob)

    def _list(self, prefix: str, delimiter: str | None, match_glob: str | None) -> list[ObjectInfo]:
        top = prefix.rpartition("/")[0]
        objects = []
        for directory, subdirectories, files in os.walk(self.root / top):
            if delimiter:
                subdirectories.clear()
            subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
            relative = os.path.relpath(directory, self.root)
            base = "" if relative == "." else f"{relative}/"
            try:  # which objects have metadata, so that the others cost no failed open
                metadata = set(os.listdir(os.path.join(directory, HIDDEN)))
            except FileNotFoundError:
                metadata = set()
            for file in files:
                name = base + file
                if not file.startswith(".") and listed(name, prefix, delimiter, match_glob):
                    with contextlib.suppress(FileNotFoundError):
                        objects.append(self._info(name, os.stat(os.path.join(directory, file)), metadata))
        return sorted(objects, key=lambda info: info.name)

    async def stat(self, name: str) -> ObjectInfo:
        return await asyncio.to_thread(self._stat, name)

    def _stat(self, name: str) -> ObjectInfo:
        try:
            return self._info(name, self._path(name).stat())
        except FileNotFoundError:
            raise NotFound(f"{self.root}/{name} does not exist") from None

    async def read(self, name: str, generation: int | None = None) -> Blob:
        return await asyncio.to_thread(self._read, name, generation)

    def _read(self, name: str, generation: int | None) -> Blob:
        path = self._path(name)
        try:
            with path.open("rb") as handle:
                info = self._info(name, os.fstat(handle.fileno()))
                if generation is not None and info.generation != generation:
                    raise NotFound(f"{self.root}/{name} generation {generation} no longer exists")
                return Blob(info, handle.read())
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"{self.root}/{name} does not exist") from None

    async def write(
        self, name: str, data: bytes, *, if_generation_match: int | None = None,
        metadata: Mapping[str, str] | None = None, content_type: str = "text/plain",
    ) -> ObjectInfo:
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

    async def close(self) -> None:
        pass

    # -- helpers -----------------------------------------------------------

    def _info(self, name: str, stat: os.stat_result, metadata_files: set[str] | None = None) -> ObjectInfo:
        """`metadata_files`, when given, names the files of the object's hidden folder."""
        metadata = {}
        if metadata_files is None or f"{name.rpartition('/')[2]}.{stat.st_mtime_ns}.meta.json" in metadata_files:
            with contextlib.suppress(FileNotFoundError, ValueError):
                metadata = json.loads(self._metadata_path(self.root / name, stat.st_mtime_ns).read_text())
        return ObjectInfo(name, stat.st_mtime_ns, datetime.fromtimestamp(stat.st_mtime, timezone.utc), metadata)

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

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        """An exclusive lock per object, shared by every process using the directory."""
        with (self._hidden(path) / f"{path.name}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class LocalEvents:
    """Config changes in the pipeline directories, reported like GCS notifications."""

    def __init__(self, locations: list[Location]) -> None:
        self._locations = locations
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._known: dict[tuple[str, str], int] = {}
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._armed = asyncio.Event()
        self._probe = f".probe-{uuid.uuid4().hex}"

    def _directory(self, location: Location) -> Path:
        return Path(location.bucket_path) / location.prefix

    async def attach(self) -> None:
        """Start watching; returns once the watcher is really armed (it has seen a probe file)."""
        for location in self._locations:
            self._directory(location).mkdir(parents=True, exist_ok=True)
            for info in await LocalStore(Path(location.bucket_path)).list(location.prefix):
                self._known[(location.bucket, info.name)] = info.generation
        self._task = asyncio.create_task(self._watch())
        probe = self._directory(self._locations[0]) / self._probe
        while not self._armed.is_set():
            probe.touch()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._armed.wait()), 0.5)
            if self._task.done():
                self._task.result()
        probe.unlink(missing_ok=True)
        log.info("watching %s", ", ".join(str(self._directory(loc)) for loc in self._locations))

    async def _watch(self) -> None:
        directories = [str(self._directory(loc)) for loc in self._locations]
        async for changes in watchfiles.awatch(*directories, watch_filter=None, recursive=False,
                                               stop_event=self._stop, debounce=200, step=20):
            for _, changed in changes:
                if Path(changed).name == self._probe:
                    self._armed.set()
            for location in self._locations:
                for _, changed in changes:
                    self._changed(location, Path(changed))

    def _changed(self, location: Location, path: Path) -> None:
        root = Path(location.bucket_path)
        try:
            name = str(path.relative_to(root))
        except ValueError:
            return
        if not is_config_name(name, location.prefix):
            return
        key = (location.bucket, name)
        try:
            generation = path.stat().st_mtime_ns
        except FileNotFoundError:
            generation = 0
        previous = self._known.get(key, 0)
        if generation == previous:
            return
        if previous:
            self._queue.put_nowait(Event("delete", location.bucket, name, previous, generation or None))
        if generation:
            self._known[key] = generation
            self._queue.put_nowait(Event("finalize", location.bucket, name, generation))
        else:
            self._known.pop(key, None)

    async def get(self) -> Event:
        return await self._queue.get()

    @property
    def broken(self) -> BaseException | None:
        if self._task is not None and self._task.done() and not self._stop.is_set():
            return self._task.exception() or RuntimeError("file watcher stopped")
        return None

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
