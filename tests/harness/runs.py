"""Runs as a user makes them: upload a config, wait for its result file, read the run logs and /metrics."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from harness.servers import ROOT, WHEELHOUSE
from harness.waits import wait_for

if TYPE_CHECKING:
    from poltergust.environments import Environments
    from poltergust.run.log import RunLog

TIMEOUT = 120
OUTCOMES = ("done", "error")


def offline(wheelhouse: Path, *dependencies: str, options: str = "") -> str:
    """An environment file installing from the local wheelhouses only."""
    lines = ["--no-index", f"--find-links {WHEELHOUSE}", f"--find-links {wheelhouse}", *dependencies]
    return options + "dependencies:\n" + "".join(f"  - {json.dumps(line)}\n" for line in lines)


def pipe_task(task: str, out: Path, **arguments: object) -> dict[str, Any]:
    """The config's `task` for one of tests/testpipes' tasks, writing under `out`."""
    return {"name": task, "module": "poltergust_testpipes", "out-dir": str(out), **arguments}


def submit(bucket, name: str, task: dict, environment_yaml: str | None = None, variables: dict | None = None, *,
           environment: str = "test", **settings: object) -> int:
    """Upload `name`'s config for `task`; returns the config's generation.

    `environment_yaml`, when given, is uploaded as `environment/<environment>.yaml` first (left out, the
    file already there is used); `settings` are further top-level keys of the config.
    """
    if environment_yaml is not None:
        bucket.upload(f"environment/{environment}.yaml", environment_yaml)
    config = {"environment": bucket.url(f"environment/{environment}.yaml"), "task": task, **settings}
    if variables:
        config["variables"] = variables
    return bucket.upload(f"pipeline/{name}.config.yaml", yaml.safe_dump(config))


def result(bucket, name: str, outcome: str = "done", timeout: float = TIMEOUT) -> dict:
    """`name`'s result file once it exists; fails at once, showing it, if the other outcome's file appears."""
    other = OUTCOMES[1 - OUTCOMES.index(outcome)]

    def finished() -> bytes | None:
        if bucket.exists(f"pipeline/{name}.{other}.yaml"):
            raise AssertionError(f"{name} ended as {other}: {bucket.read(f'pipeline/{name}.{other}.yaml').decode()}")
        return bucket.read(f"pipeline/{name}.{outcome}.yaml")

    return yaml.safe_load(wait_for(finished, timeout, f"{name}.{outcome}.yaml"))


def results(bucket, name: str) -> list[str]:
    """The result files of `name` in the bucket (there should never be more than one)."""
    return [n for n in bucket.names(f"pipeline/{name}.") if n.endswith((".done.yaml", ".error.yaml"))]


def run_logs(tmp_path: Path, *nodes: str) -> str:
    """Every run log the given nodes kept under their data directories (`tmp_path/NODE`)."""
    return "".join(p.read_text() for node in nodes for p in sorted((tmp_path / node / "logs").glob("*.log")))


def run_log(tmp_path: Path, node: str, name: str) -> str:
    return "".join(p.read_text() for p in (tmp_path / node / "logs").glob(f"{name}.*.log"))


def scrape(port: int) -> dict[str, float]:
    """Samples of a node's /metrics as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def get_in_task(envs: Environments, environment, runlog: RunLog) -> Path:
    """Like a run: the environment counts as in use only while the asking task lives."""
    path = await asyncio.create_task(envs.get(environment, runlog))
    await asyncio.sleep(0)  # let the task's end release the environment
    return path


def poltergust(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """The `poltergust` command, as a person runs it."""
    return subprocess.run([sys.executable, "-m", "poltergust", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
