"""Find the Python interpreter an environment file asks for, and say exactly what it is.

`virtualenv: {python: ...}` may name:

- nothing: the interpreter the node itself runs on (its base interpreter when
  the node runs in a virtualenv);
- a path (anything with a `/`): that executable;
- a command name (`python3.8`, `python3`, `pypy3`): looked up on the node's
  `PATH`. A pyenv shim on the way is asked which interpreter it would run
  (`pyenv which`); a shim for a version that is not selected (pyenv then
  refuses to run it) is skipped rather than failing the build;
  after `PATH`, pyenv's installed versions (`$PYENV_ROOT/versions/*/bin`, the
  newest matching one), then the Pythons uv manages (`uv python find`);
- a version (`3.8`, `3.8.18`): the same search for `python3.8`; a full
  version must match exactly.

Python is never downloaded: an interpreter missing on the node is an error.

The identity of an interpreter (its real path, implementation, full version,
platform and C library) is part of an environment's cache key. Finding and
probing an interpreter runs a subprocess, so both are remembered for the life
of the process: a cache hit costs no subprocess.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from poltergust.errors import PoltergustError

PROBE = (
    "import json, platform, sys, sysconfig\n"
    "print(json.dumps({\n"
    "    'implementation': sys.implementation.name,\n"
    "    'version': platform.python_version(),\n"
    "    'platform': sysconfig.get_platform(),\n"
    "    'libc': ' '.join(platform.libc_ver()).strip(),\n"
    "    'abiflags': getattr(sys, 'abiflags', ''),\n"
    "    'pointer_bits': 64 if sys.maxsize > 2 ** 32 else 32,\n"
    "}))\n"
)
"""Runs on every interpreter from 3.6 on; what it prints decides binary compatibility."""

VERSION_REQUEST = re.compile(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?$")


class InterpreterNotFound(PoltergustError):
    """The requested interpreter is not on this node, or does not run."""


@dataclass(frozen=True)
class Interpreter:
    path: str
    """Real path of the executable (symbolic links resolved)."""
    implementation: str
    version: str
    platform: str
    libc: str
    abiflags: str
    pointer_bits: int

    def identity(self) -> dict[str, object]:
        """Everything an environment built on this interpreter depends on."""
        return {
            "path": self.path, "implementation": self.implementation, "version": self.version,
            "platform": self.platform, "libc": self.libc, "abiflags": self.abiflags, "pointer_bits": self.pointer_bits,
        }

    def describe(self) -> str:
        name = {"cpython": "CPython", "pypy": "PyPy"}.get(self.implementation, self.implementation)
        return f"{name} {self.version} ({self.path}, {self.platform}{', ' + self.libc if self.libc else ''})"


_lock = threading.Lock()
_resolved: dict[tuple[str, str, str], str] = {}
_probed: dict[str, Interpreter] = {}


def find(request: str | None, environ: Mapping[str, str]) -> Interpreter:
    """The interpreter for a `python:` option (None: the node's own); remembered per process."""
    search_path = environ.get("PATH", os.defpath)
    memo = (str(request or ""), search_path, environ.get("PYENV_ROOT", ""))
    with _lock:
        path = _resolved.get(memo)
    if path is None:
        path = _resolve(str(request) if request else None, environ)
        with _lock:
            _resolved[memo] = path
    return probe(path)


def cached(request: str | None, environ: Mapping[str, str]) -> Interpreter | None:
    """The interpreter for `request` if it was already found by this process (no I/O at all)."""
    memo = (str(request or ""), environ.get("PATH", os.defpath), environ.get("PYENV_ROOT", ""))
    with _lock:
        path = _resolved.get(memo)
        return _probed.get(path) if path else None


def probe(path: str) -> Interpreter:
    with _lock:
        known = _probed.get(path)
    if known is not None:
        return known
    if path == own_interpreter():
        lines: list[str] = []
        # The probe's `print` writes to this list, not to sys.stdout: redirecting sys.stdout would be process-wide,
        # and two probes at once in two threads would each read the other's output (or none).
        exec(PROBE, {"print": lines.append})  # noqa: S102 -- our own constant code, run in-process to spare a subprocess
        text = "\n".join(lines)
    else:
        try:
            completed = subprocess.run([path, "-I", "-c", PROBE], capture_output=True, text=True, timeout=60,
                                       stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise InterpreterNotFound(f"{path} does not run: {exc}") from None
        if completed.returncode != 0:
            first = next((line for line in completed.stderr.splitlines() if line.strip()), "")
            raise InterpreterNotFound(f"{path} does not run (exit {completed.returncode}): {first.strip()[:200]}")
        text = completed.stdout
    try:
        interpreter = Interpreter(path=path, **json.loads(text.strip().splitlines()[-1]))
    except (ValueError, TypeError, IndexError):
        raise InterpreterNotFound(f"{path} does not look like a Python interpreter") from None
    with _lock:
        _probed[path] = interpreter
    return interpreter


def own_interpreter() -> str:
    """Real path of the interpreter this process runs on (its base, in a virtualenv)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _resolve(request: str | None, environ: Mapping[str, str]) -> str:
    if request is None:
        return own_interpreter()
    if "/" in request:
        path = Path(request).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise InterpreterNotFound(f"{request} is not an executable file on this node")
        if _is_pyenv_shim(path):
            return _resolve(path.name, environ)
        return os.path.realpath(path)
    version = VERSION_REQUEST.match(request)
    if version:
        major, minor, _ = version.groups()
        name = f"python{major}.{minor}" if minor else f"python{major}"
    else:
        name = request
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise InterpreterNotFound(f"{request!r} is neither a path, a command name nor a version")
    exact = request if version and version.group(3) else None
    for candidate in _on_path(name, environ):
        if exact is None or probe(candidate).version == exact:
            return candidate
    for candidate in _in_pyenv(name, exact, environ):
        return candidate
    found = _uv_find(request, environ)
    if found:
        return found
    raise InterpreterNotFound(
        f"no interpreter {request!r} on this node (searched PATH, pyenv versions in {_pyenv_root(environ)}/versions "
        "and the Pythons uv manages)"
    )


def _on_path(name: str, environ: Mapping[str, str]) -> Iterator[str]:
    for directory in environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = Path(directory or ".") / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        if _is_pyenv_shim(candidate):
            selected = _pyenv_which(candidate, name, environ)
            if selected:
                yield selected
            continue  # a shim for a version pyenv has not selected would fail: look further
        try:
            probe(os.path.realpath(candidate))
        except InterpreterNotFound:
            continue
        yield os.path.realpath(candidate)


def _is_pyenv_shim(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(2048)
    except OSError:
        return False
    return head.startswith(b"#!") and b"pyenv" in head and b"exec" in head


def _pyenv_which(shim: Path, name: str, environ: Mapping[str, str]) -> str | None:
    root = shim.parent.parent
    pyenv = next((p for p in (root / "bin" / "pyenv", root / "libexec" / "pyenv") if p.exists()), None)
    if pyenv is None:
        return None
    try:
        completed = subprocess.run([str(pyenv), "which", name], capture_output=True, text=True, timeout=30,
                                   env={**environ, "PYENV_ROOT": str(root)}, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = completed.stdout.strip()
    if completed.returncode != 0 or not path or not os.path.isfile(path):
        return None
    try:
        probe(os.path.realpath(path))
    except InterpreterNotFound:
        return None
    return os.path.realpath(path)


def _pyenv_root(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("PYENV_ROOT") or Path(environ.get("HOME") or Path.home()) / ".pyenv")


def _in_pyenv(name: str, exact: str | None, environ: Mapping[str, str]) -> Iterator[str]:
    versions = _pyenv_root(environ) / "versions"
    if not versions.is_dir():
        return

    def order(directory: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", directory.name)[:3])

    for directory in sorted(versions.iterdir(), key=order, reverse=True):
        candidate = directory / "bin" / name
        if exact is not None and directory.name != exact:
            continue
        if candidate.is_file() and os.access(candidate, os.X_OK):
            try:
                probe(os.path.realpath(candidate))
            except InterpreterNotFound:
                continue
            yield os.path.realpath(candidate)


def _uv_find(request: str, environ: Mapping[str, str]) -> str | None:
    from uv import find_uv_bin

    shims = {str(_pyenv_root(environ) / "shims")}
    path = os.pathsep.join(d for d in environ.get("PATH", os.defpath).split(os.pathsep) if d not in shims)
    try:
        completed = subprocess.run(
            [find_uv_bin(), "python", "find", "--no-project", request], capture_output=True, text=True, timeout=60,
            env={**environ, "PATH": path, "UV_PYTHON_DOWNLOADS": "never"}, stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = completed.stdout.strip()
    if completed.returncode != 0 or not found:
        return None
    try:
        probe(os.path.realpath(found))
    except InterpreterNotFound:
        return None
    return os.path.realpath(found)
