"""Several nodes on one bucket, on the real stack; and what a node does with duplicates and SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import pytest
from google.cloud import pubsub_v1
from harness import PROJECT, TOPIC, alive, free_port, result, results, scrape, submit, wait_for


def _parts_by_node(out: Path) -> set[str]:
    return {path.read_text() for path in out.glob("part-*.txt")}


def test_two_nodes_share_one_pipeline_and_exactly_one_finishes_it(
    start_node, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    nodes = [start_node("node-a"), start_node("node-b")]
    out = tmp_path / "fan"
    submit(bucket, "fan", {"name": "Fan", "module": "poltergust_testpipes", "out-dir": str(out),
                           "parts": 6, "seconds": 1.5}, environment_yaml)
    done = result(bucket, "fan", "done")
    assert _parts_by_node(out) == {"node-a", "node-b"}, "both nodes ran tasks of the graph"
    wait_for(lambda: not bucket.exists("pipeline/fan.config.yaml"), 10, "the config to be removed")
    assert results(bucket, "fan") == ["pipeline/fan.done.yaml"]
    loser = next(n for n in nodes if n.node_name != done["poltergust"]["node"])
    wait_for(lambda: "stopping its run" in loser.output() or "claim lost" in loser.output(), 30,
             "the other node to stop its part of the run")
    assert [n.node_name for n in nodes if "(claimed by this node)" in n.output()] == [done["poltergust"]["node"]]
    for node in nodes:
        assert bucket.exists(bucket.log_name("fan", node.node_name))


@pytest.mark.parametrize("backend", ["gcs"], indirect=True)
def test_a_finished_pipeline_costs_each_node_three_messages(
    start_node, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    """The claim is a marker outside the notified prefix: each node hears the upload, the result and the delete.

    Two one-task pipelines, one after the other; once every node has heard the
    second one's config removed, the first one's messages are all in too.
    """
    ports = {name: free_port() for name in ("node-a", "node-b")}
    nodes = [start_node(name, "--http-port", str(port), "--log-level", "DEBUG") for name, port in ports.items()]
    for name in ("first", "second"):
        submit(bucket, name, {"name": "Touch", "module": "poltergust_testpipes", "out-dir": str(tmp_path / name)},
               environment_yaml)
        result(bucket, name, "done")
    removed = f"event delete {bucket.url('pipeline/second.config.yaml')}#"
    wait_for(lambda: all(removed in node.output() for node in nodes), 30, "every node to hear the second removal")
    for port in ports.values():
        heard = {labels: value for labels, value in scrape(port).items()
                 if labels.startswith("poltergust_events_received_total{") and 'scope="watched"' in labels and value}
        assert heard == {'poltergust_events_received_total{kind="finalize",scope="watched"}': 4.0,
                         'poltergust_events_received_total{kind="delete",scope="watched"}': 2.0}, heard
    for name in ("first", "second"):
        assert results(bucket, name) == [f"pipeline/{name}.done.yaml"]
        assert [n for n in bucket.names(f"_poltergust/runs/pipeline/{name}/") if n.endswith("/claim")], name


@pytest.mark.parametrize("backend", ["gcs"], indirect=True)
def test_two_nodes_racing_to_claim_one_gets_412(
    start_node, pubsub, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    """Nodes on a topic nobody publishes to cannot be told that the other one finished: with `nodes: all`
    both run the pipeline to its end and try to claim it, and the bucket must refuse one."""
    silent = f"silent-{uuid.uuid4().hex[:8]}"
    pubsub.create_topic(silent)
    out = tmp_path / "race"
    submit(bucket, "race", {"name": "Fan", "module": "poltergust_testpipes", "out-dir": str(out),
                            "parts": 4, "seconds": 1.0}, environment_yaml, nodes="all")
    nodes = [start_node(name, topic=silent, wait=False) for name in ("node-a", "node-b")]
    done = result(bucket, "race", "done")
    losers = [n for n in nodes if n.node_name != done["poltergust"]["node"]]
    assert len(losers) == 1
    wait_for(lambda: "claim lost (HTTP 412)" in losers[0].output(), 60, "the losing node to get HTTP 412")
    log = wait_for(lambda: b"HTTP 412" in (bucket.read(bucket.log_name("race", losers[0].node_name)) or b"")
                   and bucket.read(bucket.log_name("race", losers[0].node_name)), 30, "the loser's log")
    assert b"nothing to write" in log
    assert results(bucket, "race") == ["pipeline/race.done.yaml"]


@pytest.mark.parametrize("backend", ["gcs"], indirect=True)
def test_duplicate_delivery_does_not_start_a_second_run(
    start_node, bucket, environment_yaml: str, tmp_path: Path, pubsub,
) -> None:
    node = start_node("node-a", "--log-level", "DEBUG")
    out = tmp_path / "dup"
    generation = submit(bucket, "dup", {"name": "Sleep", "module": "poltergust_testpipes", "out-dir": str(out),
                                        "seconds": 3}, environment_yaml)
    wait_for(lambda: list(out.glob("started-*")), 60, "the task to start")

    os.environ["PUBSUB_EMULATOR_HOST"] = pubsub.host
    publisher = pubsub_v1.PublisherClient()
    attributes = {"eventType": "OBJECT_FINALIZE", "bucketId": bucket.name, "objectId": "pipeline/dup.config.yaml",
                  "objectGeneration": str(generation), "payloadFormat": "JSON_API_V1"}
    topic = publisher.topic_path(PROJECT, TOPIC)
    publisher.publish(topic, json.dumps({"name": "pipeline/dup.config.yaml"}).encode(), **attributes).result()
    wait_for(lambda: "(already in progress)" in node.output(), 30, "the duplicate to be seen")

    result(bucket, "dup", "done")
    wait_for(lambda: not bucket.exists("pipeline/dup.config.yaml"), 10, "the config to be removed")
    publisher.publish(topic, b"{}", **attributes).result()
    wait_for(lambda: "is gone (finished, replaced or deleted)" in node.output(), 30, "the late duplicate to be seen")
    assert len(list(out.glob("started-*"))) == 1, "luigi ran the task once"
    assert node.output().count("run of generation") == 1


def test_sigterm_mid_run_exits_promptly_and_another_node_completes(
    start_node, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    node = start_node("node-a")
    out = tmp_path / "term"
    submit(bucket, "term", {"name": "Sleep", "module": "poltergust_testpipes", "out-dir": str(out),
                            "seconds": 3}, environment_yaml)
    marker = wait_for(lambda: list(out.glob("started-*")), 60, "the task to start")[0]
    luigi_pid = int(marker.name.rsplit("-", 1)[1])

    node.process.send_signal(signal.SIGTERM)
    assert node.process.wait(timeout=15) == 0
    wait_for(lambda: not alive(luigi_pid), 10, "luigi to be stopped with the node")
    assert bucket.exists("pipeline/term.config.yaml"), "the unfinished config stays for the next node"
    assert results(bucket, "term") == []

    start_node("node-b")
    assert result(bucket, "term", "done")["poltergust"]["node"] == "node-b"
    assert (out / "slept.txt").read_text() == "node-b"
