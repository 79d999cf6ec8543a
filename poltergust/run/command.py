"""The luigi command line of a run: task arguments, worker options, exit codes and the environment.

Exit codes are set explicitly (luigi's defaults are all 0, which says
nothing). A node's luigi names its worker `poltergust:TAG:NODE`, so luigid's
pages and API show which pipeline and node a worker serves.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from poltergust.config import EnvironmentSpec, PipelineConfig
from poltergust.launch import assistant
from poltergust.run.log import RunLog

# Exit codes we ask luigi to use (luigi's defaults are all 0, which says nothing).
OTHERS_RUNNING = 12  # tasks held by another worker (another node, or a vanished one)
NOT_RUN = assistant.NOT_RUN  # nothing left this worker may run, root not complete
MISSING_DATA = 20
TASK_FAILED = 30
SCHEDULING_ERROR = 35
CRASHED = assistant.CRASHED
RETCODES = {
    "already_running": OTHERS_RUNNING,
    "not_run": NOT_RUN,
    "missing_data": MISSING_DATA,
    "task_failed": TASK_FAILED,
    "scheduling_error": SCHEDULING_ERROR,
    "unhandled_exception": CRASHED,
}
RETCODE_SETTINGS = {key: str(code) for key, code in RETCODES.items()}
REASONS = {
    MISSING_DATA: "an external dependency's data is missing",
    TASK_FAILED: "a luigi task failed",
    SCHEDULING_ERROR: "luigi could not schedule the tasks (complete() or requires() raised)",
    CRASHED: "luigi stopped with an error",
}
ASSISTANT = Path(assistant.__file__)
"""The pure assistant a joining node runs (standard library and luigi only, run by the environment's python)."""
ERROR_LINE = re.compile(r"^(?:[\w.]+(?:Error|Exception)|luigi\.[\w.]+|Traceback)\b.*")


@dataclass(frozen=True)
class Outcome:
    ok: bool
    reason: str = ""
    stood_down: bool = False
    """This node's luigi failed where luigid could not say how the pipeline stands, on a node that did not
    start the run: the run is left to its starter instead of ending as an error (see `participation`)."""


def task_parameters(arguments: Mapping[str, Any]) -> dict[str, str | bool]:
    """The config's task keys as luigi's command line passes them: a string each, or True for a bare flag.

    `false` and null leave the key out; lists and mappings become JSON, which
    is what luigi's List/Dict parameters parse.
    """
    return {key: value if value is True else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            for key, value in arguments.items() if value is not None and value is not False}


def task_arguments(arguments: Mapping[str, Any]) -> list[str]:
    """The config's task keys as luigi options: `key: value` is `--key value`, `true` a bare `--key`."""
    options: list[str] = []
    for key, value in task_parameters(arguments).items():
        options += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return options


def worker_id(tag: str, node: str) -> str:
    """A luigi worker id naming the pipeline (its tag) and the node, as `poltergust.luigid` reads it."""
    return f"poltergust:{tag}:{node}"


def node_settings(scheduler_url: str, worker: str, assistant: bool = False) -> dict[str, dict[str, str]]:
    """luigi's settings the node gives one worker of a pipeline (section -> key -> value), flags or not.

    The worker stays while its tasks wait on others (keep-alive) and asks for
    work every few tenths of a second, so a task freed by another node is
    taken within a second. An `assistant` (on `poltergust.luigid`) also takes
    tasks other workers of the pipeline scheduled, such as those yielded from
    `run()`. `run.worker_config` refuses each of these in a pipeline's own settings.
    """
    return {
        "core": {
            "scheduler_url": scheduler_url,
            "no_lock": "true",  # nodes sharing a host, and re-runs, must not trip over luigi's per-host lock
            "log_level": "INFO",  # a kept-alive worker says at DEBUG, several times a second, that it waits
            **({"assistant": "true"} if assistant else {}),
        },
        "worker": {"id": worker, "keep_alive": "true", "wait_interval": "0.2", "wait_jitter": "0.3"},
        "retcode": dict(RETCODE_SETTINGS),
    }


def _flags(settings: Mapping[str, Mapping[str, str]]) -> list[str]:
    """luigi's command-line flags for `settings`: `[core] key` is `--key`, `[section] key` is `--section-key`."""
    flags: list[str] = []
    for section, keys in settings.items():
        for key, value in keys.items():
            flag = "--" + (key if section == "core" else f"{section}_{key}").replace("_", "-")
            flags += [flag] if value == "true" else [flag, value]
    return flags


RETCODE_OPTIONS = _flags({"retcode": RETCODE_SETTINGS})
"""Exit codes as `python -m luigi` options."""


def luigi_command(python: Path, config: PipelineConfig, scheduler_url: str, worker: str,
                  assistant: bool = False, pure: bool = False) -> list[str]:
    """`python -m luigi ...` for the config's root task, as one worker of the pipeline (see `node_settings`).

    A `pure` assistant (a node that answered a call for help, so the graph is
    scheduled already) runs `launch/assistant.py` with the same arguments: it
    takes free tasks without adding the graph again, and its exit codes are its own.
    """
    settings = node_settings(scheduler_url, worker, assistant)
    if pure:
        del settings["retcode"]
    start = [str(python), str(ASSISTANT)] if pure else [str(python), "-m", "luigi"]
    return [*start, "--module", config.task.module, config.task.name, *task_arguments(config.task.arguments),
            *_flags(settings)]


def fast_start(config: PipelineConfig, scheduler_url: str, worker: str, assistant: bool = False) -> dict[str, Any]:
    """The same luigi run as `luigi_command`, for a warm interpreter's child to start without luigi's parser.

    The root task's parameters as its command line gives them (a string each;
    `true` for a bare flag) and the node's settings; `launch/zygote_run.py`
    builds the task with `from_str_params`, or falls back to the command line
    where the two could differ.
    """
    return {"module": config.task.module, "task": config.task.name, "params": task_parameters(config.task.arguments),
            "settings": node_settings(scheduler_url, worker, assistant)}


NOT_COMPLETE = 3
CONFIRM_SCRIPT = """\
import sys
from luigi.cmdline_parser import CmdlineParser
__import__(sys.argv[1])
with CmdlineParser.global_instance(sys.argv[2:]) as parser:
    task = parser.get_task_obj()
sys.exit(0 if task.complete() else 3)
"""
"""Built from the same task arguments as luigi's command line, so it checks exactly the root task luigi runs."""


def confirm_command(python: Path, config: PipelineConfig) -> list[str]:
    """A command that exits 0 when the config's root task is complete by its own `complete()`, 3 when it is not.

    luigid's task states are anyone's to set (any worker may report any task
    DONE), so a node does not write done.yaml on luigid's word alone.
    """
    return [str(python), "-c", CONFIRM_SCRIPT, config.task.module, config.task.name,
            *task_arguments(config.task.arguments)]


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


def exit_reason(code: int, runlog: RunLog) -> str:
    """Why luigi failed, from its exit code and the last error line of its output."""
    reason = REASONS.get(code, f"luigi exited with code {code}")
    detail = last_error(runlog)
    if "No module named" in detail or "ModuleNotFoundError" in detail:
        reason = "luigi could not import the pipeline's module"
    return f"{reason}: {detail[:300]}" if detail else reason


def last_error(runlog: RunLog) -> str:
    """The last error line (an exception, not a traceback's first line) of luigi's output, or empty."""
    return next((m.group(0) for line in reversed(runlog.lines()) if (m := ERROR_LINE.match(line.strip()))
                 and not line.strip().startswith("Traceback")), "")


def node_extra_environ(node_name: str, config_url: str, generation: int) -> dict[str, str]:
    """What a task can read to know where it runs (also handy in tests)."""
    return {
        "POLTERGUST_NODE": node_name,
        "POLTERGUST_PIPELINE": config_url,
        "POLTERGUST_GENERATION": str(generation),
    }
