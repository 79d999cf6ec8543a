"""Build, cache, share and evict the Python environments pipelines run in.

Building
    `uv venv --relocatable` with the interpreter the file asks for, then one
    `uv pip install` of every dependency (each string shell-split and passed as
    written: specifiers, URLs, paths, `-e`, `--find-links`, `--index-url`...).
    Options of `virtualenv:` that uv has no equivalent for make the node build
    with `virtualenv` and pip instead (the run log says which option and why);
    such an environment is built in a staging directory too and its absolute
    paths are rewritten when it is moved into place.
    The pip settings `PIP_INDEX_URL`, `PIP_EXTRA_INDEX_URL`, `PIP_FIND_LINKS`,
    `PIP_NO_INDEX` and `PIP_TRUSTED_HOST` of the node are honoured by either
    installer (uv is given their uv forms).

Secrets
    `{{NAME}}` in a dependency is replaced by the node's variable NAME at install
    time. Dependencies that reference one reach the installer through a private
    temporary requirements file (mode 0600, deleted after), never through its
    command line; the logged command shows them masked, and the run log masks
    every referenced value. (Installers may still start helpers, such as `git`
    for a `git+https://TOKEN@...` URL, with the URL on their command line.)
    An environment whose files contain a referenced value is never shared.

Cache
    `ENV_DIR/KEY/`, where KEY hashes the normalised options and dependencies
    (the `{{NAME}}` references, not their values), the interpreter's identity
    (real path, implementation, full version, platform, C library) and a
    format version. A cache hit costs one system call (touching the
    environment's manifest records the use) and no subprocess: interpreters are
    found and probed once per process. Builds happen in `ENV_DIR/.build-KEY-*`
    and are renamed into place when complete, so a half-built environment is
    never used; a failed build leaves nothing behind and the next run tries
    again. Runs needing the same environment wait for one build: in a process
    through a shared future, between node processes sharing ENV_DIR through a
    lock file (`ENV_DIR/.locks/KEY.build`).

Eviction (`--env-cache-size`)
    After a new environment lands, the least recently used ones are removed
    until the cache fits the budget. An environment is in use from the moment
    a run asks for it until that run ends; every process holds a shared lock
    (`ENV_DIR/.locks/KEY.use`) on the environments it uses and eviction only
    removes one whose exclusive lock it gets, so node processes sharing
    ENV_DIR never evict each other's environments in use. Stale staging
    directories of crashed builds are removed on the way.

Sharing (`--share-environments`)
    After building, a node uploads a relocatable archive of the environment
    beside its file (see `env_archive`); a node without the environment
    downloads and unpacks that archive instead of building, when its checksum,
    key and identity all match. Environments built with the virtualenv fallback
    are not relocatable and are not shared.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import AsyncIterator, Callable, Mapping

from uv import find_uv_bin

from . import interpreters, metrics
from .config import EnvironmentSpec
from .env_archive import (
    MANIFEST, ArchiveRefused, SecretInEnvironment, archive_name, check_data, check_metadata, metadata_for, pack,
    unpack,
)
from .interpreters import Interpreter, InterpreterNotFound
from .runlog import RunLog
from .storage import NotFound, StorageError, open_store, split_url
from .subprocesses import run_streaming

log = logging.getLogger(__name__)

FORMAT = 2
"""Bumped when the layout of an environment changes, so old ones are not mistaken for new ones."""

SECRET_REFERENCE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
KEY_PATTERN = re.compile(r"[0-9a-f]{32}")

UV_OPTIONS = {"python", "system-site-packages", "prompt"}
"""`virtualenv:` options uv can honour itself."""
UV_IRRELEVANT = {"no-pip", "no-setuptools", "no-wheel", "no-seed", "without-pip", "clear", "no-download",
                 "never-download", "no-periodic-update", "no-vcs-ignore"}
"""Options about seeding pip or housekeeping that uv, which seeds nothing, satisfies as they are (when true)."""

VALUE_OPTIONS = {"-e", "--editable", "-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-c",
                 "--constraint", "-r", "--requirement", "--trusted-host", "--no-binary", "--only-binary"}
"""Installer options that take a value, for writing secret-bearing dependencies as requirement lines."""

STALE_BUILD_SECONDS = 600.0


class EnvironmentBuildError(Exception):
    """Building an environment failed; the message is one line for the error file."""


class _BuildInterrupted(Exception):
    """The run that was building an environment was cancelled; a waiter takes over."""


def parse_size(text: str | int | None) -> int | None:
    """A disk budget: bytes, or a number with K, M, G or T (powers of 1024); 0 or empty: no budget."""
    if text is None:
        return None
    if isinstance(text, int):
        return text or None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r}: expected a size such as 500M, 10G or a number of bytes")
    number, unit = match.groups()
    size = int(float(number) * 1024 ** " KMGT".index(unit.upper() or " "))
    return size or None


def installer_settings(environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The environment for uv (pip settings translated) and the options uv only takes as flags."""
    env = dict(environ)
    env.pop("VIRTUAL_ENV", None)
    flags: list[str] = []
    if env.get("PIP_INDEX_URL") and not (env.get("UV_INDEX_URL") or env.get("UV_DEFAULT_INDEX")):
        env["UV_INDEX_URL"] = env["PIP_INDEX_URL"].strip()
    if env.get("PIP_EXTRA_INDEX_URL") and not env.get("UV_EXTRA_INDEX_URL"):
        env["UV_EXTRA_INDEX_URL"] = " ".join(env["PIP_EXTRA_INDEX_URL"].split())  # both space-separated
    if env.get("PIP_FIND_LINKS") and not env.get("UV_FIND_LINKS"):
        env["UV_FIND_LINKS"] = ",".join(env["PIP_FIND_LINKS"].split())  # pip: spaces; uv: commas
    if env.get("PIP_TRUSTED_HOST") and not env.get("UV_INSECURE_HOST"):
        env["UV_INSECURE_HOST"] = " ".join(env["PIP_TRUSTED_HOST"].split())
    if env.get("PIP_NO_INDEX", "").strip().lower() in ("1", "y", "yes", "t", "true", "on"):
        flags.append("--no-index")  # uv reads no variable for it
    return env, flags


