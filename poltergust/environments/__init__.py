"""The Python environments pipelines run in: `Environments.get(spec, runlog)` returns a ready one.

A thin facade over its parts: `plan` (the key and the build plan),
`cache` (directories, in-use holds, locks, eviction), `build` (uv or
virtualenv builders), `share` and `archive` (environments shared through the
bucket) and `interpreters` (finding the Python a file asks for).

Runs needing the same environment wait for one build: in a process through a
shared future, between node processes sharing the cache through a file lock.
A failed build is not cached; the next run tries again. An environment counts
as in use (never evicted) from the moment a run asks for it until that run's
asyncio task ends.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

from poltergust.config import EnvironmentSpec
from poltergust.environments import plan
from poltergust.environments.build import Builder
from poltergust.environments.cache import Cache, parse_size
from poltergust.environments.interpreters import Interpreter
from poltergust.environments.plan import EnvironmentBuildError, Plan
from poltergust.environments.share import Sharing
from poltergust.errors import PoltergustError
from poltergust.launch.users import UserPool
from poltergust.node import metrics
from poltergust.run.log import RunLog
from poltergust.secret_env import SecretEnv
from poltergust.storage import StorageError

__all__ = ["Environments", "EnvironmentBuildError", "parse_size"]


class _BuildInterrupted(PoltergustError):
    """The run that was building an environment was cancelled; a waiter takes over."""


class Environments:
    def __init__(
        self, root: Path, node_environ: Mapping[str, str] | None = None, *,
        cache_size: int | str | None = None, share: bool = False, share_key: bytes | None = None,
        on_evict: Callable[[str], None] | None = None, secret_names: Iterable[str] = (),
        builders: UserPool | None = None,
    ) -> None:
        """`share_key` signs the archives this node shares and proves the ones it uses; `share` needs it.

        `secret_names` (`--secret-env`) join the secrets found by name and by
        `{{NAME}}` reference in `secret_env`, which the node shares for its runs.
        With `builders`, builds run as users of that pool, each in a sandbox (see `build`).
        """
        if share and not share_key:
            raise ValueError("sharing environments needs a signing key that only the nodes hold")
        self.environ = dict(os.environ if node_environ is None else node_environ)
        self.secret_env = SecretEnv(self.environ, secret_names)
        self.cache = Cache(root, cache_size, on_evict)
        self.root = self.cache.root
        self._builder = Builder(self.cache, self.secret_env, builders)
        self._sharing = Sharing(self.cache, self.secrets, share_key) if share and share_key else None
        """Downloads and uploads environment archives beside the environment files (None: not sharing)."""
        self._builds: dict[str, asyncio.Future[Path]] = {}

    @property
    def cache_size(self) -> int | None:
        """Disk budget in bytes (None: no budget)."""
        return self.cache.cache_size

    @cache_size.setter
    def cache_size(self, size: int | None) -> None:
        self.cache.cache_size = size

    @staticmethod
    def referenced(spec: EnvironmentSpec) -> set[str]:
        """Names of the node variables the dependencies reference as `{{NAME}}`: secrets."""
        return {name for dependency in spec.dependencies for name in plan.SECRET_REFERENCE.findall(dependency)}

    def secrets(self, spec: EnvironmentSpec) -> list[str]:
        """Values of the node variables the dependencies reference, to be masked in logs."""
        return plan.secrets(spec, self.environ)

    def in_use(self) -> set[str]:
        """Keys of the environments runs of this process are using."""
        return self.cache.in_use()

    async def wait_background(self, timeout: float | None = None) -> None:
        """Wait for background work (uploads of archives) to finish, at most `timeout` seconds."""
        if self._sharing is not None:
            await self._sharing.wait_background(timeout)

    async def get(self, spec: EnvironmentSpec, runlog: RunLog) -> Path:
        """Return the directory of a ready environment for `spec`, building it if needed.

        The environment counts as in use (never evicted) until the asyncio task
        that asked for it ends.
        """
        self.secret_env.add(self.referenced(spec))
        for secret in self.secrets(spec):
            runlog.add_secret(secret)
        try:
            return await self._get(spec, runlog)
        except OSError as exc:  # the cache directory itself failed us (permissions, disk full...)
            raise EnvironmentBuildError(f"environment cache {self.root}: {exc}") from exc

    async def _get(self, spec: EnvironmentSpec, runlog: RunLog) -> Path:
        interpreter = plan.cached_interpreter(spec, self.environ)
        if interpreter is None:
            interpreter = await asyncio.to_thread(plan.find_interpreter, spec, self.environ)
        key = plan.key(spec, interpreter)
        path = self.root / key
        await self.cache.hold(key)
        while True:
            if self.cache.touch(path):
                metrics.ENV_CACHE_HITS.inc()
                runlog.note(f"environment {key} is ready (cached)")
                return path
            pending = self._builds.get(key)
            if pending is None:
                return await self._build_once(spec, key, interpreter, path, runlog)
            runlog.note(f"waiting for environment {key}, being built for another run")
            try:
                return await asyncio.shield(pending)
            except _BuildInterrupted:
                continue

    async def _build_once(self, spec: EnvironmentSpec, key: str, interpreter: Interpreter, path: Path,
                          runlog: RunLog) -> Path:
        future: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.exception())  # waiters may be gone: never warn
        self._builds[key] = future
        try:
            try:
                await self._obtain(spec, key, interpreter, path, runlog)
            except (OSError, StorageError) as exc:
                raise EnvironmentBuildError(f"building the environment from {spec.source} failed: {exc}") from exc
            future.set_result(path)
            return path
        except asyncio.CancelledError:
            future.set_exception(_BuildInterrupted())
            raise
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            del self._builds[key]

    async def _obtain(self, spec: EnvironmentSpec, key: str, interpreter: Interpreter, path: Path,
                      runlog: RunLog) -> None:
        """Download or build `key` under the build lock, then evict and share."""
        build_plan = Plan(spec, interpreter, self.environ)
        built = False
        async with self.cache.build_lock(key, runlog):
            if self.cache.touch(path):
                runlog.note(f"environment {key} was built by another node process meanwhile; using it")
                return
            if (self._sharing is not None and not build_plan.fallback
                    and await self._sharing.download(spec, key, interpreter, path, runlog)):
                metrics.ENV_BUILDS.labels("downloaded").inc()
            else:
                try:
                    await self._builder.build(build_plan, key, path, runlog)
                except BaseException:
                    metrics.ENV_BUILDS.labels("failed").inc()
                    raise
                metrics.ENV_BUILDS.labels("built").inc()
                built = True
        await self.cache.evict(runlog)
        if built and self._sharing is not None:
            if build_plan.fallback:
                runlog.note("not sharing this environment: virtualenv builds are not relocatable")
            else:
                self._sharing.start_upload(spec, key, interpreter, path, runlog)
