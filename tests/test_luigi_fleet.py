"""Luigi's fleet features on three nodes of the real stack: what the README's "Luigi on the fleet" promises.

luigid here runs with a configuration made as the deploy makes it (the
fleet's settings merged with a user's fragment, `poltergust.luigid.configuration`):
`[resources] acc_db = 2`, a `[scheduler]` retry policy (retry_count 3,
retry_delay 1 s). The tasks (tests/testpipes/poltergust_fleet_tasks.py) record
node, pid, start and end in their outputs, or count their attempts in a file
the nodes share, so that overlaps, order and attempts can be checked.
"""
from __future__ import annotations

import json
import os
import signal
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
from harness import Luigid, Node, resource_totals, result, submit, wait_for

from poltergust.luigid.configuration import luigid_config

FRAGMENT = ("[resources]\nacc_db = 2\n"
            "[scheduler]\nretry_count = 3\nretry_delay = 1\nworker_disconnect_delay = 10\n")
MODULE = "poltergust_fleet_tasks"
NODES = ("node-a", "node-b", "node-c")
TIMEOUT = 240
GCS = pytest.mark.parametrize("backend", ["gcs"], indirect=True)


@pytest.fixture(scope="module")
def luigid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Luigid]:
    """This module's luigid (replacing the session's), configured as a deploy given FRAGMENT would be."""
    server = Luigid(tmp_path_factory.mktemp("fleet-luigid"), luigid_config(FRAGMENT))
    yield server
    server.stop()


@pytest.fixture
def fleet(start_node: Callable[..., Node]) -> list[Node]:
    nodes = [start_node(name, wait=False) for name in NODES]
    for node in nodes:
        node.wait_ready()
    return nodes


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _records(out: Path, pattern: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(out.glob(pattern))]


def _most_at_once(records: list[dict]) -> int:
    """The largest number of the records' [start, end) intervals that overlap at one moment."""
    events = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records], key=lambda e: (e[0], e[1]))
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def _attempts(out: Path, name: str) -> list[str]:
    path = out / f"attempts-{name}.log"
    return path.read_text().splitlines() if path.exists() else []


def _api(luigid: Luigid, method: str, **data: object) -> object:
    query = urllib.parse.quote(json.dumps(data))
    with urllib.request.urlopen(f"{luigid.url}/api/{method}?data={query}", timeout=5) as response:
        return json.loads(response.read())["response"]


@GCS
def test_resources_hold_across_nodes(fleet, bucket, environment_yaml: str, luigid: Luigid, tmp_path: Path) -> None:
    """Six tasks needing one acc_db each, with `[resources] acc_db = 2` in luigid: never more than two at once."""
    assert resource_totals(luigid.url) == {"acc_db": 2}
    out = tmp_path / "out"
    name = _name("warehouse")
    submit(bucket, name, {"name": "Warehouses", "module": MODULE, "out-dir": str(out), "seconds": 2},
           environment_yaml)
    assert result(bucket, name, "done", TIMEOUT)["poltergust"]["outcome"] == "done"
    records = _records(out, "warehouse-*.json")
    assert len(records) == 6
    assert _most_at_once(records) == 2, records  # three nodes would run three; luigid's limit lets two
    assert len({r["node"] for r in records}) >= 2, "the tasks ran on several nodes"


@GCS
def test_priorities_order_the_tasks_of_all_nodes(fleet, bucket, environment_yaml: str, tmp_path: Path) -> None:
    """One at a time (a shared resource), highest priority first; a dependency runs at its dependant's priority."""
    out = tmp_path / "out"
    name = _name("priorities")
    submit(bucket, name, {"name": "Priorities", "module": MODULE, "out-dir": str(out)}, environment_yaml)
    result(bucket, name, "done", TIMEOUT)
    records = {int(path.stem.split("-")[1]): json.loads(path.read_text()) for path in out.glob("ranked-*.json")}
    assert [rank for rank, _ in sorted(records.items(), key=lambda item: item[1]["start"])] == [0, 100, 80, 60, 40, 20]
    assert _most_at_once(list(records.values())) == 1


@GCS
def test_a_task_that_fails_twice_then_succeeds_ends_done(fleet, bucket, environment_yaml: str,
                                                          tmp_path: Path) -> None:
    """luigid's `[scheduler] retry_count = 3`: the nodes' keep-alive workers run a failed task again."""
    out = tmp_path / "out"
    name = _name("retry")
    submit(bucket, name, {"name": "Retries", "module": MODULE, "out-dir": str(out)}, environment_yaml)
    done = result(bucket, name, "done", TIMEOUT)
    assert done["poltergust"]["outcome"] == "done"
    assert len(_attempts(out, "fails-twice")) == 3
    assert (out / "fails-twice.txt").exists()


