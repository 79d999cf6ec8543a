"""The warm path's fast start runs luigi exactly as `python -m luigi` does, without its command-line parser.

Each case runs twice at the same time, against two luigids with the same
settings: once forked by a real warm interpreter with the fast start, once as
a plain `python -m luigi` process with the node's command line. Both run the
same module through `recorder.py`, which writes every luigi event (task and
kind) and whether luigi's command-line parser was in use. Then: the same exit
code, outputs, events and execution summary, and the fast start really ran
without the parser (or, where it does not cover a config, said so in the log
and ran the command line).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from harness import WHEELHOUSE, Luigid
from harness.luigi_examples import ROOT_VARIABLE, build_wheel, find_sdist, missing_sdist_message
from uv import find_uv_bin

from poltergust.config import PipelineConfig, TaskSpec, parse_environment
from poltergust.launch.processes import run_streaming
from poltergust.launch.warm import WarmPool
from poltergust.run import worker_config
from poltergust.run.command import CRASHED, TASK_FAILED, fast_start, luigi_command, node_settings
from poltergust.secret_env import SecretEnv

pytestmark = pytest.mark.stack

WORKER = "poltergust:fast-start:test"
FALLBACK = "poltergust: luigi starts from its command line ("
RECORDER = """\
import importlib, json, os
import luigi
from luigi.cmdline_parser import CmdlineParser

importlib.import_module(os.environ["RECORDED_MODULE"])


def _record(event):
    def handler(task, *_):
        with open(os.environ["RECORDED_EVENTS"], "a") as events:
            events.write(json.dumps({"event": event, "task": task.task_id,
                                     "parser": CmdlineParser.get_instance() is not None}) + "\\n")
    return handler


for _event in ("START", "SUCCESS", "FAILURE", "BROKEN_TASK", "DEPENDENCY_DISCOVERED", "DEPENDENCY_MISSING",
               "DEPENDENCY_PRESENT"):
    luigi.Task.event_handler(getattr(luigi.Event, _event))(_record(_event))
"""
CASES = """\
import json, os
import luigi


class Flags(luigi.Task):
    loud = luigi.BoolParameter()
    sure = luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING)
    items = luigi.ListParameter(default=[])
    label = luigi.Parameter(default="unset")
    count = luigi.IntParameter(default=1)
    max_items = luigi.IntParameter(default=5)
    when = luigi.DateParameter(default=None)

    def output(self):
        return luigi.LocalTarget(os.path.join(os.environ["LUIGI_EXAMPLES_ROOT"], "flags-%s.json" % self.task_id))

    def run(self):
        with self.output().open("w") as out:
            json.dump({"loud": self.loud, "sure": self.sure, "items": list(self.items), "label": self.label,
                       "count": self.count, "max_items": self.max_items, "when": str(self.when)}, out)
"""
SUMMARY = re.compile(r"===== Luigi Execution Summary =====\n(.*?)\n===== Luigi Execution Summary =====", re.S)


@dataclass
class Case:
    module: str
    task: str
    arguments: dict[str, Any]
    code: int = 0
    fast: bool = True
    """Whether the fast start covers it (else it says so and runs the command line)."""
    config: str = ""
    """A luigi.cfg in the run's working directory."""


CASES_BY_NAME = {
    "hello-world": Case("examples.hello_world", "examples.HelloWorldTask", {}),
    "dynamic-requirements": Case("examples.dynamic_requirements", "Dynamic", {"seed": 7}),
    "retry-policy": Case("examples.per_task_retry_policy", "examples.PerTaskRetryPolicy", {}, code=TASK_FAILED),
    "top-artists": Case("examples.top_artists", "Top10Artists", {"date-interval": "2012-06"}),
    "parameters": Case("cases", "Flags", {"loud": True, "sure": "false", "items": [1, "two"], "label": "",
                                          "max-items": 9, "when": "2024-02-29", "off": None},
                       config="[Flags]\ncount = 7\n"),
    "bad-value": Case("cases", "Flags", {"count": "seven"}, code=CRASHED),
    "underscore-key": Case("cases", "Flags", {"max_items": 3}, code=2, fast=False),
    "leading-dash": Case("cases", "Flags", {"count": "-3"}, fast=False),
    "not-a-flag": Case("cases", "Flags", {"count": True}, code=2, fast=False),
    "luigi-flag": Case("cases", "Flags", {"workers": 2}, fast=False),
}


@dataclass
class Ending:
    code: int
    output: str
    files: dict[str, bytes]
    events: list[dict[str, Any]]

    def summary(self) -> str:
        found = SUMMARY.search(self.output)
        return found.group(1) if found else ""


def _clean_environ() -> dict[str, str]:
    return {key: value for key, value in os.environ.items()
            if not key.startswith(("UV_", "PIP_", "LUIGI_")) and key not in ("VIRTUAL_ENV", "PYTHONPATH")}


@pytest.fixture(scope="module")
def env_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv with luigi and luigi's examples (from its source distribution)."""
    sdist = find_sdist()
    if sdist is None:
        pytest.skip(missing_sdist_message())
    wheels = build_wheel(sdist, tmp_path_factory.mktemp("luigi-examples"))
    venv = tmp_path_factory.mktemp("fast-start") / "venv"
    uv = find_uv_bin()
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, env=_clean_environ())
    subprocess.run([uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), "--no-index",
                    "--find-links", str(WHEELHOUSE.resolve()), "--find-links", str(wheels),
                    "luigi", "luigi-examples"], check=True, env=_clean_environ(), timeout=300)
    return venv


