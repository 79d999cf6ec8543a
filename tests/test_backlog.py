"""The backlog subscription on the real stack: a config's message stays until the config is finished."""
from __future__ import annotations

import os
import re
import signal
import uuid
from pathlib import Path

import pytest
import yaml
from google.cloud import pubsub_v1
from harness import PROJECT, TOPIC, result, results, submit, wait_for

from poltergust.layout import Location
from poltergust.node.backlog import ensure_subscription
from poltergust.settings import parse_settings

SLEEP = {"name": "Sleep", "module": "poltergust_testpipes"}
TOUCH = {"name": "Touch", "module": "poltergust_testpipes"}
ACK_DEADLINE = 10
"""The shortest Pub/Sub allows: a killed node's message returns within about this long."""


@pytest.fixture
def backend() -> str:
    return "gcs"


@pytest.fixture
def backlog(bucket, pubsub) -> str:
    """The backlog subscription, created before any node runs (as the deploy does)."""
    subscriber = pubsub_v1.SubscriberClient()
    path = subscriber.subscription_path(PROJECT, f"backlog-{uuid.uuid4().hex[:8]}")
    ensure_subscription(subscriber, path, subscriber.topic_path(PROJECT, TOPIC),
                        [Location.parse(bucket.url("pipeline"))], ACK_DEADLINE)
    yield path
    subscriber.delete_subscription(request={"subscription": path})
    subscriber.close()


def _flags(backlog: str) -> list[str]:
    return ["--backlog-subscription", backlog, "--backlog-ack-deadline", str(ACK_DEADLINE)]


def _peek(backlog: str) -> list[str]:
    """Configs whose messages are pullable now, handed straight back (nacked) so that nodes get them.

    The emulator ignores subscription filters: other objects' messages are
    there too (and a node acks them at once), so only configs count.
    """
    subscriber = pubsub_v1.SubscriberClient()
    try:
        response = subscriber.pull(request={"subscription": backlog, "max_messages": 100,
                                            "return_immediately": True}, timeout=10)
        ids = [received.ack_id for received in response.received_messages]
        if ids:
            subscriber.modify_ack_deadline(request={"subscription": backlog, "ack_ids": ids,
                                                    "ack_deadline_seconds": 0})
        names = (received.message.attributes.get("objectId", "") for received in response.received_messages)
        return sorted(name for name in names if name.endswith(".config.yaml"))
    finally:
        subscriber.close()


def _acknowledged(node, name: str) -> int:
    """How many generations of the config this node acknowledged.

    A finished config has one: the one submitted (its claim is a marker outside the pipeline prefix, so the
    config is never rewritten and no second message comes).
    """
    return sum(1 for line in node.output().splitlines()
               if f"pipeline/{name}.config.yaml#" in line and "finished, acknowledged" in line)


def _stop_and_check_empty(node, backlog: str) -> None:
    """After a clean stop nothing is held, so a message still unacked would be pullable again."""
    assert node.stop() == 0
    assert _peek(backlog) == []


def test_a_config_waits_in_the_backlog_until_a_node_finishes_it(
    start_node, bucket, backlog, environment_yaml: str, tmp_path: Path,
) -> None:
    submit(bucket, "waiting", {**TOUCH, "out-dir": str(tmp_path / "out")}, environment_yaml)
    wait_for(lambda: _peek(backlog) == ["pipeline/waiting.config.yaml"], 30, "the config's message in the backlog")
    assert _peek(backlog) == ["pipeline/waiting.config.yaml"]  # still there: nobody acknowledged it

    node = start_node("node-a", *_flags(backlog))
    assert result(bucket, "waiting", "done")["poltergust"]["node"] == "node-a"
    wait_for(lambda: _acknowledged(node, "waiting") == 1, 30, "the message to be acknowledged")
    _stop_and_check_empty(node, backlog)


