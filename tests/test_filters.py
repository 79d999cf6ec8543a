"""Every Pub/Sub filter the code and the deploy create, evaluated against the notifications the tests really see.

The emulator ignores subscription filters, so a filter that would drop a
node's events, or let deletes and calls for help into the backlog (waking
nodes for nothing), passes every other test. Here tests/pubsub_filter.py
evaluates them as Pub/Sub would, on the attributes of messages pulled from the
emulator after real uploads, overwrites, deletes, a call for help and a log
write, and each subscription's share is asserted.
"""
from __future__ import annotations

import asyncio
import re
import subprocess
import uuid
from pathlib import Path

import pytest
from google.cloud import pubsub_v1
from harness import PROJECT, ROOT, TOPIC, Bucket, wait_for
from pubsub_filter import FilterError, compile_filter, passes

from poltergust.events.pubsub import PubSubEvents, backlog_filter, subscription_filter
from poltergust.layout import Location

MAIN_TF = ROOT / "deploy" / "terraform" / "modules" / "poltergust" / "main.tf"
CREATE = ROOT / "deploy" / "gcloud" / "create.sh"
OLD_BACKLOG = '(attributes.bucketId = "{bucket}" AND hasPrefix(attributes.objectId, "{prefix}/"))'
"""The backlog filter before issue 23: it let deletes and calls for help wake nodes."""


# ---------------------------------------------------------------------------
# The evaluator itself

@pytest.mark.parametrize(("text", "attributes", "expected"), [
    ('attributes.a = "x"', {"a": "x"}, True),
    ('attributes.a = "x"', {"a": "y"}, False),
    ('attributes.a != "x"', {}, True),
    ("attributes:a", {"a": ""}, True),
    ("NOT attributes:a", {"a": ""}, False),
    ("-attributes:a", {}, True),
    ('hasPrefix(attributes.o, "pipe/")', {"o": "pipe/x"}, True),
    ('hasPrefix(attributes.o, "pipe/")', {"o": "x/pipe/"}, False),
    ('attributes.a = "x" AND (attributes.b = "y" OR attributes.b = "z")', {"a": "x", "b": "z"}, True),
    ('(attributes.a = "x" AND attributes:b) OR attributes.c = "q\\"uote"', {"c": 'q"uote'}, True),
    ("", {"anything": "1"}, True),
])
def test_the_evaluator_follows_the_documented_semantics(text: str, attributes: dict, expected: bool) -> None:
    assert passes(text, attributes) is expected


@pytest.mark.parametrize(("text", "problem"), [
    ('attributes.a = "x" AND attributes.b = "y" OR attributes.c = "z"', "mixed"),
    ('hasSuffix(attributes.o, ".config.yaml")', "only hasPrefix"),
    ('attributes.a = "x" and attributes.b = "y"', "upper case"),
    ("attributes.a = x", "quoted"),
    ('attributes.a = "' + "x" * 250 + '"', "bytes"),
    ('(attributes.a = "x"', "expected )"),
])
def test_the_evaluator_refuses_what_pubsub_refuses(text: str, problem: str) -> None:
    with pytest.raises(FilterError, match=re.escape(problem)):
        compile_filter(text)


# ---------------------------------------------------------------------------
# The filters the deploy writes: found in its files, the same as the code's

def terraform_backlog_filter(bucket: str, prefix: str) -> str:
    block = re.search(r'resource "google_pubsub_subscription" "backlog" \{(.*?)\n\}', MAIN_TF.read_text(), re.S)
    assert block, "no backlog subscription in main.tf"
    text = re.search(r'^\s*filter\s*=\s*"(.*)"\s*$', block.group(1), re.M).group(1).replace('\\"', '"')
    return text.replace("${local.bucket_name}", bucket).replace("${var.pipeline_prefix}", prefix)


def create_sh_backlog_filter(bucket: str, prefix: str) -> str:
    """The filter line of create.sh, expanded by bash with these settings."""
    lines = [line.strip() for line in CREATE.read_text().splitlines() if line.strip().startswith("filter=")]
    assert len(lines) == 1, lines
    script = f'BUCKET={bucket}; PIPELINE_PREFIX={prefix}; {lines[0]}; printf %s "$filter"'
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout


def test_every_pubsub_filter_of_the_deploy_is_known_and_valid() -> None:
    """A Pub/Sub filter added to the deploy files (not the autoscaler's metric filter) must be checked here."""
    found = []
    for path in [*(ROOT / "deploy").rglob("*.tf"), *(ROOT / "deploy").rglob("*.sh"), *(ROOT / "clusters").rglob("*")]:
        found += [(path.name, line.strip()) for line in path.read_text().splitlines()
                  if "attributes." in line and "filter" in line and not line.strip().startswith("#")]
    assert [name for name, _ in found] == ["main.tf", "create.sh"], found
    for bucket, prefix in [("my-bucket", "pipeline"), ("b", "deep/er/prefix")]:
        wanted = backlog_filter([Location.parse(f"gs://{bucket}/{prefix}")])
        assert terraform_backlog_filter(bucket, prefix) == wanted
        assert create_sh_backlog_filter(bucket, prefix) == wanted
        compile_filter(wanted)


