"""Building an environment from its plan: uv, or virtualenv and pip, in a staging directory.

uv builds a relocatable virtualenv with the interpreter the file asks for,
then installs every dependency in one `uv pip install` (each string
shell-split and passed as written: specifiers, URLs, paths, `-e`,
`--find-links`, `--index-url`...). Options uv has no equivalent for make the
node build with `virtualenv` and pip instead; such an environment is not
relocatable, so the staging path is rewritten to the final one in the files
that hold it before it is moved into place. Secret-bearing dependencies reach
the installer through a private requirements file, never its command line;
credentials in git URLs reach git through the install step's environment.
The installers' output goes to the run's log; a failure becomes one line.

With a pool of pipeline users (`--run-as`), a build leases one of them and
every step runs as that user in a sandbox (see `launch.sandbox`) that can
write only the build's own directory (the staging environment, its HOME, its
temporary files, the private requirements file): no cached environment, no
file of the node, none of the node's processes. Once the last step has ended
(and with it every process it started), the staging environment becomes
root's, not writable by anyone else, before the node touches it.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import socket
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import AsyncIterator

from uv import find_uv_bin

from poltergust.environments import git_credentials
from poltergust.environments.cache import Cache, disk_usage
from poltergust.environments.plan import (
    UV_IRRELEVANT,
    UV_OPTIONS,
    EnvironmentBuildError,
    Plan,
    installer_settings,
    normalised,
)
from poltergust.launch.processes import run_streaming
from poltergust.launch.sandbox import RunAs
from poltergust.launch.users import UserPool
from poltergust.node import metrics
from poltergust.run.log import RunLog
from poltergust.secret_env import SecretEnv


@dataclass(frozen=True)
class Jail:
    """Where and as whom one build runs: the environment, a directory for its other files, the build's user."""
    staging: Path
    private: Path
    user: RunAs | None = None

    def command(self, command: list[str]) -> list[str]:
        """`command` as the build's user, in a sandbox that can write `private` alone (without a user: as is)."""
        return command if self.user is None else self.user.command(command, writable=self.private)


