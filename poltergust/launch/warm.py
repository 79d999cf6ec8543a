"""Warm starts: per environment, a warm interpreter that forks each luigi run.

`python -m luigi` spends most of its start importing luigi. A `WarmPool` keeps,
per environment (and per set of variables that change how Python starts, and
per `preload:` list), one fresh `ENV/bin/python` running `zygote.py` with
luigi already imported; a run asks it, over a socket the interpreter
inherited at start (none in the filesystem, see `fork`), to fork a child that
runs luigi with the run's argv, environment, working directory and output
pipe. The node itself is never forked: it has threads (gRPC, asyncio's
executor), and a forked copy of them can deadlock.

With a pool of pipeline users (`--run-as`), warm interpreters are per user
too: each runs as that user in a sandbox of its own (see `sandbox`), and
serves only the run holding that user's lease, one at a time; when that run
ends it kills everything else left in its sandbox (`zygote --end-leftovers`).
Keyed by user rather than switching users in the child, no warm interpreter
holds a privilege, and sequential runs (given the first free user) keep
finding theirs warm.

`WarmPool.launcher()` is a drop-in for `processes.run_streaming`. A warm
interpreter that cannot start, refuses (a preloaded module started a thread)
or died falls back to it, said in the run log. Warm interpreters start on first
use (or with `prestart`), stop when idle, evicted or the pool closes, and exit
by themselves once the node is gone (their stdin pipe closes).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Sequence

from poltergust.config import EnvironmentSpec, PipelineConfig
from poltergust.launch.fork import Note, WarmUnavailable, fork_run
from poltergust.launch.processes import GRACE_SECONDS
from poltergust.launch.sandbox import Launcher, RunAs, spawner
from poltergust.launch.users import UserPool
from poltergust.launch.zygote import END_LEFTOVERS
from poltergust.node import metrics
from poltergust.run.command import luigi_environ
from poltergust.secret_env import SecretEnv

log = logging.getLogger(__name__)

ZYGOTE = Path(__file__).with_name("zygote.py")
READY, REFUSED = "poltergust-zygote-ready", "poltergust-zygote-refused"
BOOT_TIMEOUT = 120.0
RETRY_REFUSED_SECONDS = 600.0
"""A warm interpreter that failed to start is not tried again for this long (the run falls back meanwhile)."""
STARTUP_VARIABLES = ("PYTHON", "LD_", "LC_", "LANG", "HOME")
"""Prefixes of variables read when an interpreter starts: a run setting them gets a warm interpreter of its own."""


@dataclasses.dataclass
class _Zygote:
    key: str
    env_path: Path
    env_inode: int
    control: socket.socket
    """The node's end of the socketpair the interpreter inherited; closed when it exits."""
    process: asyncio.subprocess.Process
    ready: asyncio.Future[str]
    """'' once serving; otherwise why it is not."""
    running: int = 0
    idle: asyncio.TimerHandle | None = None
    died: str = ""
    stopping: bool = False


