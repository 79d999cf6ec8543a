"""The on-disk environment cache: its directories, manifests, in-use holds, build locks and eviction.

`ENV_DIR/KEY/` is a complete environment; its manifest (`.poltergust.json`)
records what it is, and the manifest's mtime its last use, so a cache hit
costs one system call. Builds happen in `ENV_DIR/.build-KEY-*` and are
renamed into place when complete, so a half-built environment is never used.

Node processes sharing ENV_DIR coordinate through file locks
(`ENV_DIR/.locks/KEY.build` around a build, a shared `KEY.use` while runs
use an environment). After a new environment lands, the least recently used
ones are removed until the cache fits its budget (`--env-cache-size`);
eviction only removes an environment whose exclusive `use` lock it gets, so
no node process ever loses an environment in use. Stale staging directories
of crashed builds are removed on the way.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Callable, Mapping

from poltergust import locks
from poltergust.launch.sandbox import RunAs
from poltergust.run.log import RunLog

log = logging.getLogger(__name__)

MANIFEST = ".poltergust.json"
"""Written into every environment: key, identity, size; its mtime records the last use."""
KEY_PATTERN = re.compile(r"[0-9a-f]{32}")
STALE_BUILD_SECONDS = 600.0


def parse_size(text: str | int | None) -> int | None:
    """A disk budget: bytes, or a number with K, M, G or T (powers of 1024); 0 or empty: no budget."""
    if text is None:
        return None
    if isinstance(text, int):
        return text or None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r}: expected a size such as 500M, 10G or a number of bytes")
    number, unit = match.groups()
    size = int(float(number) * 1024 ** " KMGT".index(unit.upper() or " "))
    return size or None


class Cache:
    def __init__(self, root: Path, cache_size: int | str | None = None,
                 on_evict: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ".locks").mkdir(exist_ok=True)
        with contextlib.suppress(PermissionError):  # a pipeline could otherwise hold an environment's lock forever
            os.chmod(self.root / ".locks", 0o700)
        self.cache_size = parse_size(cache_size)
        """Disk budget in bytes (None: no budget)."""
        self.on_evict = on_evict
        """Called with the key of every environment evicted (say, to stop processes started from it)."""
        self._users: dict[str, int] = {}
        self._use_locks: dict[str, int] = {}
        self._held: dict[asyncio.Task, set[str]] = {}
        self._evicting: asyncio.Lock | None = None

    # -- entries -----------------------------------------------------------

    def touch(self, path: Path) -> bool:
        """Is the environment at `path` complete? Records the use (its manifest's mtime) if so."""
        try:
            os.utime(path / MANIFEST)
            return True
        except FileNotFoundError:
            return False
        except OSError:  # not ours to touch (permissions): complete all the same
            return (path / MANIFEST).exists()

    def staging(self, key: str) -> Path:
        """A fresh name for building `key` beside its final place (not created)."""
        return self.root / f".build-{key}-{uuid.uuid4().hex[:8]}"

    @staticmethod
    def write_manifest(directory: Path, manifest: Mapping[str, object]) -> None:
        (directory / MANIFEST).unlink(missing_ok=True)  # never written through a link a build left there
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")

    @staticmethod
    def read_manifest(directory: Path) -> dict[str, object]:
        """The manifest of `directory`; raises OSError or ValueError when missing or unreadable."""
        manifest = json.loads((directory / MANIFEST).read_text())
        if not isinstance(manifest, dict):
            raise ValueError(f"{MANIFEST} is not a mapping")
        return manifest

    def move_into_place(self, staging: Path, path: Path) -> bool:
        """Rename a complete environment into place; False if a complete one is already there."""
        if path.exists() and not self.touch(path):  # an incomplete leftover (manifest lost): replace it
            trash = self.root / f".trash-{path.name}-{uuid.uuid4().hex[:8]}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            staging.rename(path)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not self.touch(path):
                raise
            return False

    def private_requirements(self, lines: list[str], directory: Path | None = None,
                             owner: RunAs | None = None) -> Path:
        """A requirements file only its user can read (mode 0600), for lines holding secrets.

        In `directory` (default: the cache's private one) and owned by `owner` (default: this process's user).
        """
        directory = directory or self.root / ".private"
        directory.mkdir(mode=0o700, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="requirements-", suffix=".txt", dir=directory)  # mode 0600
        if owner is not None:
            os.fchown(fd, owner.uid, owner.gid)
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        return Path(name)

    # -- in use --------------------------------------------------------------

    def in_use(self) -> set[str]:
        """Keys of the environments runs of this process are using."""
        return {key for key, users in self._users.items() if users}

    async def hold(self, key: str) -> None:
        """Count `key` as in use until the current asyncio task ends (a shared lock for other processes)."""
        task = asyncio.current_task()
        assert task is not None
        held = self._held.get(task)
        if held is not None and key in held:
            return
        if not self._users.get(key):
            fd = await locks.acquire(self._lock_path(key, "use"), shared=True, poll=0.02)
            if key in self._use_locks:  # another run of this process took it meanwhile
                os.close(fd)
            else:
                self._use_locks[key] = fd
        self._users[key] = self._users.get(key, 0) + 1
        if held is None:
            held = self._held[task] = set()
            task.add_done_callback(self._release)
        held.add(key)

    def _release(self, task: asyncio.Task) -> None:
        for key in self._held.pop(task, ()):
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]
                fd = self._use_locks.pop(key, None)
                if fd is not None:
                    os.close(fd)  # drops the shared lock

    def _lock_path(self, key: str, kind: str) -> Path:
        return self.root / ".locks" / f"{key}.{kind}"

    @contextlib.asynccontextmanager
    async def build_lock(self, key: str, runlog: RunLog) -> AsyncIterator[None]:
        """Held while `key` is built or downloaded, so node processes sharing the cache build it once."""
        def waiting() -> None:
            runlog.note(f"waiting for environment {key}, being built by another node process")

        async with locks.held(self._lock_path(key, "build"), poll=0.2, on_wait=waiting):
            yield

    # -- eviction --------------------------------------------------------------

    async def evict(self, runlog: RunLog | None = None) -> None:
        """Remove the least recently used environments not in use until the cache fits its budget."""
        if self._evicting is None:
            self._evicting = asyncio.Lock()
        async with self._evicting:
            evicted, over = await asyncio.to_thread(self._evict_sync, self.in_use())
        for key, size, used in evicted:
            message = (f"evicted environment {key} ({size / 1e6:.1f} MB, last used "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(used))}Z) to keep the cache within "
                       f"{(self.cache_size or 0) / 1e6:.0f} MB")
            log.info("%s", message)
            if runlog is not None:
                runlog.note(message)
            if self.on_evict is not None:
                try:
                    self.on_evict(key)
                except Exception:  # noqa: BLE001 -- a failing hook must not fail the run that evicted
                    log.exception("the eviction hook failed for environment %s", key)
        if over > 0:
            log.warning("environment cache is %.1f MB over its budget; the rest is in use", over / 1e6)

    def _evict_sync(self, in_use: set[str]) -> tuple[list[tuple[str, int, float]], int]:
        entries: list[tuple[float, str, int]] = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root / ".private"):  # left by a node process that died mid-build
                if time.time() - entry.stat().st_mtime > STALE_BUILD_SECONDS:
                    os.unlink(entry.path)
        for entry in os.scandir(self.root):
            name = entry.name
            if name.startswith(".trash-"):
                shutil.rmtree(entry.path, ignore_errors=True)
            elif name.startswith(".build-"):
                self._remove_stale_build(entry)
            elif self.cache_size and KEY_PATTERN.fullmatch(name) and entry.is_dir(follow_symlinks=False):
                found = self._entry(Path(entry.path))
                if found is not None:
                    entries.append((found[0], name, found[1]))
        if not self.cache_size:
            return [], 0
        total = sum(size for _, _, size in entries)
        evicted = []
        for used, key, size in sorted(entries):
            if total <= self.cache_size:
                break
            if key in in_use:
                continue
            fd = locks.try_lock(self._lock_path(key, "use"))
            if fd is None:
                continue  # another node process is using it
            try:
                current = self._entry(self.root / key)
                if current is None or current[0] != used:
                    continue  # used (or removed) since the scan: no longer the least recently used
                os.rename(self.root / key, self.root / f".trash-{key}-{uuid.uuid4().hex[:8]}")
            finally:
                os.close(fd)
            total -= size
            evicted.append((key, size, used))
        for entry in os.scandir(self.root):
            if entry.name.startswith(".trash-"):
                shutil.rmtree(entry.path, ignore_errors=True)
        return evicted, total - self.cache_size

    @staticmethod
    def _entry(path: Path) -> tuple[float, int] | None:
        """(last use, size) of a cached environment; environments of older versions count too."""
        try:
            used = os.stat(path / MANIFEST).st_mtime
            size = json.loads((path / MANIFEST).read_text()).get("size")
        except FileNotFoundError:
            try:
                used = os.stat(path / "pyvenv.cfg").st_mtime
            except FileNotFoundError:
                return None
            size = None
        except ValueError:
            size = None
        if not isinstance(size, int):
            size = disk_usage(path)
        return used, size

    def _remove_stale_build(self, entry: os.DirEntry) -> None:
        key = entry.name[len(".build-"):].split("-", 1)[0]
        try:
            if time.time() - entry.stat(follow_symlinks=False).st_mtime < STALE_BUILD_SECONDS:
                return
        except FileNotFoundError:
            return
        fd = locks.try_lock(self._lock_path(key, "build"))
        if fd is None:
            return  # being built right now
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)


def disk_usage(root: Path) -> int:
    """Bytes the directory takes on disk (each inode once), as `du` counts."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, _, names in os.walk(root):
        for name in names + ["."]:
            try:
                info = os.lstat(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
    return total
