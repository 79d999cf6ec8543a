"""One luigi run forked by a warm interpreter (see `warm`, `zygote`): the request, the output, the exit status.

The node connects to the interpreter's socket, sends the run's argv,
environment and working directory with the write end of the run's output
pipe, and hears back the child's pid and, when it ends, its exit status. The
run is then treated as a spawned one: output streamed to the run log,
stopped through its process group.
"""
from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
from pathlib import Path
from typing import Callable, Mapping

from poltergust.errors import PoltergustError
from poltergust.node import metrics
from poltergust.launch.processes import GRACE_SECONDS

Note = Callable[[str], None]


class WarmUnavailable(PoltergustError):
    """This run cannot use a warm interpreter; the message says why (for the run log)."""


async def fork_run(socket_path: Path, argv: list[str], env: Mapping[str, str], cwd: Path,
                   sink: Callable[[str], None], note: Note) -> int:
    """Have the warm interpreter at `socket_path` fork luigi with `argv`; stream its output to `sink`.

    Returns luigi's exit code.
    """
    loop = asyncio.get_running_loop()
    read_end, write_end = os.pipe()
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.setblocking(False)
    try:
        try:
            payload = json.dumps({"argv": argv, "env": dict(env), "cwd": str(cwd)}).encode()
            message = struct.pack(">I", len(payload)) + payload
            await loop.sock_connect(connection, str(socket_path))
            sent = connection.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   array.array("i", [write_end]))])
            await loop.sock_sendall(connection, message[sent:])
        except OSError as exc:
            raise WarmUnavailable(f"the environment's warm interpreter cannot be reached ({exc})") from None
        finally:
            os.close(write_end)
        reader, writer = await asyncio.open_unix_connection(sock=connection)
    except BaseException:
        os.close(read_end)
        connection.close()
        raise
    child = _Child(reader)
    output = _read_pipe(read_end)
    try:
        pid = await child.pid
        metrics.WARM_STARTS.labels("forked").inc()
        note(f"luigi forked from the environment's warm interpreter as pid {pid}")
        await _stream(output, sink)
        code = await child.status
        if code is None:
            raise WarmUnavailable("the warm interpreter died during the run and luigi's exit status was lost")
        return code
    finally:
        if not child.status.done() and child.pid.done() and not child.pid.exception():
            await asyncio.shield(_stop(child))
        loop.remove_reader(read_end)
        os.close(read_end)
        writer.close()
        child.listening.cancel()


class _Child:
    """What a zygote and its child say about one run: the child's pid, then its exit status."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        self.pid: asyncio.Future[int] = loop.create_future()
        self.status: asyncio.Future[int | None] = loop.create_future()
        self.pid.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception never retrieved"
        self.listening = asyncio.ensure_future(self._listen(reader))

    async def _listen(self, reader: asyncio.StreamReader) -> None:
        own_report = None
        try:
            while line := await reader.readline():
                message = json.loads(line)
                if "pid" in message and not self.pid.done():
                    self.pid.set_result(int(message["pid"]))
                elif "exit" in message:
                    own_report = int(message["exit"])  # the child's word: used only if the zygote's is lost
                elif "status" in message:
                    self.status.set_result(int(message["status"]))
                    return
                elif "error" in message and not self.pid.done():
                    self.pid.set_exception(WarmUnavailable(f"the warm interpreter could not fork: {message['error']}"))
        except (OSError, ValueError):
            pass
        if not self.pid.done():
            self.pid.set_exception(WarmUnavailable("the warm interpreter closed the connection before forking"))
        if not self.status.done():
            self.status.set_result(own_report)


def _read_pipe(fd: int) -> asyncio.StreamReader:
    """A stream of what arrives on the pipe `fd`, which stays ours to close.

    (A file object handed to `connect_read_pipe` gets its descriptor closed
    twice under uvloop: a race with any thread opening a file meanwhile.)
    """
    loop = asyncio.get_running_loop()
    stream = asyncio.StreamReader(limit=1 << 20)
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            data = os.read(fd, 1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            stream.feed_data(data)
        else:
            loop.remove_reader(fd)
            stream.feed_eof()

    loop.add_reader(fd, readable)
    return stream


async def _stream(output: asyncio.StreamReader, sink: Callable[[str], None]) -> None:
    while True:
        try:
            line = await output.readline()
        except ValueError:  # a single line over the limit: keep what fits
            line = (await output.read(1 << 16)) + b" [line truncated]\n"
        if not line:
            return
        sink(line.decode("utf-8", errors="replace"))


async def _stop(child: _Child) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it lingers (as `run_streaming` does)."""
    pid = child.pid.result()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        try:
            await asyncio.wait_for(asyncio.shield(child.status), GRACE_SECONDS)
            return
        except asyncio.TimeoutError:
            continue