class WarmPool:
    def __init__(self, secrets: SecretEnv, *, idle_seconds: float,
                 prestart: bool, run_as: UserPool | None) -> None:
        """With `run_as`, warm interpreters (and so the runs they fork) run as a user of it, as spawned runs do.

        `secrets` are left out of every warm interpreter's environment, as of each run: a
        secret first named by a run's environment file is one from then on, and a forked run
        could read the interpreter's environment in /proc/self/environ.
        """
        self.run_as = run_as
        self.secrets = secrets
        self.idle_seconds = idle_seconds
        self.prestart = prestart
        self._zygotes: dict[str, _Zygote] = {}
        self._failed: dict[str, tuple[str, float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._starting = asyncio.Lock()

    # -- the interface the node uses ----------------------------------------

    def launcher(self, env_path: Path, spec: EnvironmentSpec, config: PipelineConfig, note: Note,
                 user: RunAs | None = None, fast: Mapping[str, Any] | None = None) -> Launcher:
        """A `sandbox.spawner` for luigi commands of this environment and config; other commands just spawn.

        `user`: the run's lease from the pool (with `--run-as`). `fast`: its luigi command for the
        fast start (`run.command.fast_start`).
        """
        base = luigi_environ(self.secrets.without_secrets(), spec, dataclasses.replace(config, variables={}), {})
        if self.prestart:
            self._spawn_task(self._prestart(env_path, spec.preload, base))
        return functools.partial(self.run, env_path, spec.preload, base, note, user, fast)

    async def run(self, env_path: Path, preload: Sequence[str], base: Mapping[str, str], note: Note,
                  user: RunAs | None, fast: Mapping[str, Any] | None, command: Sequence[str], *,
                  env: Mapping[str, str], cwd: Path, sink: Callable[[str], None]) -> int:
        if list(command[:3]) != [str(env_path / "bin" / "python"), "-m", "luigi"]:
            return await spawner(user)(command, env=env, cwd=cwd, sink=sink)
        # With --run-as, HOME is each run's private directory: the child takes it, the interpreter need not.
        startup = {k: v for k, v in env.items() if not (user and k == "HOME")}
        try:
            zygote = await self._zygote(env_path, preload, _boot_environ(base, startup), user)
            zygote.running += 1
            if zygote.idle is not None:
                zygote.idle.cancel()
            try:
                return await fork_run(zygote.control, list(command[3:]), env, cwd, sink, note,
                                      functools.partial(self._kill, zygote), fast)
            finally:
                zygote.running -= 1
                self._idle_later(zygote)
        except WarmUnavailable as exc:
            metrics.WARM_STARTS.labels("fallback").inc()
            note(f"warm start unavailable: {exc}; starting luigi the usual way")
            return await spawner(user)(command, env=env, cwd=cwd, sink=sink)

    def evicted(self, env_key: str) -> None:
        """The environment cache removed `env_key`: its warm interpreters go too."""
        for zygote in list(self._zygotes.values()):
            if zygote.env_path.name == env_key:
                self._stop_later(zygote, "its environment was evicted")

    async def close(self) -> None:
        """Stop every warm interpreter (the node is stopping)."""
        await asyncio.gather(*(self._stop(z, "the node is stopping") for z in list(self._zygotes.values())))
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- starting and stopping ------------------------------------------------

    async def _zygote(self, env_path: Path, preload: Sequence[str], boot: dict[str, str],
                      user: RunAs | None) -> _Zygote:
        key = _key(env_path, preload, boot, user)
        async with self._starting:  # one start per key, however many runs ask at once
            zygote = self._zygotes.get(key)
            if zygote is not None and zygote.died:
                del self._zygotes[key]  # this run falls back; the next one starts it again
                raise WarmUnavailable(f"the environment's warm interpreter died ({zygote.died}); it starts again "
                                      "for the next run")
            if zygote is not None and _inode(env_path) != zygote.env_inode:
                self._stop_later(zygote, "its environment was rebuilt")
                zygote = None
            if zygote is None:
                failed = self._failed.get(key)
                if failed is not None and time.monotonic() < failed[1]:
                    raise WarmUnavailable(failed[0])
                zygote = await self._start(key, env_path, preload, boot, user)
        problem = await asyncio.shield(zygote.ready)
        if problem:
            if self._zygotes.get(key) is zygote:
                del self._zygotes[key]
            self._failed[key] = (problem, time.monotonic() + RETRY_REFUSED_SECONDS)
            raise WarmUnavailable(problem)
        return zygote

    async def _prestart(self, env_path: Path, preload: Sequence[str], base: dict[str, str]) -> None:
        with contextlib.suppress(WarmUnavailable):
            await self._zygote(env_path, preload, _boot_environ(base, base), self.run_as.first if self.run_as else None)

    async def _start(self, key: str, env_path: Path, preload: Sequence[str], boot: dict[str, str],
                     user: RunAs | None) -> _Zygote:
        control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        control.setblocking(False)
        leftovers = [END_LEFTOVERS] if user is not None else []
        command = [str(env_path / "bin" / "python"), str(ZYGOTE), str(theirs.fileno()), *leftovers, *preload]
        try:
            inode = _inode(env_path)
            process = await asyncio.create_subprocess_exec(
                *(user.command(command) if user is not None else command),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                env=boot, cwd="/", start_new_session=True, limit=1 << 20, pass_fds=(theirs.fileno(),),
            )
        except OSError as exc:
            control.close()
            raise WarmUnavailable(f"cannot start a warm interpreter: {exc}") from None
        finally:
            theirs.close()
        zygote = _Zygote(key, env_path, inode, control, process, asyncio.get_running_loop().create_future())
        self._zygotes[key] = zygote
        metrics.WARM_INTERPRETERS.inc()
        self._spawn_task(self._watch(zygote, time.monotonic()))
        return zygote

    async def _watch(self, zygote: _Zygote, started: float) -> None:
        """Follow a warm interpreter's output and exit; its first words say whether it serves."""
        assert zygote.process.stdout is not None
        said: list[str] = []
        try:
            while not zygote.ready.done():
                line = (await asyncio.wait_for(zygote.process.stdout.readline(), BOOT_TIMEOUT)).decode(errors="replace")
                if not line:
                    break
                if line.startswith(READY):
                    info = json.loads(line.split(" ", 1)[1])
                    inside = f" ({info['pid']} in its sandbox)" if info["pid"] != zygote.process.pid else ""
                    log.info("warm interpreter for environment %s started: pid %d%s, Python %s, %.2fs",
                             zygote.env_path.name, zygote.process.pid, inside, info["python"],
                             time.monotonic() - started)
                    zygote.ready.set_result("")
                    self._idle_later(zygote)  # idle from when it serves: a slow start is not idleness
                elif line.startswith(REFUSED):
                    why = json.loads(line.split(" ", 1)[1])
                    zygote.ready.set_result(f"the warm interpreter refused to serve: {why}")
                else:
                    said = [*said[-9:], line.rstrip()]
            while line := (await zygote.process.stdout.readline()).decode(errors="replace"):
                log.info("warm interpreter for environment %s: %s", zygote.env_path.name, line.rstrip())
        except asyncio.TimeoutError:
            zygote.process.kill()
        code = await zygote.process.wait()
        metrics.WARM_INTERPRETERS.dec()
        if not zygote.ready.done():
            detail = f": {' / '.join(said)}" if said else ""
            zygote.ready.set_result(f"the warm interpreter exited with code {code} while starting{detail}")
        elif not zygote.stopping and not zygote.ready.result():
            zygote.died = f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
            log.warning("warm interpreter for environment %s died (%s)", zygote.env_path.name, zygote.died)
        zygote.control.close()

    def _idle_later(self, zygote: _Zygote) -> None:
        if zygote.idle is not None:
            zygote.idle.cancel()
        if zygote.running == 0 and not zygote.stopping:
            zygote.idle = asyncio.get_running_loop().call_later(
                self.idle_seconds, self._stop_later, zygote, f"idle for {self.idle_seconds:g}s")

    def _stop_later(self, zygote: _Zygote, why: str) -> None:
        self._spawn_task(self._stop(zygote, why))

    async def _stop(self, zygote: _Zygote, why: str) -> None:
        """Close its standard input: it stops its runs' process groups and exits; kill it if it lingers."""
        if self._zygotes.get(zygote.key) is zygote:
            del self._zygotes[zygote.key]
        if zygote.idle is not None:
            zygote.idle.cancel()
        if zygote.stopping or zygote.process.returncode is not None:
            return
        zygote.stopping = True
        log.info("stopping the warm interpreter for environment %s: %s", zygote.env_path.name, why)
        assert zygote.process.stdin is not None
        zygote.process.stdin.close()
        try:
            await asyncio.wait_for(zygote.process.wait(), 2 * GRACE_SECONDS + 1)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                zygote.process.kill()
            await zygote.process.wait()

    def _kill(self, zygote: _Zygote) -> None:
        """A run it was told to stop did not: end the interpreter (with `--run-as`, its whole sandbox)."""
        log.warning("warm interpreter for environment %s did not stop a run; killing it", zygote.env_path.name)
        if self._zygotes.get(zygote.key) is zygote:
            del self._zygotes[zygote.key]
        zygote.stopping = True
        with contextlib.suppress(ProcessLookupError):
            zygote.process.kill()

    def _spawn_task(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _key(env_path: Path, preload: Sequence[str], boot: Mapping[str, str], user: RunAs | None) -> str:
    identity = json.dumps([str(env_path), list(preload), sorted(boot.items()), user and user.uid])
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _boot_environ(base: Mapping[str, str], run: Mapping[str, str]) -> dict[str, str]:
    """The warm interpreter's environment: the run's base one, with the run's own start-up variables."""
    boot = {k: v for k, v in base.items() if not k.startswith(STARTUP_VARIABLES)}
    boot.update((k, v) for k, v in run.items() if k.startswith(STARTUP_VARIABLES))
    return boot


def _inode(path: Path) -> int:
    try:
        return os.stat(path).st_ino
    except OSError as exc:
        raise WarmUnavailable(f"the environment is gone ({exc})") from None
