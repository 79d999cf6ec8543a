"""Advisory file locks (flock), the one way node processes sharing a directory exclude each other.

Used for a local bucket's objects, environment builds and uses, and the
embedded luigid. Locks are held on open descriptors, so a process that dies
releases its locks at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from pathlib import Path
from typing import Callable, Iterator


def _open(path: Path) -> int:
    # O_NOFOLLOW: a lock file planted as a link would have the opener create or open its target.
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)


@contextlib.contextmanager
def locked(path: Path, shared: bool = False) -> Iterator[None]:
    """Hold the lock on `path`, blocking this thread until it is free (for code already off the event loop)."""
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def try_lock(path: Path, shared: bool = False) -> int | None:
    """The descriptor holding the lock on `path`, or None if someone else holds it; close it to release."""
    fd = _open(path)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


async def acquire(path: Path, shared: bool = False, poll: float = 0.05,
                  on_wait: Callable[[], None] | None = None) -> int:
    """Take the lock on `path` without blocking the event loop; returns the descriptor holding it.

    `on_wait` is called once, the first time the lock is found taken, so the
    caller can say why it is waiting.
    """
    waited = False
    while True:
        fd = try_lock(path, shared)
        if fd is not None:
            return fd
        if not waited and on_wait is not None:
            on_wait()
        waited = True
        await asyncio.sleep(poll)


@contextlib.asynccontextmanager
async def held(path: Path, shared: bool = False, poll: float = 0.05,
               on_wait: Callable[[], None] | None = None):
    """`acquire` as an async context manager."""
    fd = await acquire(path, shared, poll, on_wait)
    try:
        yield
    finally:
        os.close(fd)
