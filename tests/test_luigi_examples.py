"""Luigi's own examples on three nodes end exactly as a plain single-process luigi run of the same task.

The examples come from luigi's source distribution at test time (see
`luigi_examples`: tests/run.sh downloads it; without it these tests skip).
Each example runs twice, at the same time: once submitted to three nodes
sharing the session's luigid (on the emulator stack), once as one plain
`python -m luigi` process against a luigid of its own started with the same
settings (so that neither run sees the other's task states). Each run writes
under its own directory (LUIGI_EXAMPLES_ROOT). Then: the same outcome (done,
or an error naming the same failed tasks) and the same files.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
from harness import WHEELHOUSE, Luigid, Node, result, submit, wait_for
from harness.luigi_examples import ROOT_VARIABLE, build_wheel, find_sdist, missing_sdist_message
from uv import find_uv_bin

from poltergust.run.command import RETCODE_OPTIONS

NODES = ("node-a", "node-b", "node-c")
PLAIN_TIMEOUT = 180
SUMMARY_FAILED = re.compile(r"^\* \d+ failed:\n((?:\s+- .*\n)+)", re.M)
DATA_DONE = re.compile(r"\bdone\s+Data\(")


@pytest.fixture(scope="module")
def examples_wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sdist = find_sdist()
    if sdist is None:
        pytest.skip(missing_sdist_message())
    return build_wheel(sdist, tmp_path_factory.mktemp("luigi-examples"))


@pytest.fixture
def examples_yaml(examples_wheels: Path) -> str:
    return ("dependencies:\n  - --no-index\n"
            f"  - --find-links {WHEELHOUSE.resolve()}\n  - --find-links {examples_wheels}\n"
            "  - luigi\n  - luigi-examples\n")


@pytest.fixture(scope="module")
def plain_python(examples_wheels: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv with luigi and the examples, for the plain runs (installed as a node would, with uv)."""
    venv = tmp_path_factory.mktemp("plain") / "venv"
    uv = find_uv_bin()
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, env=_clean_environ())
    subprocess.run([uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), "--no-index",
                    "--find-links", str(WHEELHOUSE.resolve()), "--find-links", str(examples_wheels),
                    "luigi", "luigi-examples"], check=True, env=_clean_environ(), timeout=300)
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def plain_luigid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Luigid]:
    """A luigid like the session's, for the plain runs alone."""
    server = Luigid(tmp_path_factory.mktemp("plain-luigid"))
    yield server
    server.stop()


def _clean_environ() -> dict[str, str]:
    return {key: value for key, value in os.environ.items()
            if not key.startswith(("UV_", "PIP_")) and key not in ("VIRTUAL_ENV", "PYTHONPATH")}


@dataclass
class Ending:
    """How a run of an example ended: done or not, the task families it names as failed, its files."""

    done: bool
    failed: set[str]
    files: dict[str, bytes]


def files_under(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


class PlainRun:
    """One `python -m luigi` process of the example, started now, against the plain runs' luigid."""

    def __init__(self, python: Path, luigid: Luigid, root: Path, module: str, task: str, arguments: list[str]):
        self.root = root / "out"
        self.root.mkdir(parents=True)
        self.log = root / "plain.log"
        command = [str(python), "-m", "luigi", "--module", module, task, *arguments,
                   "--scheduler-url", luigid.url, "--no-lock", *RETCODE_OPTIONS]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                                            env={**_clean_environ(), ROOT_VARIABLE: str(self.root)})

    def ending(self) -> Ending:
        code = self.process.wait(timeout=PLAIN_TIMEOUT)
        output = self.log.read_text()
        summary = SUMMARY_FAILED.search(output)
        failed = set(re.findall(r"- \d+ (?:[\w.]+\.)?(\w+)\(", summary.group(1))) if summary else set()
        return Ending(code == 0, failed, files_under(self.root))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@dataclass
class Fleet:
    bucket: object
    nodes: list[Node]
    root: Path
    environment: str

    def run(self, name: str, module: str, task: str, arguments: dict) -> tuple[Ending, dict]:
        """Submit the example; return how it ended and its result document."""
        submit(self.bucket, name, {"name": task, "module": module, **arguments}, self.environment,
               {ROOT_VARIABLE: str(self.root)})
        found = wait_for(lambda: [outcome for outcome in ("done", "error")
                                  if self.bucket.exists(f"pipeline/{name}.{outcome}.yaml")], 240,
                         f"{name}'s result")
        document = result(self.bucket, name, found[0])
        reason = document["poltergust"].get("reason", "")
        failed = set(re.findall(r"(?:^|; |: )(?:[\w.]+\.)?(\w+)\([^)]*\): ", reason))
        return Ending(found[0] == "done", failed, files_under(self.root)), document

    def logs(self, name: str) -> dict[str, str]:
        """Every node's log of the pipeline's run, by node (names may carry a suffix: see node.py)."""
        prefix = f"_poltergust/logs/pipeline/{name}/"
        return {object_name.rsplit("/", 1)[1]: (self.bucket.read(object_name) or b"").decode()
                for object_name in self.bucket.names(prefix)}