class Builder:
    def __init__(self, cache: Cache, secret_env: SecretEnv, users: UserPool | None = None) -> None:
        """With `users`, every build runs as a user of that pool, in a sandbox (see the module's docstring)."""
        self.cache = cache
        self.secret_env = secret_env
        self.users = users

    async def build(self, plan: Plan, key: str, path: Path, runlog: RunLog) -> None:
        """Build `plan` into the cache as `path` (a staging directory renamed into place when complete)."""
        spec, interpreter = plan.spec, plan.interpreter
        loop = asyncio.get_running_loop()
        started = loop.time()
        runlog.note(f"building environment {key} from {spec.source} with {interpreter.describe()}")
        if plan.fallback:
            runlog.note(f"{plan.fallback}; building with virtualenv and pip instead of uv")
        env, flags = installer_settings(self.secret_env.for_installers())
        if plan.git_credentials:
            await self._give_git_credentials(plan, runlog)
        async with self._jail(key, runlog) as jail:
            if jail.user is not None:
                runlog.note(f"building as {jail.user.user}, in a sandbox that can write only {jail.private}")
                env.update(HOME=str(jail.private / "home"), TMPDIR=str(jail.private / "tmp"),
                           UV_CACHE_DIR=str(jail.private / "cache"))
            await self._build(plan, key, path, jail, env, flags, runlog)
        metrics.ENV_BUILD_SECONDS.observe(loop.time() - started)
        runlog.note(f"environment {key} built in {loop.time() - started:.1f}s ({plan.installer})")

    @contextlib.asynccontextmanager
    async def _jail(self, key: str, runlog: RunLog) -> AsyncIterator[Jail]:
        """Where and as whom to build `key`; a sandboxed build's directory is removed afterwards.

        Without a pool the build runs as the node, staging beside the cache's entries.
        """
        if self.users is None:
            yield Jail(self.cache.staging(key), self.cache.root / ".private")
            return
        async with self.users.lease(lambda: runlog.note("waiting for a free pipeline user to build as")) as user:
            workspace = self.cache.staging(key)
            workspace.mkdir(mode=0o700)
            try:
                for name in ("home", "tmp", "cache"):
                    (workspace / name).mkdir(mode=0o700)
                for directory in (workspace, *workspace.iterdir()):
                    os.chown(directory, user.uid, user.gid)
                yield Jail(workspace / "env", workspace, user)
            finally:
                await asyncio.to_thread(shutil.rmtree, workspace, True)

    async def _build(self, plan: Plan, key: str, path: Path, jail: Jail, env: dict[str, str], flags: list[str],
                     runlog: RunLog) -> None:
        staging = jail.staging
        requirements: Path | None = None
        try:
            if plan.private:
                requirements = self.cache.private_requirements(plan.private, jail.private, jail.user)
            if plan.fallback:
                await self._with_virtualenv(plan, jail, path, env, flags, requirements, runlog)
            else:
                await self._with_uv(plan, jail, env, flags, requirements, runlog)
            if jail.user is not None:
                await asyncio.to_thread(disown, staging)
            manifest = manifest_of(plan, key)
            manifest["size"] = await asyncio.to_thread(disk_usage, staging)
            self.cache.write_manifest(staging, manifest)
            if not self.cache.move_into_place(staging, path):
                runlog.note("another node process built the same environment first; using it")
        finally:
            if requirements is not None:
                requirements.unlink(missing_ok=True)
            if staging.exists():
                await asyncio.to_thread(shutil.rmtree, staging, True)

    async def _with_uv(self, plan: Plan, jail: Jail, env: dict[str, str], flags: list[str],
                       requirements: Path | None, runlog: RunLog) -> None:
        staging, uv = jail.staging, find_uv_bin()
        venv = ["venv", "--relocatable", "--no-project", "--python", plan.interpreter.path, *plan.venv_options,
                str(staging)]
        await self._step(jail, [uv, *venv], ["uv", *venv], env, runlog, f"{plan.spec.source}: creating the virtualenv")
        if not (plan.public or plan.private):
            return
        head = ["pip", "install", "--python", str(staging / "bin" / "python")]
        if "--no-index" in plan.public or any(line.strip() == "--no-index" for line in plan.private):
            flags = [flag for flag in flags if flag != "--no-index"]
        command = [uv, *head, *flags, *plan.public]
        if requirements is not None:
            command += ["--requirement", str(requirements)]
        await self._step(jail, command, ["uv", *head, *flags, *plan.display], install_environment(plan, env), runlog,
                         f"{plan.spec.source}: installing the dependencies", plan.git_credentials)

    async def _with_virtualenv(self, plan: Plan, jail: Jail, path: Path, env: dict[str, str],
                               flags: list[str], requirements: Path | None, runlog: RunLog) -> None:
        staging = jail.staging
        import importlib.util

        if importlib.util.find_spec("virtualenv") is None:
            raise EnvironmentBuildError(
                f"{plan.spec.source}: virtualenv: {plan.fallback}, and the virtualenv package is not installed on "
                f"this node (uv supports: {', '.join(sorted(UV_OPTIONS | UV_IRRELEVANT))})"
            )
        venv = ["-m", "virtualenv", "--python", plan.interpreter.path, *plan.venv_options, str(staging)]
        await self._step(jail, [sys.executable, *venv], ["virtualenv", *venv[2:]], env, runlog,
                         f"{plan.spec.source}: creating the virtualenv")
        if plan.public or plan.private:
            python = str(staging / "bin" / "python")
            pip_env = {k: v for k, v in env.items() if not k.startswith("UV_")}
            probe = await asyncio.create_subprocess_exec(*jail.command([python, "-c", "import pip"]), env=pip_env,
                                                         stdout=asyncio.subprocess.DEVNULL,
                                                         stderr=asyncio.subprocess.DEVNULL)
            if await probe.wait() == 0:
                head = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--no-compile"]
                shown = ["pip", *head[3:]]
            else:  # the options left pip out: install with uv into the virtualenv
                head = [find_uv_bin(), "pip", "install", "--python", python,
                        *(flag for flag in flags if flag not in plan.public)]
                shown = ["uv", *head[1:]]
                pip_env = env
            command = [*head, *plan.public]
            if requirements is not None:
                command += ["--requirement", str(requirements)]
            await self._step(jail, command, [*shown, *plan.display], install_environment(plan, pip_env), runlog,
                             f"{plan.spec.source}: installing the dependencies", plan.git_credentials)
        changed = await asyncio.to_thread(relocate, staging, path)
        runlog.note(f"rewrote the staging path in {changed} file(s) of the virtualenv for its final place")

    async def _give_git_credentials(self, plan: Plan, runlog: RunLog) -> None:
        """Check that git can take credentials from its environment; mask them (encoded) in the log too."""
        version = await git_credentials.git_version()
        if version is not None and version < git_credentials.MINIMUM_GIT:
            raise EnvironmentBuildError(
                f"{plan.spec.source}: credentials in git URLs need git "
                f"{'.'.join(map(str, git_credentials.MINIMUM_GIT))} or later; this node has git "
                f"{'.'.join(map(str, version))}")
        for credential in plan.git_credentials:
            runlog.add_secret(credential.encoded)
        repositories = ", ".join(credential.repository for credential in plan.git_credentials)
        runlog.note(f"credentials for {repositories} go to git in its environment, not in the URL")

    async def _step(self, jail: Jail, command: list[str], display: list[str], env: dict[str, str], runlog: RunLog,
                    what: str, credentials: list[git_credentials.GitCredential] | None = None) -> None:
        runlog.note("$ " + shlex.join(display))
        output: list[str] = []

        def sink(line: str) -> None:
            runlog.write(line)
            output.append(runlog.mask(line.rstrip("\n")))
            del output[:-60]

        code = await run_streaming(jail.command(command), env=env, cwd=self.cache.root, sink=sink)
        if code != 0:
            refused = git_credentials.refused(output, credentials or [])
            cause = f"the git server refused the credentials for {', '.join(refused)}: " if refused else ""
            raise EnvironmentBuildError(f"{what} failed ({display[0]} exit {code}): {cause}{error_summary(output)}")