def test_a_killed_nodes_config_is_redelivered_and_completed(
    start_node, bucket, backlog, environment_yaml: str, tmp_path: Path,
) -> None:
    # A short staleness window (the same on both nodes, as the flag requires): a standing-by node checks the
    # starter's marker every third of it, so the other node takes the dead starter's run over within seconds.
    stale = ["--start-stale-after", "6"]
    node = start_node("node-a", *_flags(backlog), *stale)
    out = tmp_path / "killed"
    submit(bucket, "killed", {**SLEEP, "out-dir": str(out), "seconds": 3}, environment_yaml)
    luigi_pid = int(wait_for(lambda: list(out.glob("started-*")), 60, "the task to start")[0].name.rsplit("-", 1)[1])
    assert "backlog: holding" in node.output()
    node.signal(signal.SIGKILL)  # the node and, as on a machine that dies, its luigi too
    os.killpg(luigi_pid, signal.SIGKILL)
    node.process.wait(10)
    assert bucket.exists("pipeline/killed.config.yaml")

    # Another node is offered the message once the dead node's lease runs out, takes the run over once the dead
    # starter's marker is stale, and acknowledges the message only after writing the result.
    other = start_node("node-b", *_flags(backlog), *stale)
    generation = re.search(r"pipeline/killed\.config\.yaml#(\d+)", node.output()).group(1)
    wait_for(lambda: f"backlog: holding {bucket.url('pipeline/killed.config.yaml')}#{generation}"
             in other.output(), 6 * ACK_DEADLINE, "the message to be redelivered")
    assert result(bucket, "killed", "done")["poltergust"]["node"] == "node-b"
    assert "taking the run over" in other.output()
    wait_for(lambda: _acknowledged(other, "killed") == 1, 6 * ACK_DEADLINE, "the message to be acknowledged")
    assert results(bucket, "killed") == ["pipeline/killed.done.yaml"]
    _stop_and_check_empty(other, backlog)


def test_a_stopping_node_hands_its_configs_back(
    start_node, bucket, backlog, environment_yaml: str, tmp_path: Path,
) -> None:
    node = start_node("node-a", "--backlog-subscription", backlog, "--backlog-ack-deadline", "600")
    out = tmp_path / "stopped"
    submit(bucket, "stopped", {**SLEEP, "out-dir": str(out), "seconds": 120}, environment_yaml)
    wait_for(lambda: list(out.glob("started-*")), 60, "the task to start")
    assert node.stop() == 0
    # Handed back at once, after the stream stopped (a nack before could come straight back to this node).
    # That another node is then offered it at once can only be seen on Pub/Sub itself: the emulator ignores a
    # modify-ack-deadline 0 for a message held for more than a moment once its streaming pull has shut down
    # (one closed within a second of delivery does come back), so here: that the hand-back went through.
    assert "backlog: handed back 1 message(s)" in node.output()


def test_cancelled_and_replaced_configs_are_acknowledged(
    start_node, bucket, backlog, environment_yaml: str, tmp_path: Path,
) -> None:
    node = start_node("node-a", *_flags(backlog))
    submit(bucket, "cancelled", {**SLEEP, "out-dir": str(tmp_path / "c"), "seconds": 120}, environment_yaml)
    submit(bucket, "replaced", {**SLEEP, "out-dir": str(tmp_path / "r"), "seconds": 120}, environment_yaml)
    for out in ("c", "r"):
        wait_for(lambda: list((tmp_path / out).glob("started-*")), 60, f"the task in {out} to start")
    bucket.delete("pipeline/cancelled.config.yaml")
    submit(bucket, "replaced", {**TOUCH, "out-dir": str(tmp_path / "r2")}, environment_yaml)
    assert result(bucket, "replaced", "done")["task"]["name"] == "Touch"
    # The deleted config, the replaced generation and the new one: each acknowledged once.
    wait_for(lambda: _acknowledged(node, "cancelled") == 1 and _acknowledged(node, "replaced") == 2, 60,
             "all three messages to be acknowledged")
    assert not bucket.exists("pipeline/cancelled.done.yaml") and not bucket.exists("pipeline/cancelled.error.yaml")
    _stop_and_check_empty(node, backlog)


