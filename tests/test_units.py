"""Fast tests of the pure parts: config parsing, luigi arguments, notifications, the local store's claim."""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from unittest.mock import ANY

import pytest

from poltergust.config import ConfigError, parse_environment, parse_pipeline, resolve_reference
from poltergust.environments import Environments, plan
from poltergust.events.pubsub import parse_notification
from poltergust.layout import Location, RunKey, is_config_name, split_url
from poltergust.luigid.graph import Verdict
from poltergust.node.notify import Notifier
from poltergust.run import participation
from poltergust.run.command import Outcome, task_arguments
from poltergust.run.execute import Run, RunContext
from poltergust.run.log import RunLog
from poltergust.run.participation import Participation
from poltergust.secret_env import SecretEnv
from poltergust.settings import Settings
from poltergust.storage import Blob, ObjectInfo, PreconditionFailed, StorageError
from poltergust.storage.base import TOKEN_KEY
from poltergust.storage.local import LocalStore

SOURCE = "gs://b/pipeline/x.config.yaml"


def test_pipeline_config_is_parsed_and_relative_environments_resolve() -> None:
    config = parse_pipeline(b"environment: ../environment/e.yaml\ntask: {name: T, module: m, a-b: 1}\n"
                            b"variables: {N: 2}\n", SOURCE)
    assert config.environment == "gs://b/environment/e.yaml"
    assert config.task.arguments == {"a-b": 1}
    assert config.variables == {"N": "2"}
    assert resolve_reference("/../../etc/passwd", SOURCE) == "gs://b/etc/passwd"