def disown(staging: Path) -> None:
    """A sandboxed build's result, made root's and writable by root alone (links are not followed).

    The build's user must not keep a way to change an environment later runs
    import from; chown also clears any set-user-id bit it left.
    """
    for directory, names, files in os.walk(staging):
        for name in [".", *names, *files]:
            entry = os.path.join(directory, name)
            os.lchown(entry, 0, 0)
            info = os.lstat(entry)
            if not os.path.islink(entry) and info.st_mode & 0o022:
                os.chmod(entry, info.st_mode & 0o7755)


def install_environment(plan: Plan, env: dict[str, str]) -> dict[str, str]:
    """The install step's environment: `env`, plus the git credentials of `plan` (no other step gets them)."""
    return {**env, **git_credentials.environment(plan.git_credentials, env)} if plan.git_credentials else env


def manifest_of(plan: Plan, key: str) -> dict[str, object]:
    """What a built environment is, written into it (and into its shared archive)."""
    return {
        "key": key, "identity": plan.interpreter.identity(), "python": plan.interpreter.describe(),
        "content": normalised(plan.spec), "source": plan.spec.source, "installer": plan.installer,
        "relocatable": not plan.fallback, "built_by": socket.gethostname(),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def relocate(staging: Path, final: Path) -> int:
    """Rewrite the staging path to the final one in the text files that hold it (scripts, activators, .pth)."""
    old, new = str(staging).encode(), str(final).encode()
    candidates = [p for p in (staging / "bin").iterdir() if p.is_file() and not p.is_symlink()]
    candidates.append(staging / "pyvenv.cfg")
    for site in staging.glob("lib*/*/site-packages"):
        candidates += [p for p in site.iterdir() if p.suffix in (".pth", ".egg-link") and p.is_file()]
    changed = 0
    for path in candidates:
        try:
            if path.is_symlink() or path.stat().st_size > 1 << 20:  # a link may point out of the environment
                continue
            content = path.read_bytes()
        except OSError:
            continue
        if b"\0" in content[:8192] or old not in content:
            continue
        path.write_bytes(content.replace(old, new))
        changed += 1
    return changed


def error_summary(lines: list[str]) -> str:
    """One line from an installer's output: its error message and causes, else its last line."""
    start = next((i for i, line in enumerate(lines)
                  if re.match(r"\s*(error|ERROR|×)[:\s]", line) or line.lstrip().startswith("×")), None)
    chosen = lines[start:] if start is not None else [next((line for line in reversed(lines) if line.strip()), "")]
    parts = [re.sub(r"\s+", " ", re.sub(r"^[\s×╰─▶│|:]*(error:|ERROR:|cause:|help:)?\s*", "", line)).strip()
             for line in chosen]
    text = ""
    for part in filter(None, parts):
        text += (part if not text else (" " if text.endswith((":", ".", ",")) else ": ") + part)
    return text[:400] + ("..." if len(text) > 400 else "") if text else "no output"