@pytest.fixture
def fleet(start_node: Callable[..., Node], bucket, examples_yaml: str, tmp_path: Path) -> Fleet:
    nodes = [start_node(name, wait=False) for name in NODES]
    for node in nodes:
        node.wait_ready()
    root = tmp_path / "fleet-out"
    root.mkdir()
    return Fleet(bucket, nodes, root, examples_yaml)


@pytest.fixture
def plain(plain_python: Path, plain_luigid: Luigid, tmp_path: Path) -> Iterator[Callable[..., PlainRun]]:
    runs: list[PlainRun] = []

    def start(module: str, task: str, arguments: dict) -> PlainRun:
        options = [part for key, value in arguments.items() for part in (f"--{key}", str(value))]
        runs.append(PlainRun(plain_python, plain_luigid, tmp_path / "plain", module, task, options))
        return runs[-1]

    yield start
    for run in runs:
        run.stop()


def _unique() -> str:
    return uuid.uuid4().hex[:6]


GCS = pytest.mark.parametrize("backend", ["gcs"], indirect=True)


@GCS
def test_hello_world(fleet: Fleet, plain: Callable[..., PlainRun]) -> None:
    """Its only output is a line on stdout: one node prints it, once."""
    greeting = "HelloWorldTask says: Hello world!"
    name = f"hello-{_unique()}"
    alone = plain("examples.hello_world", "examples.HelloWorldTask", {})
    ending, _ = fleet.run(name, "examples.hello_world", "examples.HelloWorldTask", {})
    expected = alone.ending()
    assert expected.done and alone.log.read_text().count(greeting) == 1
    assert ending == expected
    printed = wait_for(lambda: [text.count(greeting) for text in fleet.logs(name).values() if greeting in text],
                       60, "the log of the node that ran the task")
    assert printed == [1]


@GCS
def test_dynamic_requirements_spread_over_nodes(fleet: Fleet, plain: Callable[..., PlainRun]) -> None:
    """Dynamic yields Configuration, then the Data tasks its output names: they run on several nodes."""
    arguments = {"seed": 42}  # 10 Data tasks of one second each
    name = f"dynamic-{_unique()}"
    alone = plain("examples.dynamic_requirements", "Dynamic", arguments)
    ending, _ = fleet.run(name, "examples.dynamic_requirements", "Dynamic", arguments)
    expected = alone.ending()
    assert expected.done
    data = sorted(path for path in expected.files if "/Data_" in path)
    assert len(data) == 10 and expected.files["tmp/Dynamic_42.txt"] == b"Tada!"
    assert ending == expected

    def data_by_node() -> dict[str, int]:
        return {node: len(DATA_DONE.findall(text)) for node, text in fleet.logs(name).items()}

    by_node = wait_for(lambda: (counts := data_by_node()) and sum(counts.values()) >= 10 and counts, 60,
                       "every node's log of the run to be uploaded")
    assert sum(by_node.values()) == 10, by_node
    assert sum(1 for count in by_node.values() if count) >= 2, f"the Data tasks spread over nodes: {by_node}"


@GCS
def test_per_task_retry_policy_ends_as_error_naming_the_failed_tasks(
    fleet: Fleet, plain: Callable[..., PlainRun],
) -> None:
    alone = plain("examples.per_task_retry_policy", "examples.PerTaskRetryPolicy", {})
    ending, document = fleet.run(f"retry-{_unique()}", "examples.per_task_retry_policy",
                                 "examples.PerTaskRetryPolicy", {})
    expected = alone.ending()
    assert not expected.done
    assert expected.failed == {"ErrorTask1", "ErrorTask2", "DynamicErrorTask1"}
    assert ending == expected, document["poltergust"]["reason"]
    assert sorted(expected.files) == ["tmp/_docs-SuccessSubTask1__99914b932b.ldj",
                                      "tmp/_docs-SuccessTask1__99914b932b.ldj"]


def _check_top_artists(files: dict[str, bytes]) -> None:
    """Luigi's Top Artists makes random streams: check that its aggregate and top 10 are those of its streams."""
    streams = [name for name in files if name.startswith("data/streams_2012_06_")]
    assert len(streams) == 30
    counts: Counter = Counter()
    for name in streams:
        lines = files[name].decode().splitlines()
        assert len(lines) == 1000
        counts.update(line.split()[1] for line in lines)
    aggregate = dict(line.split("\t") for line in files["data/artist_streams_2012-06.tsv"].decode().splitlines())
    assert {artist: int(count) for artist, count in aggregate.items()} == dict(counts)
    top = [line.split("\t") for line in files["data/top_artists_2012-06.tsv"].decode().splitlines()]
    assert [int(row[3]) for row in top] == sorted(counts.values(), reverse=True)[:10]


@GCS
def test_top_artists(fleet: Fleet, plain: Callable[..., PlainRun]) -> None:
    arguments = {"date-interval": "2012-06"}
    alone = plain("examples.top_artists", "Top10Artists", arguments)
    ending, _ = fleet.run(f"top-{_unique()}", "examples.top_artists", "Top10Artists", arguments)
    expected = alone.ending()
    assert expected.done and ending.done and not ending.failed
    assert sorted(ending.files) == sorted(expected.files)
    _check_top_artists(expected.files)
    _check_top_artists(ending.files)
