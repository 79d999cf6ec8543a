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
"""
from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from uv import find_uv_bin

from poltergust.node import metrics
from poltergust.run.log import RunLog
from poltergust.secret_env import SecretEnv
from poltergust.launch.processes import run_streaming
from poltergust.environments import git_credentials
from poltergust.environments.cache import Cache, disk_usage
from poltergust.environments.plan import UV_IRRELEVANT, UV_OPTIONS, EnvironmentBuildError, Plan, installer_settings, normalised


class Builder:
    def __init__(self, cache: Cache, secret_env: SecretEnv) -> None:
        self.cache = cache
        self.secret_env = secret_env

    async def build(self, plan: Plan, key: str, path: Path, runlog: RunLog) -> None:
        """Build `plan` into the cache as `path` (a staging directory renamed into place when complete)."""
        spec, interpreter = plan.spec, plan.interpreter
        staging = self.cache.staging(key)
        loop = asyncio.get_running_loop()
        started = loop.time()
        runlog.note(f"building environment {key} from {spec.source} with {interpreter.describe()}")
        if plan.fallback:
            runlog.note(f"{plan.fallback}; building with virtualenv and pip instead of uv")
        env, flags = installer_settings(self.secret_env.for_installers())
        if plan.git_credentials:
            await self._give_git_credentials(plan, runlog)
        requirements: Path | None = None
        try:
            if plan.private:
                requirements = self.cache.private_requirements(plan.private)
            if plan.fallback:
                await self._with_virtualenv(plan, staging, path, env, flags, requirements, runlog)
            else:
                await self._with_uv(plan, staging, env, flags, requirements, runlog)
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
        metrics.ENV_BUILD_SECONDS.observe(loop.time() - started)
        runlog.note(f"environment {key} built in {loop.time() - started:.1f}s ({plan.installer})")

    async def _with_uv(self, plan: Plan, staging: Path, env: dict[str, str], flags: list[str],
                       requirements: Path | None, runlog: RunLog) -> None:
        uv = find_uv_bin()
        venv = ["venv", "--relocatable", "--no-project", "--python", plan.interpreter.path, *plan.venv_options,
                str(staging)]
        await self._step([uv, *venv], ["uv", *venv], env, runlog, f"{plan.spec.source}: creating the virtualenv")
        if not (plan.public or plan.private):
            return
        head = ["pip", "install", "--python", str(staging / "bin" / "python")]
        if "--no-index" in plan.public or any(line.strip() == "--no-index" for line in plan.private):
            flags = [flag for flag in flags if flag != "--no-index"]
        command = [uv, *head, *flags, *plan.public]
        if requirements is not None:
            command += ["--requirement", str(requirements)]
        await self._step(command, ["uv", *head, *flags, *plan.display], install_environment(plan, env), runlog,
                         f"{plan.spec.source}: installing the dependencies", plan.git_credentials)

    async def _with_virtualenv(self, plan: Plan, staging: Path, path: Path, env: dict[str, str],
                               flags: list[str], requirements: Path | None, runlog: RunLog) -> None:
        import importlib.util

        if importlib.util.find_spec("virtualenv") is None:
            raise EnvironmentBuildError(
                f"{plan.spec.source}: virtualenv: {plan.fallback}, and the virtualenv package is not installed on "
                f"this node (uv supports: {', '.join(sorted(UV_OPTIONS | UV_IRRELEVANT))})"
            )
        venv = ["-m", "virtualenv", "--python", plan.interpreter.path, *plan.venv_options, str(staging)]
        await self._step([sys.executable, *venv], ["virtualenv", *venv[2:]], env, runlog,
                         f"{plan.spec.source}: creating the virtualenv")
        if plan.public or plan.private:
            python = str(staging / "bin" / "python")
            pip_env = {k: v for k, v in env.items() if not k.startswith("UV_")}
            probe = await asyncio.create_subprocess_exec(python, "-c", "import pip", env=pip_env,
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
            await self._step(command, [*shown, *plan.display], install_environment(plan, pip_env), runlog,
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

    async def _step(self, command: list[str], display: list[str], env: dict[str, str], runlog: RunLog,
                    what: str, credentials: list[git_credentials.GitCredential] | None = None) -> None:
        runlog.note("$ " + shlex.join(display))
        output: list[str] = []

        def sink(line: str) -> None:
            runlog.write(line)
            output.append(runlog.mask(line.rstrip("\n")))
            del output[:-60]

        code = await run_streaming(command, env=env, cwd=self.cache.root, sink=sink)
        if code != 0:
            refused = git_credentials.refused(output, credentials or [])
            cause = f"the git server refused the credentials for {', '.join(refused)}: " if refused else ""
            raise EnvironmentBuildError(f"{what} failed ({display[0]} exit {code}): {cause}{error_summary(output)}")


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
            if path.stat().st_size > 1 << 20:
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
    chosen = lines[start:] if start is not None else [next((l for l in reversed(lines) if l.strip()), "")]
    parts = [re.sub(r"\s+", " ", re.sub(r"^[\s×╰─▶│|:]*(error:|ERROR:|cause:|help:)?\s*", "", line)).strip()
             for line in chosen]
    text = ""
    for part in filter(None, parts):
        text += (part if not text else (" " if text.endswith((":", ".", ",")) else ": ") + part)
    return text[:400] + ("..." if len(text) > 400 else "") if text else "no output"
