"""The pieces under the dashboard: narrow listings on both backends, heartbeats, log summaries, charts."""
from __future__ import annotations

import asyncio
import os
import types
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from poltergust import layout
from poltergust.dashboard import charts
from poltergust.dashboard.details import summarise
from poltergust.dashboard.pipelines import group
from poltergust.node import heartbeat
from poltergust.storage import GcsStore
from poltergust.storage.local import LocalStore

OBJECTS = ["pipeline/a.config.yaml", "pipeline/a.done.yaml", "pipeline/b.error.yaml", "pipeline/notes.txt",
           "pipeline/sub/c.config.yaml", "_poltergust/logs/pipeline/a/1/n.log.txt", "pipelines/x.config.yaml"]


async def _narrow(store) -> tuple[list[str], list[str]]:
    narrow = await store.list("pipeline/", glob="*.yaml")
    everything = await store.list("pipeline/", recursive=True)
    return [info.name for info in narrow], [info.name for info in everything]


EXPECTED = (["pipeline/a.config.yaml", "pipeline/a.done.yaml", "pipeline/b.error.yaml"],
            ["pipeline/a.config.yaml", "pipeline/a.done.yaml", "pipeline/b.error.yaml", "pipeline/notes.txt",
             "pipeline/sub/c.config.yaml"])


def test_local_listing_is_narrow_or_recursive_as_on_gcs(tmp_path: Path) -> None:
    for name in OBJECTS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "pipeline" / ".poltergust").mkdir()
    (tmp_path / "pipeline" / ".poltergust" / "hidden.yaml").write_text("x")
    assert asyncio.run(_narrow(LocalStore(tmp_path))) == EXPECTED


def test_gcs_listing_is_narrow_on_the_emulator(gcs, monkeypatch: pytest.MonkeyPatch) -> None:
    from harness import Bucket

    bucket = Bucket(gcs, "narrow-listing")
    for name in OBJECTS:
        bucket.upload(name, "x")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)

    async def run() -> tuple[list[str], list[str]]:
        store = GcsStore(bucket.name, retry_for=5)
        try:
            return await _narrow(store)
        finally:
            await store.close()

    assert asyncio.run(run()) == EXPECTED


def test_heartbeat_round_trip_and_status(tmp_path: Path) -> None:
    class Settings:
        locations = [layout.Location.parse(str(tmp_path / "bucket" / "pipeline"))]
        node_name = "node/with slash"
        data_dir = env_dir = tmp_path
        max_concurrent = 3
        heartbeat_interval = 2.0

    (tmp_path / "abc123").mkdir()
    (tmp_path / ".locks").mkdir()
    started = datetime.now(timezone.utc) - timedelta(hours=1)
    beat = heartbeat.snapshot(Settings, started, [("file:///b", "pipeline/x.config.yaml", 7)], ready=True)
    back = heartbeat.Heartbeat.from_json(beat.to_json())
    assert back == beat
    assert back.environments_cached == 1 and back.runs == [{"pipeline": "file:///b/pipeline/x.config.yaml",
                                                            "generation": 7}]
    assert back.status(beat.written + timedelta(seconds=5)) == "alive"
    assert back.status(beat.written + timedelta(seconds=7)) == "gone"
    assert layout.heartbeat_name(Settings.node_name).startswith("_poltergust/nodes/node_with_slash")
    for bad in (b"[]", b"{}", b"not json", b'{"node": "n", "version": 1, "started": 5}'):
        with pytest.raises(ValueError):
            heartbeat.Heartbeat.from_json(bad)


def _heartbeat_settings(tmp_path: Path, interval: float) -> types.SimpleNamespace:
    """What `heartbeat.beat` reads of a node's settings: one local bucket under `tmp_path`."""
    return types.SimpleNamespace(locations=[layout.Location.parse(str(tmp_path / "bucket" / "pipeline"))],
                                 node_name="n1", data_dir=tmp_path, env_dir=tmp_path, max_concurrent=1,
                                 heartbeat_interval=interval)