@pytest.mark.parametrize("text, message", [
    (b"", "expected a mapping at the top level, got nothing"),
    (b"- a\n", "expected a mapping at the top level, got a list"),
    (b"task: {name: T, module: m}\n", "environment: required key is missing"),
    (b"environment: e\ntask: {module: m}\n", "task.name: required key is missing"),
    (b"environment: e\ntask: {name: T, module: m, --x: 1}\n", "task.--x: task arguments must be plain names"),
    (b"environment: e\ntask: {name: T, module: m}\nvariables: [a]\n", "variables: must be a mapping"),
    (b"\xff\xfe", "not UTF-8 text"),
])
def test_invalid_configs_name_file_and_key(text: bytes, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_pipeline(text, SOURCE)
    assert str(error.value).startswith(SOURCE + ": ")
    assert message in str(error.value)


def test_yaml_bombs_and_oversized_files_are_refused() -> None:
    bomb = b"a: &a [x,x,x,x,x,x,x,x,x,x]\n" + b"".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n".encode() for i in range(6))
    with pytest.raises(ConfigError, match="too complex"):
        parse_pipeline(bomb, SOURCE)
    with pytest.raises(ConfigError, match="the limit is"):
        parse_pipeline(b"#" * (300 * 1024), SOURCE)


def environment_key(spec) -> str:
    return plan.key(spec, plan.find_interpreter(spec, os.environ))


def test_environment_build_key_follows_content_not_variables() -> None:
    one = parse_environment(b"dependencies: [luigi]\nvariables: {A: 1}\n", "gs://b/e1.yaml")
    two = parse_environment(b"dependencies: [luigi]\nvariables: {A: 2}\n", "gs://b/e2.yaml")
    three = parse_environment(b"dependencies: [luigi, pandas]\n", "gs://b/e1.yaml")
    assert environment_key(one) == environment_key(two) != environment_key(three)
    with pytest.raises(ConfigError, match=r"dependencies\[0\]: cannot be split"):
        parse_environment(b"dependencies: ['pkg \"unclosed']\n", "e.yaml")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_environment(b"dependency: [luigi]\n", "e.yaml")


def test_task_arguments_become_luigi_options() -> None:
    assert task_arguments({"date-interval": "2012-06", "flag": True, "off": False, "none": None,
                           "n": 3, "items": [1, 2]}) == [
        "--date-interval", "2012-06", "--flag", "--n", "3", "--items", "[1, 2]"]


def test_notifications_are_filtered_to_our_configs() -> None:
    locations = [Location.parse("gs://b/pipeline")]
    attributes = {"eventType": "OBJECT_DELETE", "bucketId": "b", "objectId": "pipeline/x.config.yaml",
                  "objectGeneration": "5", "overwrittenByGeneration": "6"}
    event = parse_notification(attributes, locations)
    assert event is not None and (event.kind, event.generation, event.replaced_by) == ("delete", 5, 6)
    for changed in ({"bucketId": "other"}, {"objectId": "pipeline/x.done.yaml"},
                    {"objectId": "pipeline/sub/x.config.yaml"}, {"eventType": "OBJECT_METADATA_UPDATE"},
                    {"objectGeneration": "nope"}):
        assert parse_notification({**attributes, **changed}, locations) is None
    assert not is_config_name("pipeline/.config.yaml", "pipeline/")


def test_an_uploads_payload_describes_its_config_only_if_it_names_the_same_generation() -> None:
    """A JSON_API_V1 payload (the object resource) spares a node the config's metadata request; it is a hint."""
    locations = [Location.parse("gs://b/pipeline")]
    attributes = {"eventType": "OBJECT_FINALIZE", "bucketId": "b", "objectId": "pipeline/x.config.yaml",
                  "objectGeneration": "5", "payloadFormat": "JSON_API_V1"}
    resource = {"name": "pipeline/x.config.yaml", "generation": "5", "size": "42",
                "updated": "2026-12-04T04:51:15.696Z", "metadata": {"k": "v"}}

    def info(data: bytes, **changed: str):
        event = parse_notification({**attributes, **changed}, locations, data)
        assert event is not None and event.kind == "finalize" and event.generation == 5
        return event.info

    described = info(json.dumps(resource).encode())
    assert described is not None and (described.name, described.generation, described.size) == (
        "pipeline/x.config.yaml", 5, 42)
    assert described.updated.isoformat() == "2026-12-04T04:51:15.696000+00:00"
    for payload in ({**resource, "generation": "4"}, {**resource, "name": "pipeline/y.config.yaml"}, ["x"], {}):
        assert info(json.dumps(payload).encode()) is None, payload
    assert info(b"not json") is None and info(b"") is None
    assert info(json.dumps(resource).encode(), payloadFormat="NONE") is None


def test_locations_and_urls(tmp_path: Path) -> None:
    assert Location.parse("gs://b/pipeline/") == Location("gs://b", "pipeline/")
    local = Location.parse(str(tmp_path / "pipeline"))
    assert local == Location(f"file://{tmp_path}", "pipeline/")
    assert Location.parse(f"file://{tmp_path}/pipeline") == local
    assert split_url(f"file://{tmp_path}/environment/e.yaml") == (f"file://{tmp_path}/environment", "e.yaml")
    with pytest.raises(ValueError):
        Location.parse("s3://b/pipeline")


def _claim(root: str, generation: int, node: str, queue: multiprocessing.Queue) -> None:
    store = LocalStore(Path(root))
    try:
        asyncio.run(store.write("pipeline/x.config.yaml", node.encode(), if_generation_match=generation,
                                metadata={"node": node}))
        queue.put(node)
    except PreconditionFailed:
        queue.put("412")


def test_local_claim_is_exclusive_across_processes(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    info = asyncio.run(store.write("pipeline/x.config.yaml", b"config"))
    queue: multiprocessing.Queue = multiprocessing.Queue()
    racers = [multiprocessing.Process(target=_claim, args=(str(tmp_path), info.generation, f"n{i}", queue))
              for i in range(8)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(30)
    outcomes = sorted(queue.get(timeout=5) for _ in racers)
    assert outcomes.count("412") == 7
    winner = next(o for o in outcomes if o != "412")
    blob = asyncio.run(store.read("pipeline/x.config.yaml"))
    assert blob.data == winner.encode() and blob.info.metadata == {"node": winner, TOKEN_KEY: ANY}
    assert blob.info.generation > info.generation
    with pytest.raises(PreconditionFailed):
        asyncio.run(store.delete("pipeline/x.config.yaml", if_generation_match=info.generation))


async def test_a_storage_error_reading_the_environment_file_is_masked_in_the_reason(tmp_path: Path) -> None:
    """The reason goes to the error file: a secret the run knows must not reach it through a storage error."""
    secret = "tok-" + os.urandom(8).hex()

    class Unreadable:
        async def read(self, name: str, generation: int | None = None, **options: object):
            raise StorageError(f"HTTP 403: credentials {secret} were refused")

    settings = Settings(locations=[Location.parse("gs://b/pipeline")], scheduler_url="http://127.0.0.1:1",
                        node_name="n", data_dir=tmp_path, env_dir=tmp_path / "envs")
    context = RunContext(settings, lambda bucket: Unreadable(), Environments(tmp_path / "envs"),  # type: ignore
                         Notifier(None), SecretEnv({}), asyncio.Semaphore(1), lambda *call: None)
    run = Run(RunKey("gs://b", "pipeline/x.config.yaml", 1), context)
    config = b"environment: gs://b/environment/e.yaml\ntask: {name: T, module: m}\n"
    runlog = RunLog(tmp_path / "run.log", [secret])
    outcome = await run._outcome(Blob(ObjectInfo("pipeline/x.config.yaml", 1, datetime.now(timezone.utc)), config),
                                 runlog)
    assert not outcome.ok
    assert outcome.reason == "cannot read the environment file gs://b/environment/e.yaml: HTTP 403: credentials " \
                             "**** were refused"


def test_an_archived_config_is_treated_as_deleted() -> None:
    """In a versioned bucket an overwritten or deleted config is archived: the run of that generation stops."""
    locations = [Location.parse("gs://b/pipeline")]
    event = parse_notification({"eventType": "OBJECT_ARCHIVE", "bucketId": "b", "objectId": "pipeline/x.config.yaml",
                                "objectGeneration": "7"}, locations)
    assert event is not None and (event.kind, event.generation) == ("delete", 7)


async def test_completing_a_stale_claim_notifies_once(tmp_path: Path) -> None:
    from datetime import datetime, timedelta, timezone

    from poltergust.run import claim as results

    sent: list[dict] = []

    class Recorder(Notifier):
        def send(self, payload) -> None:  # type: ignore[no-untyped-def]
            sent.append(dict(payload))

    store = LocalStore(tmp_path)
    config = await store.write("pipeline/x.config.yaml", b"environment: e.yaml\n")
    now = datetime.now(timezone.utc)
    result = results.Result("done", "node-dead", now - timedelta(seconds=5), now, generation=config.generation)
    key = RunKey(f"file://{tmp_path}", "pipeline/x.config.yaml", config.generation)
    await results.claim(store, key, results.result_document(b"environment: e.yaml\n", result), "done", "node-dead")
    settings = Settings(locations=[Location.parse(f"file://{tmp_path}/pipeline")], node_name="node-b",
                        data_dir=tmp_path / "data", env_dir=tmp_path / "envs", claim_grace=0)
    for _ in range(2):  # a second look finds the run already completed
        context = RunContext(settings, lambda bucket: store, Environments(tmp_path / "envs"), Recorder(None),
                             SecretEnv({}), asyncio.Semaphore(1), lambda *call: None)
        run = Run(key, context)
        await run.execute()
    assert (tmp_path / "pipeline" / "x.done.yaml").exists() and not (tmp_path / "pipeline" / "x.config.yaml").exists()
    assert [(p["outcome"], p["node"]) for p in sent] == [("done", "node-dead")]


async def test_a_failure_luigid_does_not_explain_is_a_failure_only_if_this_nodes_luigi_saw_it(tmp_path: Path) -> None:
    """luigid fails a task itself when it stops hearing from the worker running it (overloaded, it may not
    answer `fetch_error` either): a node takes part again unless its own luigi reported the failure."""
    runlog = RunLog(tmp_path / "run.log")
    for line in ("Traceback (most recent call last):", "ValueError: boom"):
        runlog.write(line)
    participation = Participation(["luigi"], env={}, cwd=tmp_path, runlog=runlog, outage_limit=1,
                                  scheduler_url="http://127.0.0.1:9")  # nothing answers there
    failed = Verdict("failed", failed=[("Part_1", "Part(index=1)")])
    try:
        assert await participation._outcome(failed) is None
        assert "luigid did not say why Part(index=1) failed; taking part again" in runlog.tail()
        participation.failed_here.add("Part_1")
        assert await participation._outcome(failed) == Outcome(False, "a luigi task failed: Part(index=1): "
                                                                      "ValueError: boom")
    finally:
        await participation.luigid.close()


async def test_a_starter_calls_for_help_as_soon_as_its_luigi_has_scheduled_the_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not at its next look at luigid, up to a second later: helpers start that much sooner. The free task its own
    worker is about to take is not offered; a graph of the root alone costs luigid no look at all."""
    monkeypatch.setattr(participation, "WATCH_SECONDS", 3600.0)  # only luigi's own lines wake the node
    for added, takeable, wanted in ((7, 6, [5]), (2, 1, []), (1, 1, None)):
        calls: list[int] = []
        looked, luigi_ends = asyncio.Event(), asyncio.Event()

        async def luigi(command: list[str], *, env: object, cwd: Path, sink: Callable[[str], None],
                        added: int = added) -> int:
            for task in ("Fan_1_abc", *(f"Part_{index}_abc" for index in range(added - 1))):
                sink(f"INFO: Informed scheduler that task   {task}   has status   PENDING")
            sink("INFO: Done scheduling tasks")
            await luigi_ends.wait()
            return 0

        async def verdict(takeable: int = takeable) -> Verdict:
            looked.set()
            return Verdict("busy", takeable=takeable)

        starter = Participation(["luigi"], env={}, cwd=tmp_path, runlog=RunLog(tmp_path / f"{added}.log"),
                                outage_limit=1, scheduler_url="http://127.0.0.1:9", recruit=calls.append,
                                start=luigi)  # type: ignore[arg-type]
        monkeypatch.setattr(starter, "_verdict", verdict)
        running = asyncio.ensure_future(starter._luigi_while_watching())
        if wanted is None:  # nothing to wait for: give the loop its chances to look, then end luigi
            for _ in range(20):
                await asyncio.sleep(0)
        else:
            await asyncio.wait_for(looked.wait(), 10)
        luigi_ends.set()
        assert await asyncio.wait_for(running, 10) == (0, None)
        await starter.luigid.close()
        assert calls == (wanted or []) and looked.is_set() == (wanted is not None), (added, calls)


async def test_a_helper_whose_luigi_ran_the_root_task_ends_its_part_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An assistant never exits by itself: once it reported the root task DONE, its node asks luigid at once and
    stops it, instead of at its next look, so that the pipeline's result is written that much sooner. As after
    luigi's own exit 0, the root's complete() is not checked again."""
    monkeypatch.setattr(participation, "WATCH_SECONDS", 3600.0)  # only luigi's own lines wake the node
    stopped = asyncio.Event()
    started: list[list[str]] = []

    async def luigi(command: list[str], *, env: object, cwd: Path, sink: Callable[[str], None]) -> int:
        started.append(command)
        sink("poltergust assistant of root task Fan_1_abc")
        sink("INFO: Informed scheduler that task   Fan_1_abc   has status   DONE")
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()
        return 0

    async def verdict() -> Verdict:
        return Verdict("done")

    helper = Participation(["luigi"], env={}, cwd=tmp_path, runlog=RunLog(tmp_path / "run.log"), outage_limit=1,
                           scheduler_url="http://127.0.0.1:9", assistant=True, start=luigi,  # type: ignore[arg-type]
                           confirm=["check-complete"])
    monkeypatch.setattr(helper, "_verdict", verdict)
    try:
        assert await asyncio.wait_for(helper._luigi_while_watching(), 10) == (None, Verdict("done"))
        assert await helper._outcome(Verdict("done")) == Outcome(True)
    finally:
        await helper.luigid.close()
    assert stopped.is_set() and started == [["luigi"]]


async def test_a_scheduler_urls_password_reaches_neither_the_run_log_nor_the_reason(tmp_path: Path) -> None:
    runlog = RunLog(tmp_path / "run.log")
    outcome = await Participation(["luigi"], env={}, cwd=tmp_path, runlog=runlog, outage_limit=1,
                                  scheduler_url="http://ops:hunter2secret@127.0.0.1:9").run()
    assert outcome.reason.startswith("the luigi scheduler at http://****@127.0.0.1:9 was unreachable"), outcome.reason
    assert "unreachable; waiting" in runlog.tail() and "hunter2secret" not in runlog.tail() + outcome.reason
