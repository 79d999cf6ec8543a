"""Hostile input: arbitrary YAML, odd object names, traversal attempts. Nothing crashes, nothing is lost."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
import yaml
from harness import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poltergust.config import ConfigError, parse_environment, parse_pipeline
from poltergust.events.pubsub import parse_notification
from poltergust.layout import Location
from poltergust.layout import safe_name as _safe
from poltergust.run.claim import Result, result_document

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=20)
config_like = st.fixed_dictionaries({}, optional={
    "environment": documents, "task": st.one_of(documents, st.fixed_dictionaries(
        {}, optional={"name": documents, "module": documents, "x": documents})),
    "variables": documents, "timeout": documents, "retries": documents})
RESULT = Result("error", "node", datetime.now(timezone.utc), datetime.now(timezone.utc), "why", "tail")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                 st.one_of(documents, config_like).map(lambda d: yaml.safe_dump(d).encode())))
def test_the_parsers_only_ever_raise_config_errors(data: bytes) -> None:
    for parse in (parse_pipeline, parse_environment):
        try:
            parse(data, "gs://b/pipeline/x.config.yaml")
        except ConfigError as error:
            assert str(error).startswith("gs://b/pipeline/x.config.yaml")
    document = yaml.safe_load(result_document(data, RESULT))
    assert document["poltergust"]["reason"] == "why"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60), st.text(max_size=12))
def test_odd_names_never_escape(name: str, generation: str) -> None:
    safe = _safe(name)
    assert "/" not in safe and "\0" not in safe and safe not in ("", ".", "..") and not safe.startswith(".")
    event = parse_notification({"eventType": "OBJECT_FINALIZE", "bucketId": "b", "objectId": name,
                                "objectGeneration": generation}, [Location.parse("gs://b/pipeline")])
    if event is not None:
        assert event.name.startswith("pipeline/") and "/" not in event.name[len("pipeline/"):]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), documents.map(lambda d: json.dumps(d).encode())))
def test_any_payload_is_at_most_a_hint_about_its_own_object(data: bytes) -> None:
    event = parse_notification({"eventType": "OBJECT_FINALIZE", "bucketId": "b", "objectId": "pipeline/x.config.yaml",
                                "objectGeneration": "5", "payloadFormat": "JSON_API_V1"},
                               [Location.parse("gs://b/pipeline")], data)
    assert event is not None and event.generation == 5
    assert event.info is None or (event.info.name, event.info.generation) == ("pipeline/x.config.yaml", 5)


names = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=40) \
    .filter(lambda n: not n.startswith(".") and len(n.encode()) < 200)


@pytest.mark.parametrize("backend", ["local", "gcs"], indirect=True)
def test_a_node_turns_arbitrary_configs_into_error_files(start_node, bucket, backend) -> None:
    node = start_node("node-a")
    seen: list[str] = []

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    @given(name=names, body=st.one_of(st.binary(max_size=200), config_like.map(lambda d: yaml.safe_dump(d).encode())))
    def submit_one(name: str, body: bytes) -> None:
        if name in seen:
            return
        seen.append(name)
        bucket.upload(f"pipeline/{name}.config.yaml", body)
        wait_for(lambda: bucket.exists(f"pipeline/{name}.error.yaml"), 60, f"{name!r} to end as an error")
        document = yaml.safe_load(bucket.read(f"pipeline/{name}.error.yaml"))
        assert document["poltergust"]["reason"]
        wait_for(lambda: not bucket.exists(f"pipeline/{name}.config.yaml"), 10, "the config to be moved")

    submit_one()
    node.check_alive()
    configs = [n for n in bucket.names("pipeline/") if n.endswith(".config.yaml")]
    assert configs == [] and len([n for n in bucket.names("pipeline/") if n.endswith(".error.yaml")]) == len(seen)
