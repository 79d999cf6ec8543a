"""Run a pipeline's luigi root task on this node until luigi has a final answer.

Several nodes run the same root task against one central scheduler, which
hands each node a share of the graph. A node's luigi exits as soon as it has
nothing left to do, which is before the root task is complete when other
nodes still hold tasks; luigi's exit code says so, and we run it again (with
backoff) until the root task is done or has failed.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping
from urllib.parse import urlparse

from . import metrics
from .config import EnvironmentSpec, PipelineConfig
from .runlog import RunLog
from .subprocesses import run_streaming

log = logging.getLogger(__name__)

# Exit codes we ask luigi to use (luigi's defaults are all 0, which says nothing).
OTHERS_RUNNING = 12  # tasks held by another worker (another node, or a vanished one)
NOT_RUN = 11  # nothing left this worker may run, root not complete
MISSING_DATA = 20
TASK_FAILED = 30
SCHEDULING_ERROR = 35
CRASHED = 40
RETCODE_OPTIONS = [
    "--retcode-already-running", str(OTHERS_RUNNING),
    "--retcode-not-run", str(NOT_RUN),
    "--retcode-missing-data", str(MISSING_DATA),
    "--retcode-task-failed", str(TASK_FAILED),
    "--retcode-scheduling-error", str(SCHEDULING_ERROR),
    "--retcode-unhandled-exception", str(CRASHED),
]
REASONS = {
    MISSING_DATA: "an external dependency's data is missing",
    TASK_FAILED: "a luigi task failed",
    SCHEDULING_ERROR: "luigi could not schedule the tasks (complete() or requires() raised)",
    CRASHED: "luigi stopped with an error",
}
MAX_NOT_RUN = 5
"""Consecutive 'not run' answers (nobody else running, root incomplete) before giving up."""
ERROR_LINE = re.compile(r"^(?:[\w.]+(?:Error|Exception)|luigi\.[\w.]+|Traceback)\b.*")


@dataclass(frozen=True)
class Outcome:
    ok: bool
    reason: str = ""


def task_arguments(arguments: Mapping[str, Any]) -> list[str]:
    """Turn the config's task keys into luigi options.

    `key: value` becomes `--key value`; `true` a bare `--key`; `false` and
    null leave the option out; lists and mappings are passed as JSON, which is
    what luigi's List/Dict parameters parse.
    """
    options: list[str] = []
    for key, value in arguments.items():
        if value is None or value is False:
            continue
        if value is True:
            options.append(f"--{key}")
        elif isinstance(value, (list, dict)):
            options += [f"--{key}", json.dumps(value)]
        else:
            options += [f"--{key}", str(value)]
    return options


def luigi_command(python: Path, config: PipelineConfig, scheduler_url: str) -> list[str]:
    # --no-lock: nodes sharing a host, and re-runs, must not trip over luigi's per-host lock.
    return [
        str(python), "-m", "luigi",
        "--module", config.task.module, config.task.name,
        *task_arguments(config.task.arguments),
        "--scheduler-url", scheduler_url,
        "--no-lock",
        *RETCODE_OPTIONS,
    ]


def luigi_environ(
    node_environ: Mapping[str, str], environment: EnvironmentSpec, config: PipelineConfig,
    extra: Mapping[str, str],
) -> dict[str, str]:
    """Variables for luigi: node < environment file < pipeline config (later wins)."""
    env = dict(node_environ)
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONHOME", None)
    env.update(environment.variables)
    env.update(config.variables)
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def run_until_settled(
    command: list[str], *, env: Mapping[str, str], cwd: Path, runlog: RunLog, scheduler_url: str,
    outage_limit: float, max_backoff: float = 30.0, run: Callable[..., Awaitable[int]] = run_streaming,
) -> Outcome:
    """Run luigi, again and again while other workers hold tasks, until it settles.

    A scheduler that cannot be reached is waited for (up to `outage_limit`
    seconds) rather than counted as a failure of the pipeline. `run` starts
    luigi (`run_streaming`, or a warm pool's runner).
    """
    cwd.mkdir(parents=True, exist_ok=True)
    attempt = 0
    not_run = 0
    delay = 1.0
    while True:
        if not await wait_for_scheduler(scheduler_url, runlog, outage_limit):
            return Outcome(False, f"the luigi scheduler at {scheduler_url} was unreachable for {outage_limit:.0f}s")
        attempt += 1
        runlog.note(f"luigi attempt {attempt}: " + " ".join(command[1:]))
        code = await run(command, env=env, cwd=cwd, sink=runlog.write)
        runlog.note(f"luigi exited with code {code}")
        if code == 0:
            return Outcome(True)
        if code in (OTHERS_RUNNING, NOT_RUN):
            not_run = not_run + 1 if code == NOT_RUN else 0
            if not_run >= MAX_NOT_RUN:
                return Outcome(False, "the root task was not run: a dependency failed or is disabled in the scheduler")
            runlog.note(f"other workers hold tasks of this pipeline; running luigi again in {delay:.0f}s")
            metrics.LUIGI_RERUNS.inc()
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, max_backoff)
            continue
        if not await scheduler_reachable(scheduler_url):
            runlog.note("luigi failed while the scheduler was unreachable: not a failure of the pipeline")
            continue
        return Outcome(False, _reason(code, runlog))


async def wait_for_scheduler(url: str, runlog: RunLog, limit: float) -> bool:
    """True once the scheduler accepts connections; False if it does not within `limit` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    delay = 0.5
    waited = False
    while not await scheduler_reachable(url):
        if loop.time() + delay > deadline:
            return False
        if not waited:
            runlog.note(f"the luigi scheduler at {url} is unreachable; waiting up to {limit:.0f}s")
            log.warning("luigi scheduler %s unreachable; waiting", url)
            waited = True
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, 15.0)
    if waited:
        runlog.note("the luigi scheduler is reachable again")
        log.info("luigi scheduler %s reachable again", url)
    return True


async def scheduler_reachable(url: str) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(parsed.hostname, port), 5)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def _reason(code: int, runlog: RunLog) -> str:
    reason = REASONS.get(code, f"luigi exited with code {code}")
    lines = runlog.lines()
    detail = next((m.group(0) for line in reversed(lines) if (m := ERROR_LINE.match(line.strip()))
                   and not line.strip().startswith("Traceback")), "")
    if "No module named" in detail or "ModuleNotFoundError" in detail:
        reason = "luigi could not import the pipeline's module"
    return f"{reason}: {detail[:300]}" if detail else reason


def node_extra_environ(node_name: str, config_url: str, generation: int) -> dict[str, str]:
    """What a task can read to know where it runs (also handy in tests)."""
    return {
        "POLTERGUST_NODE": node_name,
        "POLTERGUST_PIPELINE": config_url,
        "POLTERGUST_GENERATION": str(generation),
    }
