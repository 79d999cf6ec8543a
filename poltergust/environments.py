"""Build and cache the Python environments pipelines run in.

An environment is identified by what determines its contents (options,
dependencies, interpreter, platform), not by the path of the file that asked
for it: editing the file gives a new environment, identical files share one.
Builds happen in a temporary directory that is renamed into place when
complete, so a half-built environment is never used, and concurrent runs
needing the same environment wait for one build.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import sys
import uuid
from pathlib import Path
from typing import Mapping

from uv import find_uv_bin

from .config import EnvironmentSpec
from .runlog import RunLog
from .subprocesses import run_streaming

log = logging.getLogger(__name__)

SECRET_REFERENCE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
PIP_TO_UV = {
    "PIP_INDEX_URL": "UV_INDEX_URL",
    "PIP_EXTRA_INDEX_URL": "UV_EXTRA_INDEX_URL",
    "PIP_FIND_LINKS": "UV_FIND_LINKS",
    "PIP_NO_INDEX": "UV_NO_INDEX",
}
"""pip settings users rely on, translated for uv (which does not read them)."""


class EnvironmentBuildError(Exception):
    """Building an environment failed; the message is one line for the error file."""


class _BuildInterrupted(Exception):
    """The run that was building an environment was cancelled; a waiter takes over."""


class Environments:
    def __init__(self, root: Path, node_environ: Mapping[str, str] | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.environ = dict(os.environ if node_environ is None else node_environ)
        self._builds: dict[str, asyncio.Future[Path]] = {}

    def key(self, spec: EnvironmentSpec) -> str:
        python = str(spec.virtualenv.get("python") or sys.executable)
        identity = "\n".join([spec.build_key, shutil.which(python) or python, sys.platform, platform.machine()])
        return hashlib.sha256(identity.encode()).hexdigest()[:32]

    def secrets(self, spec: EnvironmentSpec) -> list[str]:
        """Values of the node variables the dependencies reference, to be masked in logs."""
        return [self.environ[name] for dep in spec.dependencies for name in SECRET_REFERENCE.findall(dep)
                if self.environ.get(name)]

    async def get(self, spec: EnvironmentSpec, runlog: RunLog) -> Path:
        """Return the directory of a ready environment for `spec`, building it if needed."""
        key = self.key(spec)
        path = self.root / key
        while True:
            if (path / "pyvenv.cfg").exists():
                runlog.note(f"environment {key} is ready (cached)")
                return path
            pending = self._builds.get(key)
            if pending is None:
                return await self._build_once(spec, key, path, runlog)
            runlog.note(f"waiting for environment {key}, being built for another run")
            try:
                return await asyncio.shield(pending)
            except _BuildInterrupted:
                continue

    async def _build_once(self, spec: EnvironmentSpec, key: str, path: Path, runlog: RunLog) -> Path:
        future: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.exception())  # waiters may be gone: never warn
        self._builds[key] = future
        try:
            await self._build(spec, key, path, runlog)
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

    async def _build(self, spec: EnvironmentSpec, key: str, path: Path, runlog: RunLog) -> None:
        uv = find_uv_bin()
        staging = self.root / f".build-{key}-{uuid.uuid4().hex[:8]}"
        loop = asyncio.get_running_loop()
        started = loop.time()
        runlog.note(f"building environment {key} from {spec.source}")
        env = self._installer_environ()
        try:
            await self._step(
                [uv, "venv", "--relocatable", "--no-project", *self._venv_options(spec), str(staging)],
                env, runlog, "creating the virtualenv",
            )
            arguments = self._install_arguments(spec)
            if arguments:
                await self._step(
                    [uv, "pip", "install", "--python", str(staging / "bin" / "python"), *arguments],
                    env, runlog, "installing dependencies",
                )
            try:
                staging.rename(path)
            except OSError:
                if not (path / "pyvenv.cfg").exists():
                    raise
                runlog.note("another node process built the same environment first; using it")
        finally:
            if staging.exists():
                await asyncio.to_thread(shutil.rmtree, staging, True)
        runlog.note(f"environment {key} built in {loop.time() - started:.1f}s")

    async def _step(self, command: list[str], env: dict[str, str], runlog: RunLog, what: str) -> None:
        runlog.note("$ " + shlex.join(command))
        code = await run_streaming(command, env=env, cwd=self.root, sink=runlog.write)
        if code != 0:
            last = next((line for line in reversed(runlog.lines()) if line.strip()), "")
            raise EnvironmentBuildError(f"{what} failed (exit {code}): {last.strip()[:300]}")

    def _venv_options(self, spec: EnvironmentSpec) -> list[str]:
        options: list[str] = []
        for name, value in spec.virtualenv.items():
            flag = "--" + name.replace("_", "-")
            if name == "python":
                options += ["--python", str(value)]
            elif name in ("system-site-packages", "system_site_packages") and value is True:
                options.append(flag)
            elif name == "prompt":
                options += [flag, str(value)]
            else:
                raise EnvironmentBuildError(
                    f"{spec.source}: virtualenv.{name}: option not supported (supported: python, system-site-packages, prompt)"
                )
        return options

    def _install_arguments(self, spec: EnvironmentSpec) -> list[str]:
        arguments: list[str] = []
        for index, dependency in enumerate(spec.dependencies):
            def substitute(match: re.Match[str]) -> str:
                name = match.group(1)
                if name not in self.environ:
                    raise EnvironmentBuildError(
                        f"{spec.source}: dependencies[{index}]: references {{{{{name}}}}}, which is not set on this node"
                    )
                return self.environ[name]

            arguments += shlex.split(SECRET_REFERENCE.sub(substitute, dependency))
        return arguments

    def _installer_environ(self) -> dict[str, str]:
        env = dict(self.environ)
        for pip_name, uv_name in PIP_TO_UV.items():
            if pip_name in env and uv_name not in env:
                env[uv_name] = env[pip_name]
        env.pop("VIRTUAL_ENV", None)
        return env
