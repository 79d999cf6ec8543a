"""Build environments into a node's cache ahead of any run, for a node image that starts with them ready.

`python -m poltergust.prebuild --env-dir DIR URL...` reads each environment
file (gs://BUCKET/OBJECT or a local path) and builds it exactly as a run
would, into DIR, where a node with that `--env-dir` finds it cached.
`deploy/node-init.sh` runs it when baking an image. Environments that
reference node secrets (`{{NAME}}`) are refused: nothing secret may end up
in an image.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from poltergust.config import MAX_FILE_SIZE, ConfigError, parse_environment
from poltergust.environments import EnvironmentBuildError, Environments
from poltergust.layout import split_url
from poltergust.run.log import RunLog
from poltergust.storage import StorageError, open_store

log = logging.getLogger("poltergust.prebuild")


async def prebuild(env_dir: Path, urls: Sequence[str]) -> list[str]:
    """Build each environment file's environment into `env_dir`; returns the problems (empty: all built)."""
    environments = Environments(env_dir)
    problems = []
    with tempfile.TemporaryDirectory() as logs:
        for index, url in enumerate(urls):
            runlog = RunLog(Path(logs) / f"{index}.log")
            try:
                bucket, name = split_url(url)
                async with open_store(bucket) as store:
                    blob = await store.read(name, max_bytes=MAX_FILE_SIZE)
                spec = parse_environment(blob.data, url)
                if Environments.referenced(spec):
                    raise ConfigError(url, "references node secrets ({{NAME}}), which must not go into an image",
                                      "dependencies")
                path = await environments.get(spec, runlog)
                print(f"{url}: {path}", flush=True)
            except (ValueError, StorageError, EnvironmentBuildError) as exc:  # ConfigError is a ValueError
                problems.append(str(exc) if isinstance(exc, ConfigError) else f"{url}: {exc}")
                problems.extend(f"  {line}" for line in runlog.tail(20).splitlines())
            finally:
                runlog.close()
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m poltergust.prebuild", description=__doc__.split("\n\n")[0])
    parser.add_argument("--env-dir", type=Path, required=True, help="the node's --env-dir (its environment cache)")
    parser.add_argument("urls", nargs="+", metavar="URL", help="environment file: gs://BUCKET/OBJECT or a path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    problems = asyncio.run(prebuild(args.env_dir, args.urls))
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
