"""Config changes in local pipeline directories (inotify through watchfiles), reported like GCS notifications.

Each event carries the generation that was replaced or deleted, as GCS
notifications do, so a node treats a local directory exactly like a bucket.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import time
import uuid
from pathlib import Path

import watchfiles

from poltergust.events.base import ClosingSource, Event
from poltergust.layout import INTERNAL, Location, is_config_name
from poltergust.storage.local import LocalStore, no_links, open_no_follow

log = logging.getLogger(__name__)

HELP_DIRECTORY = INTERNAL + "help"
"""Calls for help are small JSON files here, in each bucket directory; the watcher reads them as events."""
HELP_KEPT_SECONDS = 60.0


class LocalEvents(ClosingSource):
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

    def _help_directories(self) -> list[Path]:
        return sorted({Path(location.bucket_path) / HELP_DIRECTORY for location in self._locations})

    async def attach(self) -> None:
        """Start watching; returns once the watcher is really armed (it has seen a probe file)."""
        self._stop = asyncio.Event()  # a fresh watch after a close
        self._armed = asyncio.Event()
        for directory in self._help_directories():
            directory.mkdir(parents=True, exist_ok=True)
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
        directories += [str(directory) for directory in self._help_directories()]
        async for changes in watchfiles.awatch(*directories, watch_filter=None, recursive=False,
                                               stop_event=self._stop, debounce=200, step=20):
            for _, changed in changes:
                if Path(changed).name == self._probe:
                    self._armed.set()
                elif Path(changed).parent in self._help_directories():
                    self._help(Path(changed))
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
            info = os.lstat(path)
            generation = info.st_mtime_ns if stat.S_ISREG(info.st_mode) else 0  # a link is no config
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

    def _help(self, path: Path) -> None:
        try:
            with os.fdopen(open_no_follow(path), "rb") as handle:
                call = json.loads(handle.read(1 << 16))
            event = Event("help", call["bucket"], call["name"], int(call["generation"]), wanted=int(call["wanted"]),
                          wave=int(call["wave"]))
        except (OSError, ValueError, KeyError, TypeError):
            return  # removed meanwhile, or half written (a temporary file): the rename's event follows
        self._queue.put_nowait(event)

    async def get(self) -> Event:
        return await self._queue.get()

    async def call_for_help(self, bucket: str, name: str, generation: int, wanted: int, wave: int) -> None:
        root = Path(bucket[len("file://"):]).resolve()
        no_links(root, root / HELP_DIRECTORY)  # never write or delete calls in a folder elsewhere
        await asyncio.to_thread(self._write_help, root / HELP_DIRECTORY, json.dumps(
            {"bucket": bucket, "name": name, "generation": generation, "wanted": wanted, "wave": wave}))

    @staticmethod
    def _write_help(directory: Path, body: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("*.json"):  # calls are heard at once or not at all: keep the folder small
            with contextlib.suppress(FileNotFoundError):
                if time.time() - old.lstat().st_mtime > HELP_KEPT_SECONDS:
                    old.unlink()
        temporary = directory / f".{uuid.uuid4().hex}.tmp"
        with os.fdopen(open_no_follow(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "w") as handle:
            handle.write(body)
        os.replace(temporary, directory / f"{uuid.uuid4().hex}.json")

    @property
    def broken(self) -> BaseException | None:
        if self._task is not None and self._task.done() and not self._stop.is_set():
            return self._task.exception() or RuntimeError("file watcher stopped")
        return None

    async def close(self, delete: bool = False) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
