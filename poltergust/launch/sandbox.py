"""Running pipelines and builds as unprivileged users (`--run-as`), each in a sandbox and a directory of its own.

Without it, pipelines run as the node's own user and share one trust
domain with the node and with each other. With it, every run and every
environment build takes a user of its own from the node's pool (`users`) for
as long as it lasts, and runs in a bubblewrap sandbox: a PID namespace of its
own with its own /proc (it sees none of the node's or other runs' processes,
and all of its processes, daemons included, end when its first one does or
when the node goes), no supplementary groups and no way to regain
privileges. A build sees the whole filesystem read-only except the directory
it builds in. The environment cache and the node's files are read-only (or
invisible) to pipelines, and each run gets a working directory of its own
(mode 0700, owned by its user), removed when the run ends. The node must run
as root to switch users.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Mapping, Sequence

from poltergust.errors import PoltergustError
from poltergust.launch.processes import run_streaming


class RunAsError(PoltergustError):
    """`--run-as` cannot be honoured; the message says why."""


@dataclass(frozen=True)
class RunAs:
    user: str
    uid: int
    gid: int

    @classmethod
    def lookup(cls, user: str) -> "RunAs":
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise RunAsError(f"--run-as {user}: no such user on this machine") from None
        if os.geteuid() != 0:
            raise RunAsError(f"--run-as {user}: the node must run as root to start pipelines as another user")
        for tool, package in (("setpriv", "util-linux"), ("bwrap", "bubblewrap")):
            if shutil.which(tool) is None:
                raise RunAsError(f"--run-as {user}: {tool} ({package}) is not installed")
        if entry.pw_uid == 0 or entry.pw_gid == 0:
            raise RunAsError(f"--run-as {user}: that user is root or in root's group; pick an unprivileged one")
        return cls(user, entry.pw_uid, entry.pw_gid)

    def command(self, command: Sequence[str], *, writable: Path | None = None) -> list[str]:
        """`command`, started as this user in a sandbox of its own (see the module's docstring).

        With `writable` (a build), everything but that directory is read-only.
        (bubblewrap, then util-linux's `setpriv`: the event loop's subprocess
        support can do neither itself.)
        """
        if writable is None:
            mounts = ["--bind", "/", "/"]
        else:
            mounts = ["--ro-bind", "/", "/", "--bind", str(writable), str(writable)]
        return ["bwrap", *mounts, "--dev", "/dev", "--perms", "1777", "--tmpfs", "/dev/shm", "--proc", "/proc",
                "--unshare-pid", "--unshare-ipc", "--die-with-parent", "--",
                "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--no-new-privs",
                "--", *command]


Launcher = Callable[..., Awaitable[int]]
"""`run_streaming`'s contract: (command, *, env, cwd, sink) -> exit code."""


def spawner(run_as: RunAs | None) -> Launcher:
    """`processes.run_streaming`, starting each command as `run_as`, in its sandbox, when given."""
    if run_as is None:
        return run_streaming

    async def run_as_user(command: Sequence[str], *, env: Mapping[str, str], cwd: Path,
                          sink: Callable[[str], None]) -> int:
        return await run_streaming(run_as.command(command), env=env, cwd=cwd, sink=sink)

    return run_as_user


def lock_down(data_dir: Path) -> None:
    """The node's data directory: traversable (to reach the runs' directories) but not readable by pipelines."""
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o711)
    (data_dir / "logs").mkdir(exist_ok=True)
    os.chmod(data_dir / "logs", 0o700)


@contextlib.asynccontextmanager
async def work_directory(base: Path, name: str, run_as: RunAs | None) -> AsyncIterator[Path]:
    """Where luigi runs: `base/name` (kept, as its outputs may be wanted) or, with `run_as`, a private one."""
    if run_as is None:
        directory = base / name
        directory.mkdir(parents=True, exist_ok=True)
        yield directory
        return
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o711)
    directory = base / f"{name}.{uuid.uuid4().hex[:8]}"
    directory.mkdir(mode=0o700)
    os.chown(directory, run_as.uid, run_as.gid)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
