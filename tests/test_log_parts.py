"""Run logs in parts: a refresh uploads only the part that grew, and every reader shows the log whole.

A bucket's soft delete keeps every overwritten object for days, so a log
rewritten whole every refresh would cost its size again each time.
"""
from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Mapping

import pytest
from harness import poltergust, result, submit, wait_for

from poltergust import layout
from poltergust.dashboard.details import MAX_SHOWN, DetailsReader
from poltergust.run.log import LogMirror, RunLog
from poltergust.run.log_index import PART_SIZE, log_parts, node_logs, part_name, read_log
from poltergust.storage import LocalStore, ObjectInfo, open_store

CONFIG = "pipeline/long.config.yaml"
NAME = layout.log_name(CONFIG, 7, "node-a")


class CountingStore(LocalStore):
    """A local bucket that records every write: (object name, bytes)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writes: list[tuple[str, int]] = []

    async def write(self, name: str, data: bytes, *, if_generation_match: int | None = None,
                    metadata: Mapping[str, str] | None = None, content_type: str = "text/plain") -> ObjectInfo:
        self.writes.append((name, len(data)))
        return await super().write(name, data, if_generation_match=if_generation_match, metadata=metadata,
                                   content_type=content_type)


def _fill(runlog: RunLog, lines: range) -> None:
    for number in lines:
        runlog.write(f"line {number:07d} " + "x" * 80)


async def test_a_refresh_uploads_only_the_part_that_grew_and_readers_join_the_parts(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "bucket")
    runlog = RunLog(tmp_path / "run.log")
    mirror = LogMirror(runlog, store, NAME, interval=30)
    await mirror.upload()
    assert store.writes == [(NAME, 0)], "an empty log shows at once that the run started here"
    _fill(runlog, range(0, 4000))  # 4000 lines of 94 bytes: one full part and some
    await mirror.upload()
    assert [name for name, _ in store.writes[1:]] == [NAME, part_name(NAME, 1)]
    first = await store.stat(NAME)
    assert first.size == PART_SIZE

    store.writes.clear()
    _fill(runlog, range(4000, 4100))
    await mirror.upload()
    await mirror.upload()  # nothing new: nothing written
    assert store.writes == [(part_name(NAME, 1), len(runlog.read()) - PART_SIZE)]
    assert (await store.stat(NAME)).generation == first.generation, "a full part is never written again"

    _fill(runlog, range(4100, 6000))  # the second part fills up and a third begins
    await mirror.upload()
    logs = await node_logs(store, CONFIG)
    assert [(log.node, log.generation, len(log.parts)) for log in logs] == [("node-a", 7, 3)]
    assert await read_log(store, logs[0].parts) == runlog.read()
    assert await read_log(store, logs[0].parts, 300_000) == runlog.read()[300_000:]
    assert await read_log(store, await log_parts(store, NAME), PART_SIZE * 2 + 5) == runlog.read()[PART_SIZE * 2 + 5:]
    assert sum(part.size for part in logs[0].parts) == len(runlog.read())


async def test_the_dashboard_shows_a_long_logs_tail_from_a_line_start_and_where_it_ends(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "bucket")
    runlog = RunLog(tmp_path / "run.log")
    _fill(runlog, range(0, 7000))  # more than MAX_SHOWN, in three parts
    await LogMirror(runlog, store, NAME, interval=30).upload()
    whole = runlog.read()
    logs = await node_logs(store, CONFIG)
    text, end = await DetailsReader({})._text(store, logs[0].parts)
    assert end == len(whole)
    assert whole.decode().endswith(text) and text.startswith("line ") and len(text) <= MAX_SHOWN
    assert len(text) > MAX_SHOWN - 100, "the whole tail, up to one line"


CHATTY_LINES = 20_000


@pytest.mark.parametrize("backend", ["gcs"], indirect=True)
def test_a_log_longer_than_a_part_is_refreshed_by_its_last_part_and_read_whole(
    start_node, bucket, environment_yaml: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    start_node("node-a", "--log-upload-interval", "1")
    generation = submit(bucket, "chatty", {"name": "Chatty", "module": "poltergust_testpipes",
                                           "out-dir": str(tmp_path / "chatty"), "seconds": CHATTY_LINES * 0.0005,
                                           "interval": 0.0005}, environment_yaml)
    first = layout.log_name("pipeline/chatty.config.yaml", generation, "node-a")
    second = part_name(first, 1)
    wait_for(lambda: bucket.exists(second), 120, "the log's second part")
    before = {name: bucket.stat(name)["generation"] for name in (first, second)}
    result(bucket, "chatty", "done")
    whole = wait_for(lambda: b"claimed the run" in _joined(bucket, first) and _joined(bucket, first), 30,
                     "the log's last upload")
    after = {name: bucket.stat(name)["generation"] for name in (first, second)}
    assert after[first] == before[first], "the full first part was not uploaded again"
    assert after[second] != before[second], "refreshes rewrote the part that grew"
    assert _chatty_lines(whole.decode()) == list(range(CHATTY_LINES))

    env = dict(os.environ, STORAGE_EMULATOR_HOST=bucket.gcs.url)
    shown = poltergust("logs", "chatty", "--path", bucket.url("pipeline"), env=env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == whole.decode(), "the whole log, joined from its parts"

    async def dashboard() -> tuple[str, int]:
        location = layout.Location.parse(bucket.url("pipeline"))
        store = open_store(location.bucket)
        try:
            details = await DetailsReader({location.bucket: store}).read(0, location, "chatty", None)
        finally:
            await store.close()
        assert details is not None
        return details.logs["node-a"]

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", bucket.gcs.url)
    assert asyncio.run(dashboard()) == (whole.decode(), len(whole))


def _joined(bucket, first: str) -> bytes:
    """The log whose first part is `first`, its parts joined, read by plain HTTP."""
    parts = [first] + sorted(name for name in bucket.names(first) if name != first)
    return b"".join(bucket.read(name) or b"" for name in parts)


def _chatty_lines(text: str) -> list[int]:
    return [int(number) for number in re.findall(r"chatty line (\d+)", text)]