def test_a_node_writes_heartbeats_and_a_last_one_when_stopped(tmp_path: Path) -> None:
    settings = _heartbeat_settings(tmp_path, 0.05)
    store = LocalStore(tmp_path / "bucket")

    async def run() -> list[heartbeat.Heartbeat]:
        ready = asyncio.Event()
        task = asyncio.create_task(heartbeat.beat(settings, lambda bucket: store, lambda: [], ready))
        seen = []
        while len({beat.written for beat in seen}) < 3:
            await asyncio.sleep(0.02)
            found, problems = await heartbeat.read_heartbeats({"local": store})
            assert problems == []
            seen.extend(found)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return (await heartbeat.read_heartbeats({"local": store}))[0]

    final = asyncio.run(run())
    assert [beat.node for beat in final] == ["n1"] and final[0].stopped is not None
    assert final[0].status(datetime.now(timezone.utc)) == "stopped"


def test_the_stopped_heartbeat_is_the_last_one_written(tmp_path: Path) -> None:
    """A heartbeat write cut short by the stop still lands (a thread, a request already sent): the node's last
    word, that it stopped, must be written after it, not be overwritten by it."""
    settings = _heartbeat_settings(tmp_path, 3600.0)
    store = LocalStore(tmp_path / "bucket")

    async def run() -> list[heartbeat.Heartbeat]:
        gate, started = asyncio.Event(), asyncio.Event()
        landing: list[asyncio.Future[object]] = []

        class Slow:
            async def write(self, name: str, data: bytes, **options: object) -> object:
                first = not landing

                async def land() -> object:
                    if first:  # the periodic write, cut short by the stop, lands once the gate opens
                        started.set()
                        await gate.wait()
                    return await store.write(name, data, **options)  # type: ignore[arg-type]

                landing.append(asyncio.ensure_future(land()))
                return await asyncio.shield(landing[-1])

        task = asyncio.create_task(heartbeat.beat(settings, lambda bucket: Slow(), lambda: [], asyncio.Event()))
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        await asyncio.sleep(0)
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.gather(*landing)
        return (await heartbeat.read_heartbeats({"local": store}))[0]

    final = asyncio.run(run())
    assert final[0].stopped is not None, "the periodic heartbeat landed after the stopped one"


def test_log_summary_tells_how_a_node_part_ended() -> None:
    text = ("[poltergust 2024-05-01 10:00:00Z] node a starts x generation 1\nluigi says hi\n"
            "[poltergust 2024-05-01 10:00:09Z] finished locally: error: a luigi task failed\n"
            "[poltergust 2024-05-01 10:00:09Z] claimed the run; writing x.error.yaml\n")
    assert summarise(text) == (datetime(2024, 5, 1, 10, tzinfo=timezone.utc), "error", True)
    assert summarise("no stamp\n") == (None, None, False)
    stopped = text.replace("claimed the run", "run stopped on this node (shutdown)")
    assert summarise(stopped)[1:] == ("stopped", False)


def test_charts_count_finished_runs_and_pickup_by_hour(tmp_path: Path) -> None:
    now = datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc)
    store = LocalStore(tmp_path)
    objects = []
    for name, minutes in [("a.done.yaml", 10), ("b.error.yaml", 20), ("c.done.yaml", 70), ("d.done.yaml", 60 * 30)]:
        path = tmp_path / "pipeline" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text("x")
        stamp = (now - timedelta(minutes=minutes)).timestamp()
        os.utime(path, (stamp, stamp))
        objects.append(asyncio.run(store.stat(f"pipeline/{name}")))
    pipelines = group(0, "b", "pipeline/", objects)
    per_hour = charts.finished_per_hour(pipelines, now)
    assert len(per_hour) == charts.HOURS and per_hour[-1].values == (1, 1) and per_hour[-2].values == (1, 0)
    assert sum(sum(hour.values) for hour in per_hour) == 3, "a run older than a day is left out"
    for pipeline in pipelines:
        pipeline.section = {"submitted": (pipeline.updated - timedelta(seconds=30)).isoformat(),
                            "started": (pipeline.updated - timedelta(seconds=28)).isoformat()}
    pickup = charts.pickup_per_hour(charts.recent_finished(pipelines, now), now)
    assert pickup[-1].values == (2.0,) and pickup[-1].mark == 2.0
    svg = charts.svg(per_hour, "Finished", ("done", "error"))
    assert svg.startswith("<svg") and svg.count('class="done"') == 2 and svg.count('class="error"') == 1