@GCS
def test_a_task_that_keeps_failing_ends_as_an_error_naming_it_after_its_retry_count(
    fleet, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    """KeepsFailing's own `retry_count = 2`: two attempts, then luigid disables it and the run ends naming it."""
    out = tmp_path / "out"
    name = _name("keeps-failing")
    submit(bucket, name, {"name": "Retries", "module": MODULE, "out-dir": str(out), "failing": True},
           environment_yaml)
    error = result(bucket, name, "error", TIMEOUT)
    reason = error["poltergust"]["reason"]
    assert reason.startswith("a luigi task failed: ") and "KeepsFailing(" in reason, reason
    assert "FailsTwice(" not in reason
    assert len(_attempts(out, "keeps-failing")) == 2
    assert len(_attempts(out, "fails-twice")) == 3 and (out / "fails-twice.txt").exists(), \
        "the other task's retries went on meanwhile"


@GCS
def test_a_batch_task_runs_its_batch_once(fleet, bucket, environment_yaml: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    name = _name("batch")
    submit(bucket, name, {"name": "Load", "module": MODULE, "out-dir": str(out)}, environment_yaml)
    result(bucket, name, "done", TIMEOUT)
    assert len(_attempts(out, "loaded")) == 1, "six Loaded tasks, one batch, one run"
    days = {path.read_text() for path in out.glob("loaded-*.txt")}
    assert len(list(out.glob("loaded-*.txt"))) == 6 and len(days) == 1
    assert sorted(days.pop().split(",")) == [f"day{day}" for day in range(6)]


@GCS
def test_sigusr1_stops_a_worker_gracefully(fleet, bucket, environment_yaml: str, luigid: Luigid,
                                           tmp_path: Path) -> None:
    """SIGUSR1 to a node's luigi: its running task ends normally, it takes no other; the pipeline ends done."""
    out = tmp_path / "out"
    name = _name("usr1")
    submit(bucket, name, {"name": "Slows", "module": MODULE, "out-dir": str(out), "count": 12, "seconds": 2},
           environment_yaml)

    def running_worker() -> tuple[str, int] | None:
        pids = {w["name"]: w.get("pid") for w in _api(luigid, "worker_list")}  # type: ignore[union-attr]
        for task in _api(luigid, "task_list", status="RUNNING").values():  # type: ignore[union-attr]
            if task["name"] == "Slow" and pids.get(task.get("worker_running")):
                return task["worker_running"], int(pids[task["worker_running"]])
        return None

    worker_name, pid = wait_for(running_worker, 120, "a worker of the pipeline running a task")
    signalled_at = time.time()
    os.kill(pid, signal.SIGUSR1)
    result(bucket, name, "done", TIMEOUT)
    records = _records(out, "slow-*.json")
    assert len(records) == 12
    own = [r for r in records if r["pid"] == pid]
    assert own, f"the task {worker_name} was running when signalled ended normally"
    # luigid marks a task RUNNING when it hands it out, a moment before run() starts: the task in hand may start
    # just after the signal, but any further task would end after it too.
    in_hand = [r for r in own if r["end"] > signalled_at]
    assert len(in_hand) <= 1, f"{worker_name} took no task after SIGUSR1: {own}"


@GCS
@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
def test_workers_n_inside_one_node(start_node, bucket, environment_yaml: str, tmp_path: Path, warm: bool) -> None:
    """The pipeline's `luigi: {core: {workers: 3}}`: one node runs three tasks at once."""
    start_node("node-a")
    out = tmp_path / "out"
    name = _name("workers")
    submit(bucket, name, {"name": "Slows", "module": MODULE, "out-dir": str(out), "count": 3, "seconds": 3},
           environment_yaml, nodes=1, warm=warm, luigi={"core": {"workers": 3}})
    result(bucket, name, "done", TIMEOUT)
    records = _records(out, "slow-*.json")
    assert {r["node"] for r in records} == {"node-a"} and {r["workers"] for r in records} == {3}
    assert _most_at_once(records) == 3


@GCS
def test_changing_luigids_configuration_restarts_it_and_a_running_pipeline_rides_that_out(
    fleet, bucket, environment_yaml: str, luigid: Luigid, tmp_path: Path,
) -> None:
    """What the README says to do: new configuration, restart luigid (its state is saved and read back)."""
    out = tmp_path / "out"
    name = _name("restart")
    submit(bucket, name, {"name": "Warehouses", "module": MODULE, "out-dir": str(out), "seconds": 2},
           environment_yaml)
    wait_for(lambda: list(out.glob("warehouse-*.json")), 120, "a first task to be done")
    original = luigid.config_path.read_text()
    luigid.config_path.write_text(luigid_config(FRAGMENT.replace("acc_db = 2", "acc_db = 1")))
    try:
        luigid.restart()
        restarted = time.time()
        assert resource_totals(luigid.url) == {"acc_db": 1}
        done = result(bucket, name, "done", TIMEOUT)
        assert done["poltergust"]["outcome"] == "done"
        records = _records(out, "warehouse-*.json")
        assert len(records) == 6
        assert _most_at_once([r for r in records if r["start"] > restarted]) <= 1, "the new limit holds"
    finally:
        luigid.config_path.write_text(original)
        luigid.restart()
