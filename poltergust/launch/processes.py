"""Child processes that stream their output line by line and die with their run.

Each child gets its own process group, so cancelling a run (shutdown, the
config deleted, a claim by another node) also stops whatever luigi or the
installer started in turn.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Callable, Mapping, Sequence

GRACE_SECONDS = 5.0
"""How long a child gets between SIGTERM and SIGKILL."""


async def run_streaming(
    command: Sequence[str], *, env: Mapping[str, str], cwd: Path, sink: Callable[[str], None],
) -> int:
    """Run `command`, passing each output line (stdout and stderr merged) to `sink`."""
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(env),
        cwd=str(cwd),
        start_new_session=True,
        limit=1 << 20,
    )
    try:
        assert process.stdout is not None
        while True:
            try:
                line = await process.stdout.readline()
            except ValueError:  # a single line over the limit: keep what fits
                line = (await process.stdout.read(1 << 16)) + b" [line truncated]\n"
            if not line:
                break
            sink(line.decode("utf-8", errors="replace"))
        return await process.wait()
    finally:
        if process.returncode is None:
            await asyncio.shield(_stop(process))


async def _stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            await asyncio.wait_for(process.wait(), GRACE_SECONDS)
            return
        except asyncio.TimeoutError:
            continue
