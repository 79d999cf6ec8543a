"""Luigi's own examples (from its source distribution), packaged as the installable package `examples`.

Luigi ships `examples/` in its sdist only, not in its wheel. tests/run.sh
downloads the sdist of the installed luigi into `.sdists` (or
POLTERGUST_TEST_SDISTS); here the examples used by the tests and benchmarks
are taken from it and built into a wheel, `luigi-examples`, whose package is
`examples`, so that `--module examples.dynamic_requirements Dynamic` works
as in luigi's own documentation.

One change is made to the sources: the examples write into fixed places
(`/tmp/...`, or `data/...` under the working directory), so every run would
share, and find complete, the outputs of the one before, and nodes would not
see each other's relative files. Each string literal naming such a path is
prefixed with the directory in the environment variable LUIGI_EXAMPLES_ROOT
(`"/tmp/Data_%d.txt"` becomes `ROOT + "/tmp/Data_%d.txt"`). Nothing else of
the task graphs changes.
"""
from __future__ import annotations

import importlib.metadata
import io
import os
import subprocess
import sys
import tarfile
import tokenize
from pathlib import Path

from harness.servers import ROOT

SDISTS = Path(os.environ.get("POLTERGUST_TEST_SDISTS") or ROOT / ".sdists").resolve()
ROOT_VARIABLE = "LUIGI_EXAMPLES_ROOT"
MODULES = ("__init__", "dynamic_requirements", "per_task_retry_policy", "hello_world", "top_artists")
PROJECT = "luigi-examples"
_PREFIX = f'__import__("os").environ["{ROOT_VARIABLE}"] + '
_RELOCATED = ("/tmp/", "data/")


def luigi_version() -> str:
    return importlib.metadata.version("luigi")


def find_sdist() -> Path | None:
    """The sdist of the luigi installed here, if tests/run.sh downloaded it."""
    path = SDISTS / f"luigi-{luigi_version()}.tar.gz"
    return path if path.is_file() else None


def missing_sdist_message() -> str:
    return (f"luigi's source distribution {SDISTS / f'luigi-{luigi_version()}.tar.gz'} is absent: tests/run.sh "
            f"downloads it (pip download --no-binary :all: --no-deps --dest {SDISTS} luigi=={luigi_version()})")


def relocate(source: str) -> str:
    """`source` with every string literal starting with /tmp/ or data/ put under $LUIGI_EXAMPLES_ROOT."""
    lines = source.splitlines(keepends=True)
    edits = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.STRING or token.start[0] != token.end[0]:
            continue  # docstrings and other multi-line strings stay as they are
        quote = token.string[:1]
        if quote not in "'\"" or token.string[:3] in ('"""', "'''"):
            continue
        body = token.string[1:]
        if body.startswith(_RELOCATED):
            absolute = body if body.startswith("/") else "/" + body
            edits.append((token.start, token.end, f"{_PREFIX}{quote}{absolute}"))
    for (row, start), (_, end), text in reversed(edits):  # right to left, so columns stay valid
        line = lines[row - 1]
        lines[row - 1] = line[:start] + text + line[end:]
    return "".join(lines)


def build_wheel(sdist: Path, workdir: Path) -> Path:
    """Build the `luigi-examples` wheel from `sdist` in `workdir`; returns the directory holding it."""
    source = workdir / "source"
    package = source / "examples"
    package.mkdir(parents=True)
    top = sdist.name[: -len(".tar.gz")]
    with tarfile.open(sdist) as archive:
        for module in MODULES:
            member = archive.extractfile(f"{top}/examples/{module}.py")
            if member is None:
                raise FileNotFoundError(f"{sdist} has no examples/{module}.py")
            (package / f"{module}.py").write_text(relocate(member.read().decode()))
    (source / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{PROJECT}"\nversion = "{luigi_version()}"\ndependencies = ["luigi"]\n\n'
        '[tool.setuptools]\npackages = ["examples"]\n'
    )
    wheels = workdir / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(wheels), str(source)], check=True, cwd=workdir, capture_output=True)
    return wheels