@pytest.mark.parametrize("paths", [
    ["gs://b/pipeline"], ["gs://b/pipeline", "gs://c/other/prefix"],
    [f"gs://bucket-number-{i}/some/rather/long/prefix-{i}" for i in range(4)],
    [f"gs://bucket-with-a-really-long-name-number-{i:03d}/p" for i in range(12)],
])
def test_filters_the_code_builds_are_valid_for_any_paths(paths: list[str]) -> None:
    locations = [Location.parse(path) for path in paths]
    for text in (subscription_filter(locations), backlog_filter(locations)):
        compile_filter(text)


# ---------------------------------------------------------------------------
# Against real notifications

@pytest.fixture
def backend() -> str:
    return "gcs"


def _record(bucket: Bucket, other: Bucket) -> list[dict[str, str]]:
    """Attributes of the messages the emulator delivers for one of each kind of event."""
    subscriber = pubsub_v1.SubscriberClient()
    path = subscriber.subscription_path(PROJECT, f"record-{uuid.uuid4().hex[:8]}")
    subscriber.create_subscription(request={"name": path, "topic": subscriber.topic_path(PROJECT, TOPIC)})
    try:
        bucket.upload("pipeline/a.config.yaml", "task: {}\n")
        bucket.upload("pipeline/a.config.yaml", "task: {name: changed}\n")
        bucket.upload("pipeline/a.done.yaml", "done\n")
        bucket.upload("_poltergust/logs/a/node-a.log", "a log line\n")
        bucket.delete("pipeline/a.config.yaml")
        other.upload("pipeline/b.config.yaml", "task: {}\n")
        events = PubSubEvents(PROJECT, TOPIC, "unused", [Location.parse(bucket.url("pipeline"))])
        asyncio.run(events.call_for_help(f"gs://{bucket.name}", "pipeline/a.config.yaml", 7, 2, 1))
        seen: list[dict[str, str]] = []
        ours = {bucket.name, other.name}

        def pulled_all() -> bool:
            response = subscriber.pull(request={"subscription": path, "max_messages": 100}, timeout=30)
            if response.received_messages:
                subscriber.acknowledge(request={"subscription": path,
                                                "ack_ids": [m.ack_id for m in response.received_messages]})
            seen.extend(dict(m.message.attributes) for m in response.received_messages
                        if m.message.attributes.get("bucketId") in ours)
            return len({label(a, bucket.name) for a in seen}) == 6

        try:
            wait_for(pulled_all, 60, "one message of each kind")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; seen: {sorted({label(a, bucket.name) for a in seen})}") from None
        return seen
    finally:
        subscriber.delete_subscription(request={"subscription": path})
        subscriber.close()


def label(attributes: dict[str, str], bucket: str) -> str:
    name, event = attributes.get("objectId", ""), attributes.get("eventType", "")
    if attributes.get("bucketId") != bucket:
        return "other bucket"
    if event == "POLTERGUST_HELP":
        return "help"
    kind = "config" if name.endswith(".config.yaml") else "result" if name.startswith("pipeline/") else "log"
    return f"{kind} {event}"


def received(text: str, messages: list[dict[str, str]], bucket: str) -> set[str]:
    return {label(a, bucket) for a in messages if passes(text, a)}


def check_backlog(text: str, messages: list[dict[str, str]], bucket: str) -> None:
    """Config uploads only; result uploads under the prefix pass too (no suffix match in Pub/Sub), and are acked."""
    assert received(text, messages, bucket) == {"config OBJECT_FINALIZE", "result OBJECT_FINALIZE"}


def test_each_subscription_receives_what_it_should(bucket: Bucket, gcs, tmp_path: Path) -> None:
    other = Bucket(gcs, f"other-{uuid.uuid4().hex[:12]}")
    messages = _record(bucket, other)
    assert {label(a, bucket.name) for a in messages} == {
        "config OBJECT_FINALIZE", "config OBJECT_DELETE", "result OBJECT_FINALIZE", "log OBJECT_FINALIZE", "help",
        "other bucket"}
    location = [Location.parse(bucket.url("pipeline"))]
    # A node hears uploads, deletes (cancel) and calls for help of its prefix, nothing of other buckets.
    assert received(subscription_filter(location), messages, bucket.name) == {
        "config OBJECT_FINALIZE", "config OBJECT_DELETE", "result OBJECT_FINALIZE", "help"}
    for text in (backlog_filter(location), terraform_backlog_filter(bucket.name, "pipeline"),
                 create_sh_backlog_filter(bucket.name, "pipeline")):
        check_backlog(text, messages, bucket.name)
    # Broken on purpose: the old backlog filter lets deletes and calls for help in.
    with pytest.raises(AssertionError):
        check_backlog(OLD_BACKLOG.format(bucket=bucket.name, prefix="pipeline"), messages, bucket.name)