@pytest.fixture(scope="module")
def luigids(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Luigid, Luigid]]:
    """One luigid for the fast starts and one for the command lines, with the same settings."""
    fast, plain = Luigid(tmp_path_factory.mktemp("luigid-fast")), Luigid(tmp_path_factory.mktemp("luigid-plain"))
    yield fast, plain
    fast.stop()
    plain.stop()


async def _run(pool: WarmPool | None, env_path: Path, case: Case, luigid: Luigid, workdir: Path) -> Ending:
    """The case forked by the warm interpreter with the fast start (`pool`), or as `python -m luigi`."""
    root = workdir / "out"
    root.mkdir(parents=True)
    (workdir / "recorder.py").write_text(RECORDER)
    (workdir / "cases.py").write_text(CASES)
    if case.config:
        (workdir / "luigi.cfg").write_text(case.config)
    config = PipelineConfig("gs://b/pipeline/case.config.yaml", "gs://b/environment/e.yaml",
                            TaskSpec(case.task, "recorder", case.arguments), {}, {})
    command = luigi_command(env_path / "bin" / "python", config, luigid.url, WORKER)
    env = {**_clean_environ(), ROOT_VARIABLE: str(root), "RECORDED_MODULE": case.module,
           "RECORDED_EVENTS": str(workdir / "events.jsonl"), "PYTHONUNBUFFERED": "1"}
    lines: list[str] = []
    if pool is None:
        code = await run_streaming(command, env=env, cwd=workdir, sink=lines.append)
    else:
        spec = parse_environment(b"dependencies: [luigi]\n", "gs://b/environment/e.yaml")
        start = pool.launcher(env_path, spec, config, lines.append, None, fast_start(config, luigid.url, WORKER))
        code = await start(command, env=env, cwd=workdir, sink=lines.append)
    events_file = workdir / "events.jsonl"
    events = [json.loads(line) for line in events_file.read_text().splitlines()] if events_file.exists() else []
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return Ending(code, "".join(lines), files, events)


@pytest.mark.parametrize("name", list(CASES_BY_NAME))
async def test_the_fast_start_ends_as_luigis_command_line(
    name: str, env_path: Path, luigids: tuple[Luigid, Luigid], tmp_path: Path,
) -> None:
    case = CASES_BY_NAME[name]
    pool = WarmPool(SecretEnv({}), idle_seconds=60, prestart=False, run_as=None)
    try:
        fast, plain = await asyncio.gather(
            asyncio.wait_for(_run(pool, env_path, case, luigids[0], tmp_path / "fast"), 240),
            asyncio.wait_for(_run(None, env_path, case, luigids[1], tmp_path / "plain"), 240))
    finally:
        await pool.close()
    assert "warm start unavailable" not in fast.output, fast.output
    assert (plain.code, fast.code) == (case.code, case.code), fast.output + plain.output
    if name == "top-artists":  # random streams: the same files, each checked by test_luigi_examples
        assert sorted(fast.files) == sorted(plain.files) and len(fast.files) == 32
    else:
        assert fast.files == plain.files
    assert Counter((e["event"], e["task"]) for e in fast.events) == \
        Counter((e["event"], e["task"]) for e in plain.events)
    assert fast.summary() == plain.summary()
    assert all(e["parser"] for e in plain.events)
    assert (FALLBACK in fast.output) == (not case.fast), fast.output
    assert all(e["parser"] != case.fast for e in fast.events), "the fast start ran without luigi's parser"
    if case.code == 0:
        assert fast.events and fast.summary(), fast.output
    if name == "parameters":
        written = json.loads(next(iter(fast.files.values())))
        assert written == {"loud": True, "sure": False, "items": [1, "two"], "label": "unset", "count": 7,
                           "max_items": 9, "when": "2024-02-29"}
    if name == "retry-policy":  # failed twice or more before luigi gave up on them, as the example says
        failures = Counter(e["task"].split("_")[0] for e in fast.events if e["event"] == "FAILURE")
        assert failures and max(failures.values()) > 1, failures


def test_the_fast_starts_settings_are_the_command_lines_and_refused_to_pipelines() -> None:
    """Each setting the node gives luigi is one flag of its command line, and no pipeline may set it."""
    config = PipelineConfig("gs://b/p.config.yaml", "gs://b/e.yaml", TaskSpec("T", "m", {"x": 1}), {}, {})
    command = luigi_command(Path("/env/bin/python"), config, "http://luigid", WORKER, assistant=True)
    settings = node_settings("http://luigid", WORKER, assistant=True)
    call = fast_start(config, "http://luigid", WORKER, assistant=True)
    assert call == {"module": "m", "task": "T", "params": {"x": "1"}, "settings": settings}
    for section, keys in settings.items():
        for key, value in keys.items():
            flag = "--" + (key if section == "core" else f"{section}-{key}").replace("_", "-")
            assert flag in command, flag
            after = command[command.index(flag) + 1:]
            assert (value == "true" and (not after or after[0].startswith("--"))) or after[0] == value
            assert worker_config.NODE_KEYS.get((section, key)) or section in worker_config.NODE_SECTIONS, \
                (section, key)
