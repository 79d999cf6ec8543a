"""Runs on the real stack while storage fails the way real GCS and networks do: refused requests, lost answers.

The nodes reach fake-gcs-server through a proxy that injects the faults
Google's retry conformance tests inject (`harness.Faults`): requests refused
before they are forwarded, and writes that take effect but whose answer is
lost, so the node's retry meets its own write (HTTP 412).
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable

import pytest
from harness import Faults, Proxy, result, results, submit, wait_for

GCS = pytest.mark.parametrize("backend", ["gcs"], indirect=True)
SLEEP = {"name": "Sleep", "module": "poltergust_testpipes", "seconds": 1}


def _first(matches: Callable[[str, str, bytes], bool]) -> Callable[[str, str, bytes], bool]:
    """Selects the first write (method, path, body) that `matches`, and no other."""
    seen: list[bool] = []

    def select(method: str, path: str, body: bytes) -> bool:
        if seen or not matches(method, path, body):
            return False
        seen.append(True)
        return True

    return select


def _faulty_node(start_node, proxy: Proxy, name: str, *extra: str):
    return start_node(name, *extra, env_overrides={"STORAGE_EMULATOR_HOST": proxy.url})


@GCS
def test_eight_pipelines_on_three_nodes_end_done_once_and_promptly_despite_refusals_and_lost_answers(
    start_node, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    faults = Faults(seed=23)
    proxy = Proxy(bucket.gcs.url, fault=faults)
    try:
        nodes = [_faulty_node(start_node, proxy, f"node-{letter}") for letter in "abc"]
        submit(bucket, "warm", {**SLEEP, "out-dir": str(tmp_path / "warm")}, environment_yaml)
        result(bucket, "warm", "done")  # the environment is built once, before the faults start
        faults.refuse, faults.lose = 0.10, 0.05
        names = [f"faulty-{index}" for index in range(8)]
        began = time.monotonic()
        for name in names:
            submit(bucket, name, {**SLEEP, "out-dir": str(tmp_path / name)})  # the environment is there already
        done = {name: result(bucket, name, "done", timeout=max(1.0, began + 90 - time.monotonic()))
                for name in names}
        took = time.monotonic() - began
        print(f"eight pipelines done in {took:.1f}s; {faults.refused} requests refused, {faults.lost} answers lost")
        assert faults.refused and faults.lost, "the proxy injected faults of both kinds"
        wait_for(lambda: not any(bucket.exists(f"pipeline/{name}.config.yaml") for name in names), 15,
                 "every config to be removed")
        # A delete whose answer was lost is retried after the config is gone: its node says it claimed the run
        # a moment later.
        claimers = {name: wait_for(lambda: _claimers(nodes, bucket.url(f"pipeline/{name}.config.yaml")), 15,
                                   f"{name}: a node to say it claimed it") for name in names}
    finally:
        proxy.close()
    for name in names:
        assert results(bucket, name) == [f"pipeline/{name}.done.yaml"], name
        assert len(list((tmp_path / name).glob("started-*"))) == 1, f"{name} ran once"
        assert [node.node_name for node in claimers[name]] == [done[name]["poltergust"]["node"]], name
        assert f"{bucket.url(f'pipeline/{name}.config.yaml')}: claim lost" not in claimers[name][0].output(), \
            f"{name}: its winner said it lost"


def _claimers(nodes: list, url: str) -> list:
    claimed = re.compile(rf"{re.escape(url)}: done \(claimed by this node\)")
    return [node for node in nodes if claimed.search(node.output())]


@GCS
def test_a_node_whose_start_marker_answer_was_lost_starts_the_run_at_once(
    start_node, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    """Its retry meets the marker it wrote itself: that is its own start, not another node's."""
    marker = _first(lambda method, path, body: b"_poltergust/runs/" in body and b'/start"' in body)
    faults = Faults(lose=1.0, writes=marker)
    proxy = Proxy(bucket.gcs.url, fault=faults)
    try:
        node = _faulty_node(start_node, proxy, "node-a")
        submit(bucket, "marked", {**SLEEP, "out-dir": str(tmp_path / "marked")}, environment_yaml)
        result(bucket, "marked", "done", timeout=60)  # a stalled run waits for its marker to go stale: 180 s
    finally:
        proxy.close()
    assert faults.lost == 1
    assert "started by another node" not in node.output()


LOST = {
    "claim": lambda method, path, body: b'"poltergust-outcome"' in body,
    "result": lambda method, path, body: b'"name": "pipeline/claimed.done.yaml"' in body,
    "delete": lambda method, path, body: method == "DELETE" and "claimed.config.yaml" in path,
}


@GCS
@pytest.mark.parametrize("lost", sorted(LOST))
def test_a_node_whose_claim_answer_was_lost_does_not_say_another_node_finished(
    start_node, bucket, environment_yaml: str, tmp_path: Path, lost: str,
) -> None:
    """Whichever answer of the claim, the result file or the config's removal is lost, the claimer finishes."""
    faults = Faults(lose=1.0, writes=_first(LOST[lost]))
    proxy = Proxy(bucket.gcs.url, fault=faults)
    try:
        node = _faulty_node(start_node, proxy, "node-a")
        submit(bucket, "claimed", {**SLEEP, "out-dir": str(tmp_path / "claimed")}, environment_yaml)
        done = result(bucket, "claimed", "done", timeout=60)
        wait_for(lambda: not bucket.exists("pipeline/claimed.config.yaml"), 15, "the config to be removed")
        wait_for(lambda: "claimed by this node" in node.output() or "claim lost" in node.output(), 15,
                 "the node to say how its claim went")
    finally:
        proxy.close()
    assert faults.lost == 1
    assert done["poltergust"]["node"] == "node-a"
    assert "claim lost" not in node.output()
    assert "done (claimed by this node)" in node.output()
    log = bucket.read(bucket.log_name("claimed", "node-a")).decode()
    assert "another node finished this run first" not in log