def normalised(spec: EnvironmentSpec) -> dict[str, object]:
    """What determines an environment's content, written one way (the interpreter is keyed apart)."""
    options = {}
    for name, value in spec.virtualenv.items():
        option = _option_name(name)
        if option != "python":
            options[option] = value
    dependencies = [" ".join(shlex.quote(token) for token in shlex.split(dependency))
                    for dependency in spec.dependencies]
    return {"format": FORMAT, "virtualenv": dict(sorted(options.items())), "dependencies": dependencies}


def _option_name(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


class _Plan:
    """How one environment is built: the installer, its options and the dependency arguments."""

    def __init__(self, environments: "Environments", spec: EnvironmentSpec, interpreter: Interpreter) -> None:
        self.spec = spec
        self.interpreter = interpreter
        self.venv_options: list[str] = []
        self.fallback: str | None = None
        """Why uv cannot build this environment (then virtualenv and pip do)."""
        virtualenv_options: list[str] = []
        for name, value in spec.virtualenv.items():
            option = _option_name(name)
            if option == "python":
                continue
            if value is None or value is False:
                continue
            argument = f"--{option}" if value is True else f"--{option}={value}"
            virtualenv_options.append(argument)
            if option == "system-site-packages":
                self.venv_options.append("--system-site-packages")
            elif option == "prompt":
                self.venv_options += ["--prompt", str(value)]
            elif option in UV_IRRELEVANT and value is True:
                pass
            elif self.fallback is None:
                self.fallback = f"uv has no equivalent of the virtualenv option {name}: {value}"
        if self.fallback:
            self.venv_options = virtualenv_options
        self.public: list[str] = []
        """Dependency arguments without secrets, for the command line."""
        self.private: list[str] = []
        """Requirement lines holding secrets, for the private requirements file."""
        self.display: list[str] = []
        """The dependency arguments as logged: secrets masked."""
        for index, dependency in enumerate(spec.dependencies):
            references = SECRET_REFERENCE.findall(dependency)
            if not references:
                tokens = shlex.split(dependency)
                self.public += tokens
                self.display += tokens
                continue
            values = []
            for name in references:
                if name not in environments.environ:
                    raise EnvironmentBuildError(
                        f"{spec.source}: dependencies[{index}]: references {{{{{name}}}}}, "
                        "which is not set on this node"
                    )
                values.append(environments.environ[name])
            substituted = SECRET_REFERENCE.sub(lambda m: environments.environ[m.group(1)], dependency)
            tokens = shlex.split(substituted)
            self.private += _requirement_lines(tokens)
            self.display += [_mask(token, values) for token in tokens]

    @property
    def installer(self) -> str:
        return "virtualenv+pip" if self.fallback else "uv"


def _requirement_lines(tokens: list[str]) -> list[str]:
    lines: list[str] = []
    pending: str | None = None
    for token in tokens:
        if pending is not None:
            lines.append(f"{pending} {token}")
            pending = None
        elif token in VALUE_OPTIONS:
            pending = token
        elif token.startswith("--") and "=" in token and token.split("=", 1)[0] in VALUE_OPTIONS:
            lines.append(" ".join(token.split("=", 1)))
        else:
            lines.append(token)
    if pending is not None:
        lines.append(pending)
    return lines


def _mask(text: str, secrets: list[str]) -> str:
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "****")
    return text


