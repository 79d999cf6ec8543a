"""One luigi run forked by a warm interpreter (see `warm`, `zygote`): the request, the output, the exit status.

Over the socket the interpreter inherited at start (no run holds it), the
node hands it the run's connection, the child's report socket and the write
end of the run's output pipe, then sends the run's argv, environment and
working directory on the connection, and hears back the child's pid and,
when it ends, its exit status. Output is streamed to the run log as a spawned
run's. To stop the run the node shuts the connection for writing: the
interpreter stops the run's process group, so the node never signals a pid
it was told about; if no status comes within two grace periods, `stuck` is
called (the pool then ends that interpreter, and so its runs, itself).
"""
from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import socket
import struct
from pathlib import Path
from typing import Any, Callable, Mapping

from poltergust.errors import PoltergustError
from poltergust.launch.processes import GRACE_SECONDS
from poltergust.node import metrics

Note = Callable[[str], None]


class WarmUnavailable(PoltergustError):
    """This run cannot use a warm interpreter; the message says why (for the run log)."""


async def fork_run(control: socket.socket, argv: list[str], env: Mapping[str, str], cwd: Path,
                   sink: Callable[[str], None], note: Note, stuck: Callable[[], None],
                   fast: Mapping[str, Any] | None = None) -> int:
    """Have the warm interpreter holding `control`'s peer fork luigi with `argv`; stream its output to `sink`.

    `fast`: the same run for luigi's fast start (`run.command.fast_start`). Returns luigi's exit code.
    """
    loop = asyncio.get_running_loop()
    read_end, write_end = os.pipe()
    connection, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    report, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            control.sendmsg([b"run"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", [theirs.fileno(), child_end.fileno(), write_end]))])
            request = {"argv": argv, "env": dict(env), "cwd": str(cwd), **({"luigi": fast} if fast else {})}
            payload = json.dumps(request).encode()
            connection.setblocking(False)
            await loop.sock_sendall(connection, struct.pack(">I", len(payload)) + payload)
        except OSError as exc:
            raise WarmUnavailable(f"the environment's warm interpreter cannot be reached ({exc})") from None
        finally:
            os.close(write_end)
            theirs.close()
            child_end.close()
        reader, writer = await asyncio.open_unix_connection(sock=connection)
        reports, report_writer = await asyncio.open_unix_connection(sock=report)
    except BaseException:
        os.close(read_end)
        connection.close()
        report.close()
        raise
    child = _Child(reader, reports)
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
            await asyncio.shield(_stop(child, writer, stuck))
        loop.remove_reader(read_end)
        os.close(read_end)
        writer.close()
        report_writer.close()
        child.listening.cancel()
        child.own_report.cancel()


class _Child:
    """What a zygote and its child say about one run: the child's pid, then its exit status."""

    def __init__(self, reader: asyncio.StreamReader, reports: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        self.pid: asyncio.Future[int] = loop.create_future()
        self.status: asyncio.Future[int | None] = loop.create_future()
        self.pid.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception never retrieved"
        self.own_report: asyncio.Task[int | None] = asyncio.ensure_future(self._own_report(reports))
        self.listening = asyncio.ensure_future(self._listen(reader))

    async def _listen(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                message = json.loads(line)
                if not isinstance(message, dict):
                    break
                if "pid" in message and not self.pid.done():
                    self.pid.set_result(int(message["pid"]))
                elif "status" in message:
                    self.status.set_result(int(message["status"]))
                    return
                elif "error" in message and not self.pid.done():
                    self.pid.set_exception(WarmUnavailable(f"the warm interpreter could not fork: {message['error']}"))
        except (OSError, ValueError, TypeError):
            pass
        if not self.pid.done():
            self.pid.set_exception(WarmUnavailable("the warm interpreter closed the connection before forking"))
        if not self.status.done():  # the zygote is gone: the child's own word, if it gave one
            self.status.set_result(await self.own_report)

    @staticmethod
    async def _own_report(reports: asyncio.StreamReader) -> int | None:
        """The `exit` the child sends just before exiting (None if it sent none)."""
        try:
            message = json.loads(await reports.readline() or b"null")
            return int(message["exit"]) if isinstance(message, dict) and "exit" in message else None
        except (OSError, ValueError, TypeError):
            return None


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


async def _stop(child: _Child, writer: asyncio.StreamWriter, stuck: Callable[[], None]) -> None:
    """Have the interpreter stop the run (SIGTERM, then SIGKILL after a grace period); `stuck` if it does not."""
    with contextlib.suppress(OSError):
        writer.write_eof()
    try:
        await asyncio.wait_for(asyncio.shield(child.status), 2 * GRACE_SECONDS + 1)
    except asyncio.TimeoutError:
        stuck()