def test_a_duplicate_delivery_never_starts_a_second_run(
    start_node, bucket, backlog, environment_yaml: str, tmp_path: Path,
) -> None:
    node = start_node("node-a", *_flags(backlog))
    out = tmp_path / "dup"
    generation = submit(bucket, "dup", {**SLEEP, "out-dir": str(out), "seconds": 3}, environment_yaml)
    wait_for(lambda: list(out.glob("started-*")), 60, "the task to start")
    publisher = pubsub_v1.PublisherClient()
    publisher.publish(publisher.topic_path(PROJECT, TOPIC), b"", eventType="OBJECT_FINALIZE",
                      bucketId=bucket.name, objectId="pipeline/dup.config.yaml",
                      objectGeneration=str(generation)).result(timeout=10)
    wait_for(lambda: node.output().count("backlog: holding") >= 1, 10, "the node to hold the message")
    assert result(bucket, "dup", "done")["poltergust"]["node"] == "node-a"
    wait_for(lambda: _acknowledged(node, "dup") == 1, 30, "the messages to be acknowledged")
    assert len(list(out.glob("started-*"))) == 1
    assert node.output().count("this node starts generation") == 1
    _stop_and_check_empty(node, backlog)


def _acknowledged_generations(nodes, bucket, generations: dict[str, int]) -> set[str]:
    """Configs whose submitted generation's message some node acknowledged (from the nodes' logs)."""
    lines = [line for node in nodes for line in node.output().splitlines() if "finished, acknowledged" in line]
    return {name for name, generation in generations.items()
            if any(f"{bucket.url(f'pipeline/{name}.config.yaml')}#{generation} " in line for line in lines)}


def _unfinished(bucket, generations: dict[str, int]) -> set[str]:
    """Configs still waiting or running: their submitted generation is still the current object."""
    present = set(bucket.names("pipeline/"))
    return {name for name, generation in generations.items() if f"pipeline/{name}.config.yaml" in present
            and (bucket.stat(f"pipeline/{name}.config.yaml") or {}).get("generation") in (generation, str(generation))}


def test_a_burst_of_fifty_configs_leaves_one_result_each_and_an_empty_backlog(
    start_node, bucket, backlog, environment_yaml: str, tmp_path: Path,
) -> None:
    """The backlog count, sampled through the burst, is never below "configs waiting or running".

    The emulator has no Cloud Monitoring, and nothing in the Pub/Sub API reads
    a subscription's undelivered count without taking messages. So this checks
    what defines it: a submitted config's message leaves the backlog only once
    the config is finished (acknowledged => claimed, deleted or replaced), at
    every sample, and all of them have left at the end.
    """
    names = [f"burst-{i:02d}" for i in range(50)]
    generations = {}
    for i, name in enumerate(names):
        if i % 10 == 0:  # a few real pipelines; the rest are refused at once (a config without a task)
            generations[name] = submit(bucket, name, {**TOUCH, "out-dir": str(tmp_path / name)}, environment_yaml)
        else:
            refused = yaml.safe_dump({"environment": "x.yaml"})
            generations[name] = bucket.upload(f"pipeline/{name}.config.yaml", refused)
    wait_for(lambda: len(_peek(backlog)) == 50, 60, "all 50 messages in the backlog")
    # Not waiting for the nodes to be ready: sampling starts before they take work, so it sees the burst.
    nodes = [start_node(name, *_flags(backlog), wait=False) for name in ("node-a", "node-b")]
    samples: list[tuple[int, int]] = []

    def sample() -> bool:
        acknowledged = _acknowledged_generations(nodes, bucket, generations)  # before: acks only grow
        unfinished = _unfinished(bucket, generations)
        assert not acknowledged & unfinished, f"acknowledged while waiting or running: {acknowledged & unfinished}"
        samples.append((50 - len(acknowledged), len(unfinished)))
        return len(acknowledged) == 50

    wait_for(sample, 240, "every config's message to be acknowledged", interval=0.5)
    assert any(0 < left < 50 for left, _ in samples), f"no sample during the burst: {samples}"
    for name in names:
        outcome = "done" if names.index(name) % 10 == 0 else "error"
        assert results(bucket, name) == [f"pipeline/{name}.{outcome}.yaml"]
    for node in nodes:
        assert node.stop() == 0
    assert _peek(backlog) == []


@pytest.mark.parametrize("argv, problem", [
    (["--path", "/tmp/bucket/pipeline", "--backlog-subscription", "bl"], "only for gs:// paths"),
    (["--path", "gs://b/pipeline", "--project", "p", "--backlog-ack-deadline", "5"], "10 to 600 seconds"),
    (["--path", "/tmp/bucket/pipeline", "--start-stale-after", "1"], "at least 3 seconds"),
])
def test_backlog_flags_are_checked(argv: list[str], problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(argv)
    assert problem in capsys.readouterr().err
