"""What one pipeline costs a fleet, and the subscription each node keeps, on the real stack.

A one-task pipeline runs luigi on one node (two at most), a wide graph spreads
over nodes that joined through a call for help; every node process has a
subscription of its own, made for its prefixes, refused when it belongs to
something else, re-attached until that works, and deleted on a clean stop.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from harness import (
    PROJECT,
    TOPIC,
    Bucket,
    Fault,
    GatedProxy,
    Luigid,
    Node,
    Proxy,
    PubSubEmulator,
    free_port,
    luigid_call,
    result,
    run_log,
    submit,
    wait_for,
)

GCS = pytest.mark.parametrize("backend", ["gcs"], indirect=True)

TOUCH = {"name": "Touch", "module": "poltergust_testpipes"}
LISTENING = re.compile(r"listening on (projects/\S+/subscriptions/\S+?)[\"\s]")


def _subscriber(pubsub: PubSubEmulator) -> pubsub_v1.SubscriberClient:
    os.environ["PUBSUB_EMULATOR_HOST"] = pubsub.host
    return pubsub_v1.SubscriberClient()


def _subscription(pubsub: PubSubEmulator, path: str) -> pubsub_v1.types.Subscription | None:
    with _subscriber(pubsub) as client:
        try:
            return client.get_subscription(request={"subscription": path})
        except gexc.NotFound:
            return None


def _listening_on(node: Node) -> str:
    match = wait_for(lambda: LISTENING.search(node.output()), 30, f"{node.name} to name its subscription")
    return match.group(1)  # type: ignore[union-attr]


def _healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError) as exc:  # not serving yet
        return 0, str(exc)


def _stop_cleanly(node: Node) -> None:
    node.process.send_signal(signal.SIGTERM)
    assert node.process.wait(timeout=30) == 0


@pytest.fixture
def plain_node(
    tmp_path: Path, pubsub: PubSubEmulator, luigid: Luigid, bucket: Bucket, env_dir: Path,
) -> Iterator[Callable[..., Node]]:
    """Start a node as an operator would: no --subscription, no --data-dir (HOME is the test's own)."""
    nodes: list[Node] = []

    def start(name: str, *extra: str, wait: bool = True) -> Node:
        node = Node.launch(name, tmp_path, *extra, path=bucket.url("pipeline"), scheduler_url=luigid.url,
                           env_dir=env_dir, pubsub_host=pubsub.host, storage_url=bucket.gcs.url,
                           env_overrides={"HOME": str(tmp_path / "home")}, wait=False)
        nodes.append(node)
        if wait:
            node.wait_ready()
        return node

    yield start
    for node in nodes:
        node.stop()


def _run_logs(bucket: Bucket, pipeline: str) -> dict[str, bytes]:
    """Every node's log of the pipeline's runs: who took part, and what it did."""
    return {name: bucket.read(name) or b"" for name in bucket.names(f"_poltergust/logs/pipeline/{pipeline}/")}


def _three(start_node) -> list[Node]:
    """Three nodes, started together; unique names, since the host may run other node processes."""
    suffix = uuid.uuid4().hex[:6]
    nodes = [start_node(f"{letter}-{suffix}", wait=False) for letter in "abc"]
    for node in nodes:
        node.wait_ready()
    return nodes


@GCS
def test_a_one_task_pipeline_on_three_nodes_starts_luigi_on_at_most_two(
    start_node, bucket: Bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    nodes = _three(start_node)
    submit(bucket, "single", {**TOUCH, "out-dir": str(tmp_path / "single")}, environment_yaml)
    done = result(bucket, "single", "done")
    wait_for(lambda: not bucket.exists("pipeline/single.config.yaml"), 30, "the config to be removed")

    wait_for(lambda: all("this node starts generation" in n.output() or "standing by to help" in n.output()
                         for n in nodes), 30, "every node to hear of the config")
    assert sum("this node starts generation" in n.output() for n in nodes) == 1
    logs = _run_logs(bucket, "single")
    assert 1 <= len(logs) <= 2, sorted(logs)
    assert any(name.endswith(f"/{done['poltergust']['node']}.log.txt") for name in logs), sorted(logs)
    attempts = sum(log.count(b"luigi attempt") for log in logs.values())
    assert 1 <= attempts <= 2, {name: log.decode()[-2000:] for name, log in logs.items()}


@GCS
def test_a_wide_graph_spreads_over_nodes_that_answer_a_call_for_help(
    start_node, bucket: Bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    nodes = _three(start_node)
    out = tmp_path / "fan"
    submit(bucket, "wide", {"name": "Fan", "module": "poltergust_testpipes", "out-dir": str(out), "parts": 6,
                            "seconds": 2}, environment_yaml)
    result(bucket, "wide", "done")
    workers = {path.read_text() for path in out.glob("part-*.txt")}
    assert len(workers) >= 2, f"the parts ran on {workers} only"
    callers = [n.node_name for n in nodes if re.search(r"asked for \d+ more node\(s\)", n.output())]
    helpers = [n.node_name for n in nodes if "joining the run (call for help" in n.output()]
    assert len(callers) == 1 and helpers and callers[0] not in helpers, (callers, helpers)
    assert workers <= {callers[0], *helpers}
    # Helpers are pure assistants: they take tasks without adding the graph to luigid again (no PENDING reports).
    def final_logs() -> dict[str, str] | None:
        logs = {name.rsplit("/", 1)[-1]: log.decode() for name, log in _run_logs(bucket, "wide").items()}
        texts = {helper: logs.get(f"{helper}.log.txt", "") for helper in helpers}
        return texts if all("run stopped on this node" in text or "finished locally" in text
                            for text in texts.values()) else None

    for text in wait_for(final_logs, 30, "the helpers' last log uploads").values():  # type: ignore[union-attr]
        assert "poltergust assistant of root task Fan_" in text, text[-2000:]
        assert not re.search(r"Informed scheduler that task\s+\S+\s+has status\s+PENDING", text), text[-2000:]


@GCS
def test_a_joined_node_whose_luigi_fails_leaves_the_run_to_its_starter(
    start_node, bucket: Bucket, luigid: Luigid, pubsub: PubSubEmulator, env_dir: Path, environment_yaml: str,
    tmp_path: Path,
) -> None:
    """A helper's own luigi failing while luigid cannot answer it (an overloaded luigid, here one that answers
    that node 503) says nothing of the pipeline: the helper stands down, the starter ends the run done."""
    starter = start_node(f"starter-{uuid.uuid4().hex[:6]}")
    out = tmp_path / "fan"
    submit(bucket, "joined", {"name": "Fan", "module": "poltergust_testpipes", "out-dir": str(out), "parts": 6,
                              "seconds": 2}, environment_yaml,
           luigi={"core": {"rpc-retry-attempts": 1, "rpc-connect-timeout": 2}})
    wait_for(lambda: "this node starts generation" in starter.output(), 60, "the starter to start the run")
    refused = Proxy(luigid.url, classify=luigid_call, fault=lambda method, path, body: Fault(503))
    try:
        name = f"joiner-{uuid.uuid4().hex[:6]}"
        joiner = Node.launch(name, tmp_path, path=bucket.url("pipeline"), scheduler_url=refused.url,
                             env_dir=env_dir, data_dir=tmp_path / name, pubsub_host=pubsub.host,
                             storage_url=bucket.gcs.url, subscription=f"sub-{name}")
        try:
            done = result(bucket, "joined", "done")
            assert done["poltergust"]["node"] == starter.node_name
            assert "joining the run (call for help" in joiner.output(), joiner.output()[-3000:]
            logs = f"_poltergust/logs/pipeline/joined/{done['poltergust']['generation']}/{joiner.node_name}"
            wait_for(lambda: b"leaving the run to the node that started it"
                     in b"".join(bucket.read(name) or b"" for name in bucket.names(logs)), 30,
                     "the joiner's log to say it stood down")
            assert refused.counts(), "the joiner's luigi reached luigid only through the refusing proxy"
        finally:
            joiner.stop()
    finally:
        refused.close()
    assert {path.read_text() for path in out.glob("part-*.txt")} == {starter.node_name}


@GCS
def test_a_graph_whose_scheduling_waits_on_a_dropped_call_is_not_taken_for_stuck(
    bucket: Bucket, luigid: Luigid, pubsub: PubSubEmulator, env_dir: Path, environment_yaml: str, tmp_path: Path,
) -> None:
    """An overloaded luigid drops one of the starter's add_task calls: luigi waits `rpc-retry-wait` before adding
    the rest of the graph, and meanwhile luigid names the tasks not yet added after their ids, UNKNOWN. That is
    a graph still being scheduled, not one whose complete() raised: the run goes on and ends done."""
    calls = {"add_task": 0}
    lock = threading.Lock()

    def drop_the_second_add_task(method: str, path: str, body: bytes) -> Fault | None:
        if luigid_call(method, path, body) != "add_task":
            return None
        with lock:
            calls["add_task"] += 1
            return Fault(None) if calls["add_task"] == 2 else None  # the first task after the root

    dropping = Proxy(luigid.url, classify=luigid_call, fault=drop_the_second_add_task)
    name = f"starter-{uuid.uuid4().hex[:6]}"
    node = Node.launch(name, tmp_path, path=bucket.url("pipeline"), scheduler_url=dropping.url, env_dir=env_dir,
                       data_dir=tmp_path / name, pubsub_host=pubsub.host, storage_url=bucket.gcs.url,
                       subscription=f"sub-{name}")
    try:
        out = tmp_path / "fan"
        submit(bucket, "dropped", {"name": "Fan", "module": "poltergust_testpipes", "out-dir": str(out),
                                   "parts": 6, "seconds": 0.1}, environment_yaml,
               luigi={"core": {"rpc-retry-wait": 6}})  # longer than the verdicts a stuck graph gets
        result(bucket, "dropped", "done")
        log = run_log(tmp_path, name, "dropped")
        assert "Retrying attempt 2" in log and "luigi attempt 2" not in log, log[-3000:]
        assert len(list(out.glob("part-*.txt"))) == 6
    finally:
        node.stop()
        dropping.close()


@GCS
def test_a_starter_whose_luigi_luigid_does_not_answer_runs_it_again_within_the_outage_limit(
    bucket: Bucket, luigid: Luigid, pubsub: PubSubEmulator, env_dir: Path, environment_yaml: str, tmp_path: Path,
) -> None:
    """luigid accepting connections but failing luigi's calls (overloaded: 503 here) says nothing of the pipeline:
    the starter runs luigi again, and ends the run as an error only once that lasts past `--outage-limit`."""
    refusals = {"left": 2}

    def refuse_add_task(method: str, path: str, body: bytes) -> Fault | None:
        if luigid_call(method, path, body) != "add_task" or not refusals["left"]:
            return None
        refusals["left"] -= 1
        return Fault(503)

    silent = Proxy(luigid.url, classify=luigid_call, fault=refuse_add_task)
    name = f"starter-{uuid.uuid4().hex[:6]}"
    starter = Node.launch(name, tmp_path, "--outage-limit", "5", path=bucket.url("pipeline"),
                          scheduler_url=silent.url, env_dir=env_dir, data_dir=tmp_path / name,
                          pubsub_host=pubsub.host, storage_url=bucket.gcs.url, subscription=f"sub-{name}")
    quick = {"core": {"rpc-retry-attempts": 1}}
    try:
        submit(bucket, "answered", {**TOUCH, "out-dir": str(tmp_path / "answered")}, environment_yaml, luigi=quick)
        done = result(bucket, "answered", "done")
        assert refusals["left"] == 0
        log = run_log(tmp_path, name, "answered")
        assert done["poltergust"]["node"] == name and log.count("luigi gave up on the scheduler") == 2, log[-3000:]

        refusals["left"] = 1_000_000
        submit(bucket, "unanswered", {**TOUCH, "out-dir": str(tmp_path / "unanswered")}, environment_yaml,
               luigi=quick)
        reason = result(bucket, "unanswered", "error")["poltergust"]["reason"]
        assert reason.startswith(f"the luigi scheduler at {silent.url} did not answer luigi for 5s: "), reason
        assert "RPCError" in reason
    finally:
        starter.stop()
        silent.close()


@GCS
def test_a_failure_luigid_does_not_explain_counts_only_if_this_nodes_luigi_reported_it(
    bucket: Bucket, luigid: Luigid, pubsub: PubSubEmulator, env_dir: Path, environment_yaml: str, tmp_path: Path,
) -> None:
    """luigid, overloaded, does not answer `fetch_error` (503 here): a task this node's luigi saw fail is the
    pipeline's error, told from the node's own log (`test_units` has the task that failed elsewhere)."""
    unexplained = Proxy(luigid.url, classify=luigid_call,
                        fault=lambda method, path, body: Fault(503) if luigid_call(method, path, body)
                        == "fetch_error" else None)
    name = f"starter-{uuid.uuid4().hex[:6]}"
    starter = Node.launch(name, tmp_path, path=bucket.url("pipeline"), scheduler_url=unexplained.url,
                          env_dir=env_dir, data_dir=tmp_path / name, pubsub_host=pubsub.host,
                          storage_url=bucket.gcs.url, subscription=f"sub-{name}")
    try:
        submit(bucket, "unexplained", {"name": "Fail", "module": "poltergust_testpipes",
                                       "out-dir": str(tmp_path / "unexplained")}, environment_yaml)
        reason = result(bucket, "unexplained", "error")["poltergust"]["reason"]
        assert reason.startswith("a luigi task failed: Fail(") and reason.endswith(
            "RuntimeError: this task fails on purpose"), reason
        assert unexplained.counts().get("fetch_error"), "luigid was asked, and did not answer"
    finally:
        starter.stop()
        unexplained.close()


def test_a_failed_reattach_is_retried_until_it_works(
    stack, stack_node, tmp_path: Path, environment_yaml: str,
) -> None:
    pubsub, gcs, _ = stack
    bucket = Bucket(gcs, "reattach")
    port = free_port()
    node = stack_node("node-a", bucket, "--http-port", str(port))
    try:
        assert _healthz(port)[0] == 200
        # Pub/Sub comes back empty and without the topic: the stream breaks, and re-attaching fails.
        pubsub.stop()
        pubsub.start()
        pubsub.wait_ready()
        wait_for(lambda: "cannot attach the event stream" in node.output(), 90, "a failed re-attach")
        status, body = _healthz(port)
        assert status == 503 and "not attached" in body, (status, body)
        submit(bucket, "while-deaf", {**TOUCH, "out-dir": str(tmp_path / "deaf")}, environment_yaml)

        pubsub.create_topic(TOPIC)
        wait_for(lambda: _healthz(port)[0] == 200, 90, "the node to re-attach")
        assert node.output().count("cannot attach the event stream") >= 1
        result(bucket, "while-deaf", "done", timeout=60)  # found by the scan that follows the re-attach
        submit(bucket, "after", {**TOUCH, "out-dir": str(tmp_path / "after")}, environment_yaml)
        result(bucket, "after", "done", timeout=60)  # heard: the next rescan is minutes away
        node.check_alive()
    finally:
        node.stop()


@GCS
def test_a_late_notification_of_its_own_claim_does_not_stop_a_finished_run(
    start_node, pubsub: PubSubEmulator, bucket: Bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    """The claim rewrites the config, so the run's own generation is announced as replaced; a late or repeated
    delivery of that while the run writes its last log must not stop it, nor end the user's log with a stop."""
    proxy = GatedProxy(bucket.gcs.url, lambda method, path, body: method == "POST" and b"claimed the run" in body)
    try:
        node = start_node(f"claimer-{uuid.uuid4().hex[:6]}", "--log-level", "DEBUG",
                          env_overrides={"STORAGE_EMULATOR_HOST": proxy.url})
        generation = submit(bucket, "late", {**TOUCH, "out-dir": str(tmp_path / "late")}, environment_yaml)
        wait_for(proxy.held.is_set, 120, "the run's last log upload, after its claim")
        heard = f"event delete {bucket.url('pipeline/late.config.yaml')}#{generation} (already in progress)"
        before = node.output().count(heard)
        os.environ["PUBSUB_EMULATOR_HOST"] = pubsub.host
        publisher = pubsub_v1.PublisherClient()
        publisher.publish(publisher.topic_path(PROJECT, TOPIC), b"{}", eventType="OBJECT_DELETE",
                          bucketId=bucket.name, objectId="pipeline/late.config.yaml",
                          objectGeneration=str(generation), overwrittenByGeneration=str(generation + 1)).result()
        wait_for(lambda: node.output().count(heard) > before, 30, "the notification to be heard during the upload")
        proxy.release()
        log_name = bucket.log_name("late", node.node_name)
        log = wait_for(lambda: b"claimed the run" in (bucket.read(log_name) or b"") and bucket.read(log_name), 60,
                       "the run's last log")
    finally:
        proxy.close()
    assert "stopping its run" not in node.output()
    assert b"run stopped on this node" not in log, log.decode()[-1500:]


@GCS
def test_a_node_stopped_while_it_writes_a_result_removes_the_config_before_it_exits(
    start_node, bucket: Bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    """SIGTERM between the result and the config's removal: the run finishes its writes; stopped halfway, it left
    the config for the next node to run the pipeline again."""
    proxy = GatedProxy(bucket.gcs.url, lambda method, path, body: method == "DELETE" and ".config.yaml" in path)
    try:
        node = start_node(f"stopped-{uuid.uuid4().hex[:6]}", env_overrides={"STORAGE_EMULATOR_HOST": proxy.url})
        submit(bucket, "stopped", {**TOUCH, "out-dir": str(tmp_path / "stopped")}, environment_yaml)
        wait_for(proxy.held.is_set, 120, "the config's removal, after the result")
        assert bucket.exists("pipeline/stopped.done.yaml")
        node.signal(signal.SIGTERM)
        wait_for(lambda: "run(s) finishing, waiting" in node.output(), 30, "the node to wait for the finishing run")
        proxy.release()
        assert node.stop() == 0
    finally:
        proxy.close()
    assert not bucket.exists("pipeline/stopped.config.yaml")
    assert "(claimed by this node)" in node.output()


@GCS
def test_two_processes_with_one_name_get_subscriptions_of_their_own_and_delete_them_when_stopped(
    plain_node, pubsub: PubSubEmulator, bucket: Bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    name = f"twin-{uuid.uuid4().hex[:6]}"
    first, second = plain_node(name), plain_node(name)
    assert f"this one is {name}-2" in second.output()
    paths = [_listening_on(first), _listening_on(second)]
    assert paths[0] != paths[1] and f"-{name}-2-" in paths[1], paths
    assert all(_subscription(pubsub, path) is not None for path in paths)

    submit(bucket, "both", {**TOUCH, "out-dir": str(tmp_path / "both")}, environment_yaml)
    assert result(bucket, "both", "done")["poltergust"]["node"] in (name, f"{name}-2")
    wait_for(lambda: all("both.config.yaml" in node.output() for node in (first, second)), 30,
             "both processes to hear of the config")

    for node, path in zip((first, second), paths):
        _stop_cleanly(node)
        assert f"deleted subscription {path}" in node.output()
        assert _subscription(pubsub, path) is None


@GCS
def test_an_oversized_filter_falls_back_to_the_bucket_and_the_node_still_works(
    start_node, pubsub: PubSubEmulator, bucket: Bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    prefixes = [f"team-{index}-{'x' * 40}" for index in range(4)]
    extra = [arg for prefix in prefixes for arg in ("--path", bucket.url(prefix))]
    node = start_node(f"filtered-{uuid.uuid4().hex[:6]}", *extra)
    subscription = _subscription(pubsub, _listening_on(node))
    assert subscription is not None
    assert subscription.filter == f'attributes.bucketId = "{bucket.name}"', subscription.filter

    bucket.upload("environment/test.yaml", environment_yaml)
    bucket.upload(f"{prefixes[-1]}/team.config.yaml", yaml.safe_dump(
        {"environment": bucket.url("environment/test.yaml"), "task": {**TOUCH, "out-dir": str(tmp_path / "team")}}))
    wait_for(lambda: bucket.exists(f"{prefixes[-1]}/team.done.yaml"), 120, "the pipeline under a long prefix")


@GCS
def test_an_existing_subscription_for_another_topic_or_filter_is_refused_and_kept(
    plain_node, pubsub: PubSubEmulator,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    elsewhere = pubsub.create_topic(f"elsewhere-{suffix}")
    ours = f"projects/{PROJECT}/topics/{TOPIC}"
    clashes = {f"other-topic-{suffix}": elsewhere, f"other-filter-{suffix}": ours}
    with _subscriber(pubsub) as client:
        for name, topic in clashes.items():
            client.create_subscription(request={"name": client.subscription_path(PROJECT, name), "topic": topic,
                                                "filter": 'attributes.team = "other"'})
    try:
        ports = {name: free_port() for name in clashes}
        nodes = {name: plain_node(f"refusing-{name}", "--subscription", name, "--http-port", str(ports[name]),
                                  wait=False) for name in clashes}
        for name, node in nodes.items():
            wait_for(lambda: "delete it, or pick another --subscription" in node.output(), 60, "the refusal")
            path = f"projects/{PROJECT}/subscriptions/{name}"
            assert f"subscription {path} exists on {clashes[name]} with filter" in node.output()
            status, body = wait_for(lambda: (reply := _healthz(ports[name]))[0] and reply, 30, "the health check")
            assert status == 503 and "not attached" in body, (status, body)
        for name, node in nodes.items():
            _stop_cleanly(node)
            kept = _subscription(pubsub, f"projects/{PROJECT}/subscriptions/{name}")
            assert kept is not None and kept.topic == clashes[name], "a subscription it refused is not its to delete"
    finally:
        with _subscriber(pubsub) as client:
            for name in clashes:
                with contextlib.suppress(gexc.NotFound):
                    client.delete_subscription(request={"subscription": client.subscription_path(PROJECT, name)})