class Environments:
    def __init__(
        self, root: Path, node_environ: Mapping[str, str] | None = None, *,
        cache_size: int | str | None = None, share: bool = False,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ".locks").mkdir(exist_ok=True)
        self.environ = dict(os.environ if node_environ is None else node_environ)
        self.cache_size = parse_size(cache_size)
        """Disk budget in bytes (None: no budget)."""
        self.share = share
        """Download and upload environment archives beside the environment files."""
        self._builds: dict[str, asyncio.Future[Path]] = {}
        self._users: dict[str, int] = {}
        self._use_locks: dict[str, int] = {}
        self._held: dict[asyncio.Task, set[str]] = {}
        self._evicting: asyncio.Lock | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.on_evict: Callable[[str], None] | None = None
        """Called with the key of each environment this process evicts (its warm interpreters stop)."""

    # -- the interface the node uses ----------------------------------------

    def key(self, spec: EnvironmentSpec) -> str:
        """The cache key of `spec` on this node (may probe the interpreter once per process)."""
        return self._key(spec, self._interpreter(spec))

    def secrets(self, spec: EnvironmentSpec) -> list[str]:
        """Values of the node variables the dependencies reference, to be masked in logs."""
        return [self.environ[name] for dep in spec.dependencies for name in SECRET_REFERENCE.findall(dep)
                if self.environ.get(name)]

    async def get(self, spec: EnvironmentSpec, runlog: RunLog) -> Path:
        """Return the directory of a ready environment for `spec`, building it if needed.

        The environment counts as in use (never evicted) until the asyncio task
        that asked for it ends.
        """
        for secret in self.secrets(spec):
            runlog.add_secret(secret)
        try:
            return await self._get(spec, runlog)
        except OSError as exc:  # the cache directory itself failed us (permissions, disk full...)
            raise EnvironmentBuildError(f"environment cache {self.root}: {exc}") from exc

    async def _get(self, spec: EnvironmentSpec, runlog: RunLog) -> Path:
        request = spec.virtualenv.get("python")
        interpreter = interpreters.cached(request, self.environ)
        if interpreter is None:
            interpreter = await asyncio.to_thread(self._interpreter, spec)
        key = self._key(spec, interpreter)
        path = self.root / key
        await self._hold(key)
        while True:
            if self._touch(path):
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

    def in_use(self) -> set[str]:
        """Keys of the environments runs of this process are using."""
        return {key for key, users in self._users.items() if users}

    async def wait_background(self) -> None:
        """Wait for background work (uploads of archives) to finish."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # -- keys and interpreters ---------------------------------------------

    def _interpreter(self, spec: EnvironmentSpec) -> Interpreter:
        request = spec.virtualenv.get("python")
        try:
            return interpreters.find(None if request is None else str(request), self.environ)
        except InterpreterNotFound as exc:
            hint = f" (write the version as a string: python: '{request}')" if isinstance(request, float) else ""
            raise EnvironmentBuildError(f"{spec.source}: virtualenv.python: {exc}{hint}") from None

    @staticmethod
    def _key(spec: EnvironmentSpec, interpreter: Interpreter) -> str:
        identity = json.dumps({"content": normalised(spec), "interpreter": interpreter.identity()}, sort_keys=True)
        return hashlib.sha256(identity.encode()).hexdigest()[:32]

    def _touch(self, path: Path) -> bool:
        """Is the environment at `path` complete? Records the use (its manifest's mtime) if so."""
        try:
            os.utime(path / MANIFEST)
            return True
        except FileNotFoundError:
            return False
        except OSError:  # not ours to touch (permissions): complete all the same
            return (path / MANIFEST).exists()

    # -- in use ------------------------------------------------------------

    async def _hold(self, key: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        held = self._held.get(task)
        if held is not None and key in held:
            return
        if not self._users.get(key):
            fd = await self._lock(key, "use", fcntl.LOCK_SH)
            if key in self._use_locks:  # another run of this process took it meanwhile
                os.close(fd)
            else:
                self._use_locks[key] = fd
        self._users[key] = self._users.get(key, 0) + 1
        if held is None:
            held = self._held[task] = set()
            task.add_done_callback(self._release)
        held.add(key)

    def _release(self, task: asyncio.Task) -> None:
        for key in self._held.pop(task, ()):
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]
                fd = self._use_locks.pop(key, None)
                if fd is not None:
                    os.close(fd)  # drops the shared lock

    def _lock_path(self, key: str, kind: str) -> Path:
        return self.root / ".locks" / f"{key}.{kind}"

    async def _lock(self, key: str, kind: str, mode: int, runlog: RunLog | None = None) -> int:
        """Take a file lock without blocking the event loop; returns its descriptor."""
        fd = os.open(self._lock_path(key, kind), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        said = False
        try:
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    if runlog is not None and not said:
                        runlog.note(f"waiting for environment {key}, being built by another node process")
                        said = True
                    await asyncio.sleep(0.2 if kind == "build" else 0.02)
        except BaseException:
            os.close(fd)
            raise

    @contextlib.asynccontextmanager
    async def _build_lock(self, key: str, runlog: RunLog) -> AsyncIterator[None]:
        fd = await self._lock(key, "build", fcntl.LOCK_EX, runlog)
        try:
            yield
        finally:
            os.close(fd)

    # -- obtaining an environment --------------------------------------------

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
        plan = _Plan(self, spec, interpreter)
        built = False
        async with self._build_lock(key, runlog):
            if self._touch(path):
                runlog.note(f"environment {key} was built by another node process meanwhile; using it")
                return
            if self.share and not plan.fallback and await self._download(spec, key, interpreter, path, runlog):
                metrics.ENV_BUILDS.labels("downloaded").inc()
            else:
                try:
                    await self._build(plan, key, path, runlog)
                except BaseException:
                    metrics.ENV_BUILDS.labels("failed").inc()
                    raise
                metrics.ENV_BUILDS.labels("built").inc()
                built = True
        await self._evict(runlog)
        if built and self.share:
            if plan.fallback:
                runlog.note("not sharing this environment: virtualenv builds are not relocatable")
            else:
                try:
                    url = self._archive_url(spec, key)
                except ValueError:
                    return  # not a bucket URL: nowhere to share it
                runlog.note(f"sharing the environment in the background as {url}")
                task = asyncio.create_task(self._upload(spec, key, interpreter, path, url))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _build(self, plan: _Plan, key: str, path: Path, runlog: RunLog) -> None:
        spec, interpreter = plan.spec, plan.interpreter
        staging = self.root / f".build-{key}-{uuid.uuid4().hex[:8]}"
        loop = asyncio.get_running_loop()
        started = loop.time()
        runlog.note(f"building environment {key} from {spec.source} with {interpreter.describe()}")
        if plan.fallback:
            runlog.note(f"{plan.fallback}; building with virtualenv and pip instead of uv")
        env, flags = installer_settings(self.environ)
        requirements: Path | None = None
        try:
            if plan.private:
                requirements = self._private_requirements(plan.private)
            if plan.fallback:
                await self._build_with_virtualenv(plan, staging, path, env, flags, requirements, runlog)
            else:
                await self._build_with_uv(plan, staging, env, flags, requirements, runlog)
            manifest = self._manifest(plan, key)
            manifest["size"] = await asyncio.to_thread(_disk_usage, staging)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            if not self._move_into_place(staging, path):
                runlog.note("another node process built the same environment first; using it")
        finally:
            if requirements is not None:
                requirements.unlink(missing_ok=True)
            if staging.exists():
                await asyncio.to_thread(shutil.rmtree, staging, True)
        metrics.ENV_BUILD_SECONDS.observe(loop.time() - started)
        runlog.note(f"environment {key} built in {loop.time() - started:.1f}s ({plan.installer})")

    async def _build_with_uv(self, plan: _Plan, staging: Path, env: dict[str, str], flags: list[str],
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
        await self._step(command, ["uv", *head, *flags, *plan.display], env, runlog,
                         f"{plan.spec.source}: installing the dependencies")

    async def _build_with_virtualenv(self, plan: _Plan, staging: Path, path: Path, env: dict[str, str],
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
            await self._step(command, [*shown, *plan.display], pip_env, runlog,
                             f"{plan.spec.source}: installing the dependencies")
        changed = await asyncio.to_thread(_relocate, staging, path)
        runlog.note(f"rewrote the staging path in {changed} file(s) of the virtualenv for its final place")

    def _move_into_place(self, staging: Path, path: Path) -> bool:
        """Rename a complete environment into place; False if a complete one is already there."""
        if path.exists() and not self._touch(path):  # an incomplete leftover (manifest lost): replace it
            trash = self.root / f".trash-{path.name}-{uuid.uuid4().hex[:8]}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            staging.rename(path)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not self._touch(path):
                raise
            return False

    def _private_requirements(self, lines: list[str]) -> Path:
        directory = self.root / ".private"
        directory.mkdir(mode=0o700, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="requirements-", suffix=".txt", dir=directory)  # mode 0600
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        return Path(name)

    async def _step(self, command: list[str], display: list[str], env: dict[str, str], runlog: RunLog,
                    what: str) -> None:
        runlog.note("$ " + shlex.join(display))
        output: list[str] = []

        def sink(line: str) -> None:
            runlog.write(line)
            output.append(runlog.mask(line.rstrip("\n")))
            del output[:-60]

        code = await run_streaming(command, env=env, cwd=self.root, sink=sink)
        if code != 0:
            raise EnvironmentBuildError(f"{what} failed ({display[0]} exit {code}): {_error_summary(output)}")

    def _manifest(self, plan: _Plan, key: str) -> dict[str, object]:
        return {
            "key": key, "identity": plan.interpreter.identity(), "python": plan.interpreter.describe(),
            "content": normalised(plan.spec), "source": plan.spec.source, "installer": plan.installer,
            "relocatable": not plan.fallback, "built_by": socket.gethostname(),
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    # -- sharing -----------------------------------------------------------

    @staticmethod
    def _archive_location(spec: EnvironmentSpec, key: str) -> tuple[str, str]:
        bucket, name = split_url(spec.source)
        return bucket, archive_name(name, key)

    def _archive_url(self, spec: EnvironmentSpec, key: str) -> str:
        bucket, name = self._archive_location(spec, key)
        return f"{bucket}/{name}"

    async def _download(self, spec: EnvironmentSpec, key: str, interpreter: Interpreter, path: Path,
                        runlog: RunLog) -> bool:
        """Use the shared archive of `key` if there is a good one; False: build instead."""
        try:
            bucket, name = self._archive_location(spec, key)
        except ValueError:
            return False
        url = f"{bucket}/{name}"
        store = open_store(bucket)
        staging = self.root / f".build-{key}-{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        try:
            try:
                info = await store.stat(name)
            except NotFound:
                runlog.note(f"no shared archive {url} yet")
                return False
            check_metadata(info.metadata, key, interpreter.identity())
            blob = await store.read(name, info.generation)
            check_data(blob.data, blob.info.metadata)
            prefix = os.path.dirname(os.path.dirname(interpreter.path))
            manifest = await asyncio.to_thread(unpack, blob.data, staging, prefix)
            if manifest.get("key") != key or manifest.get("identity") != interpreter.identity():
                raise ArchiveRefused(f"its manifest describes another environment ({manifest.get('python', '?')})")
            check = await asyncio.create_subprocess_exec(str(staging / "bin" / "python"), "-c", "import sys",
                                                         stdout=asyncio.subprocess.DEVNULL,
                                                         stderr=asyncio.subprocess.DEVNULL)
            if await check.wait() != 0:
                raise ArchiveRefused("its python does not run on this node")
            manifest.update(source=spec.source, downloaded_from=url, size=await asyncio.to_thread(_disk_usage, staging))
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            self._move_into_place(staging, path)
            runlog.note(f"environment {key} downloaded from {url} ({len(blob.data) / 1e6:.1f} MB) and unpacked "
                        f"in {time.monotonic() - started:.1f}s")
            return True
        except ArchiveRefused as exc:
            runlog.note(f"not using the shared archive {url}: {exc}; building instead")
            return False
        except (StorageError, OSError) as exc:
            runlog.note(f"could not fetch the shared archive {url} ({exc}); building instead")
            return False
        finally:
            await store.close()
            if staging.exists():
                await asyncio.to_thread(shutil.rmtree, staging, True)

    async def _upload(self, spec: EnvironmentSpec, key: str, interpreter: Interpreter, path: Path, url: str) -> None:
        await self._hold(key)  # not evicted while being packed
        bucket, name = self._archive_location(spec, key)
        store = open_store(bucket)
        started = time.monotonic()
        try:
            packed = await asyncio.to_thread(pack, path, self.secrets(spec))
            metadata = metadata_for(packed, key, interpreter.identity(), interpreter.describe())
            await store.write(name, packed.data, metadata=metadata, content_type="application/gzip")
            log.info("shared environment %s as %s (%.1f MB, %d files, %.1fs)", key, url, len(packed.data) / 1e6,
                     packed.files, time.monotonic() - started)
        except SecretInEnvironment as exc:
            log.warning("environment %s is not shared: %s", key, exc)
        except Exception as exc:  # noqa: BLE001 -- sharing is best effort; the run goes on regardless
            log.warning("could not share environment %s as %s: %s", key, url, exc)
        finally:
            await store.close()

    # -- eviction ----------------------------------------------------------

    async def _evict(self, runlog: RunLog | None = None) -> None:
        if self._evicting is None:
            self._evicting = asyncio.Lock()
        async with self._evicting:
            evicted, over = await asyncio.to_thread(self._evict_sync, self.in_use())
        for key, size, used in evicted:
            message = (f"evicted environment {key} ({size / 1e6:.1f} MB, last used "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(used))}Z) to keep the cache within "
                       f"{self.cache_size / 1e6:.0f} MB")
            log.info("%s", message)
            if self.on_evict is not None:
                self.on_evict(key)
            if runlog is not None:
                runlog.note(message)
        if over > 0:
            log.warning("environment cache is %.1f MB over its budget; the rest is in use", over / 1e6)

    def _evict_sync(self, in_use: set[str]) -> tuple[list[tuple[str, int, float]], int]:
        entries: list[tuple[float, str, int]] = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root / ".private"):  # left by a node process that died mid-build
                if time.time() - entry.stat().st_mtime > STALE_BUILD_SECONDS:
                    os.unlink(entry.path)
        for entry in os.scandir(self.root):
            name = entry.name
            if name.startswith(".trash-"):
                shutil.rmtree(entry.path, ignore_errors=True)
            elif name.startswith(".build-"):
                self._remove_stale_build(entry)
            elif self.cache_size and KEY_PATTERN.fullmatch(name) and entry.is_dir(follow_symlinks=False):
                found = self._entry(Path(entry.path))
                if found is not None:
                    entries.append((found[0], name, found[1]))
        if not self.cache_size:
            return [], 0
        total = sum(size for _, _, size in entries)
        evicted = []
        for used, key, size in sorted(entries):
            if total <= self.cache_size:
                break
            if key in in_use:
                continue
            fd = os.open(self._lock_path(key, "use"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another node process is using it
                current = self._entry(self.root / key)
                if current is None or current[0] != used:
                    continue  # used (or removed) since the scan: no longer the least recently used
                os.rename(self.root / key, self.root / f".trash-{key}-{uuid.uuid4().hex[:8]}")
            finally:
                os.close(fd)
            total -= size
            evicted.append((key, size, used))
        for entry in os.scandir(self.root):
            if entry.name.startswith(".trash-"):
                shutil.rmtree(entry.path, ignore_errors=True)
        return evicted, total - self.cache_size

    @staticmethod
    def _entry(path: Path) -> tuple[float, int] | None:
        """(last use, size) of a cached environment; environments of older versions count too."""
        try:
            used = os.stat(path / MANIFEST).st_mtime
            size = json.loads((path / MANIFEST).read_text()).get("size")
        except FileNotFoundError:
            try:
                used = os.stat(path / "pyvenv.cfg").st_mtime
            except FileNotFoundError:
                return None
            size = None
        except ValueError:
            size = None
        if not isinstance(size, int):
            size = _disk_usage(path)
        return used, size

    def _remove_stale_build(self, entry: os.DirEntry) -> None:
        key = entry.name[len(".build-"):].split("-", 1)[0]
        try:
            if time.time() - entry.stat(follow_symlinks=False).st_mtime < STALE_BUILD_SECONDS:
                return
        except FileNotFoundError:
            return
        fd = os.open(self._lock_path(key, "build"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # being built right now
        else:
            shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)


def _disk_usage(root: Path) -> int:
    """Bytes the directory takes on disk (each inode once), as `du` counts."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, _, names in os.walk(root):
        for name in names + ["."]:
            try:
                info = os.lstat(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
    return total


def _relocate(staging: Path, final: Path) -> int:
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


def _error_summary(lines: list[str]) -> str:
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
