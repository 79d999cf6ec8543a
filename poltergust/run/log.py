"""The log of one node's part of one run: a local file, mirrored to the bucket.

It holds what the user needs to see (environment build output, luigi's own
output, the node's decisions) and never a secret: every line is masked before
it is written. The bucket's copy is kept in parts (see `log_index`), so a
refresh uploads only the part that grew.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from pathlib import Path
from typing import Iterable

from poltergust.masking import mask
from poltergust.run.log_index import PART_SIZE, part_name
from poltergust.storage import ObjectStore, StorageError

log = logging.getLogger(__name__)


class RunLog:
    def __init__(self, path: Path, secrets: Iterable[str] = ()) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", encoding="utf-8", errors="replace")
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._tail: deque[str] = deque(maxlen=200)
        self.version = 0
        """Bumped on every write, so uploaders can tell whether anything changed."""

    def add_secret(self, secret: str) -> None:
        if secret and secret not in self._secrets:
            self._secrets = sorted([*self._secrets, secret], key=len, reverse=True)

    def mask(self, text: str) -> str:
        return mask(text, self._secrets)

    def write(self, line: str) -> None:
        """Append one line of subprocess output."""
        line = self.mask(line.rstrip("\n"))
        self._file.write(line + "\n")
        self._file.flush()
        self._tail.append(line)
        self.version += 1

    def note(self, message: str) -> None:
        """Append one line said by the node itself."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        self.write(f"[poltergust {stamp}Z] {message}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(list(self._tail)[-lines:])

    def lines(self) -> list[str]:
        return list(self._tail)

    def read(self, start: int = 0) -> bytes:
        """The log from byte `start` on."""
        with self.path.open("rb") as handle:
            handle.seek(start)
            return handle.read()

    def close(self) -> None:
        self._file.close()


class LogMirror:
    """Keeps a run log's copy in the bucket: shown at once when a run starts here, then refreshed rarely.

    The copy is in parts of `PART_SIZE` bytes; a full part is uploaded once,
    so a refresh writes only the last part (and any filled since), never
    the megabytes before it.
    """

    def __init__(self, runlog: RunLog, store: ObjectStore, name: str, interval: float) -> None:
        self.runlog = runlog
        self.store = store
        self.name = name
        self.interval = interval
        """Seconds between refreshes while the run goes on: every write costs a request."""
        self._full = 0
        """Parts uploaded full: never written again."""
        self._last = -1
        """Bytes of the part after those as last uploaded (-1: not yet)."""
        self._lock = asyncio.Lock()

    async def keep_up(self) -> None:
        """Upload the log whenever it changed, every `interval` seconds, until cancelled."""
        uploaded = -1
        while True:
            if self.runlog.version != uploaded:
                uploaded = self.runlog.version
                await self.upload()
            await asyncio.sleep(self.interval)

    async def upload(self) -> None:
        """Upload what is new now; a failure is logged, never raised: the run matters more than its log."""
        async with self._lock:
            try:
                await self._upload()
            except (StorageError, OSError) as exc:
                log.warning("could not upload the log %s: %s", self.name, exc)

    async def _upload(self) -> None:
        new = await asyncio.to_thread(self.runlog.read, self._full * PART_SIZE)
        if not new and self._full:
            return  # every byte is in full parts already
        chunks = [new[start:start + PART_SIZE] for start in range(0, len(new), PART_SIZE)] or [b""]
        for chunk in chunks:
            if len(chunk) != self._last:  # the log only grows: the same length is the same bytes
                await self.store.write(part_name(self.name, self._full), chunk)
            if len(chunk) < PART_SIZE:
                self._last = len(chunk)
                return
            self._full, self._last = self._full + 1, -1
