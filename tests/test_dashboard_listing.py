"""The overview from listings alone: result objects carry their summary as metadata, the dashboard reads none.

Unit tests of the metadata round trip; a store-level test on the local
backend that the overview reads no result file written with a summary and
reads an older one once; and a real-stack test (a node on fake-gcs-server, the
dashboard as a user starts it, every storage request counted by a proxy).
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from harness import ROOT, GatedProxy, Server, free_port, http_ok, result, submit, wait_for

from poltergust.dashboard import charts
from poltergust.dashboard.pipelines import SNAPSHOT_SECONDS, PipelineList
from poltergust.layout import Location, RunKey
from poltergust.node.notify import Notifier
from poltergust.run import claim
from poltergust.run.summary import REASON_CHARS, document_summary, summary_from_metadata, summary_metadata
from poltergust.storage import Blob, ObjectInfo, ObjectStore, local
from poltergust.storage.local import LocalStore

NOW = datetime(2026, 5, 1, 12, 0, 30, 250000, tzinfo=timezone.utc)
CONFIG = b"environment: ../environment/e.yaml\ntask: {name: Report, module: reports}\n"


def run_result(outcome: str = "error", reason: str = "", node: str = "node-b") -> claim.Result:
    return claim.Result(outcome, node, NOW - timedelta(seconds=42.5), NOW, reason=reason, log_tail="tail\n" * 50,
                        generation=17, submitted=NOW - timedelta(seconds=43))


# -- the mapping ---------------------------------------------------------------------------------------------------



async def finish(store: ObjectStore, config: ObjectInfo, result: claim.Result) -> None:
    """Claim `config`'s run and write its result, as the node that ran it does."""
    key = RunKey("", config.name, config.generation)
    await claim.Finish(key, store, result.node, 60, Notifier(None)).finish(Blob(config, CONFIG), result)

def test_summary_round_trip_keeps_what_the_overview_shows() -> None:
    section = yaml.safe_load(claim.result_document(CONFIG, run_result(reason="a luigi task failed")))["poltergust"]
    metadata = summary_metadata(section)
    assert all(isinstance(value, str) for value in metadata.values())
    assert summary_from_metadata(metadata) == {
        "outcome": "error", "node": "node-b", "submitted": NOW - timedelta(seconds=43),
        "started": NOW - timedelta(seconds=42.5), "finished": NOW, "duration_seconds": 42.5,
        "reason": "a luigi task failed",
    }
    done = summary_from_metadata(summary_metadata({**section, "outcome": "done", "reason": ""}))
    assert done["outcome"] == "done" and "reason" not in done


def test_summary_keeps_one_bounded_printable_line_of_the_reason_unicode_included() -> None:
    def reason_of(text: str) -> str:
        return summary_from_metadata(summary_metadata({"outcome": "error", "reason": text}))["reason"]

    assert reason_of("\n  first line: ünïcødé ✓ 失败\nsecond line\r\nthird") == "first line: ünïcødé ✓ 失败"
    assert reason_of("tab\there\x1b[31m red") == "tabhere[31m red"
    long = reason_of("é" * 5000)
    assert len(long) == REASON_CHARS and long.endswith("…") and long.startswith("é" * 100)
    # What a node writes: the document's reason (already masked) has its whitespace folded into one line.
    folded = document_summary(claim.result_document(CONFIG, run_result(reason="boom\nTraceback:\n  x ✓")))
    assert summary_from_metadata(folded)["reason"] == "boom Traceback: x ✓"
    assert len(json.dumps(summary_metadata({"outcome": "error", "node": "n" * 5000, "reason": "😀" * 5000}),
                          ensure_ascii=False).encode()) < 8 * 1024, "within GCS's limit on custom metadata"


def test_no_or_broken_summary_means_read_the_file() -> None:
    assert summary_from_metadata({}) == {}
    assert summary_from_metadata({claim.OUTCOME_KEY: "done", claim.NODE_KEY: "n"}) == {}, "a claim is no summary"
    broken = summary_from_metadata({"poltergust-result-outcome": "done", "poltergust-result-started": "yesterday",
                                    "poltergust-result-duration": "long"})
    assert broken == {"outcome": "done", "node": "?"}
    assert summary_metadata({"outcome": "maybe"}) == {}
    assert document_summary(b"task: {name: T}\n") == {}
    assert document_summary(b"\npoltergust:\n  outcome: [unclosed\n") == {}


@pytest.mark.parametrize("config", [CONFIG, b"- not a mapping\n", CONFIG + b"poltergust: {outcome: done}\nz: 1\n"],
                         ids=["mapping", "not-a-mapping", "own-poltergust-key"])
def test_document_summary_of_every_result_document(config: bytes) -> None:
    result = run_result(reason="it failed")
    metadata = document_summary(claim.result_document(config, result))
    assert summary_from_metadata(metadata)["finished"] == NOW
    assert summary_from_metadata(metadata)["reason"] == "it failed"


def test_finish_and_a_completion_on_a_dead_nodes_behalf_both_write_the_summary(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)

    async def run() -> tuple[ObjectInfo, ObjectInfo]:
        config = await store.write("pipeline/a.config.yaml", CONFIG)
        await finish(store, config, run_result("done", node="node-a"))
        # A claim whose node died before writing the result: another node completes it from its marker alone.
        config = await store.write("pipeline/b.config.yaml", CONFIG)
        body = claim.result_document(CONFIG, run_result(reason="out of memory"))
        key = RunKey(f"file://{tmp_path}", config.name, config.generation)
        claimed = await claim.claim(store, key, body, "error", "node-dead")
        assert claimed is not None
        assert await claim.complete(store, key, "error", (await store.read(claimed.name)).data)
        return await store.stat("pipeline/a.done.yaml"), await store.stat("pipeline/b.error.yaml")

    done, error = asyncio.run(run())
    assert summary_from_metadata(done.metadata)["node"] == "node-a"
    assert summary_from_metadata(done.metadata)["duration_seconds"] == 42.5
    assert summary_from_metadata(error.metadata)["reason"] == "out of memory"
    assert summary_from_metadata(error.metadata)["node"] == "node-b", "the result's node, not the completer"


# -- the overview, local backend, store level ----------------------------------------------------------------------


class CountingStore:
    """A store that counts the objects read through it."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.reads: list[str] = []

    async def list(self, *args: Any, **kwargs: Any) -> list[ObjectInfo]:
        return await self.store.list(*args, **kwargs)

    async def read(self, name: str, *args: Any, **kwargs: Any) -> Blob:
        self.reads.append(name)
        return await self.store.read(name, *args, **kwargs)


def test_overview_reads_only_results_without_a_summary_and_those_once(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    now = datetime.now(timezone.utc)

    async def run() -> tuple[list[str], list[str], dict[str, dict[str, Any]]]:
        for index in range(30):
            result = claim.Result("error" if index % 3 == 0 else "done", f"node-{index % 2}",
                                  now - timedelta(seconds=60), now - timedelta(seconds=5), reason=f"failure {index}",
                                  submitted=now - timedelta(seconds=61))
            config = await store.write(f"pipeline/p{index:02d}.config.yaml", CONFIG)
            await finish(store, config, result)
        old = claim.result_document(CONFIG, run_result("done", node="node-old"))
        await store.write("pipeline/old.done.yaml", old)  # as written before summaries: no metadata
        counting = CountingStore(store)
        location = Location.parse(str(tmp_path / "pipeline"))
        pipelines = PipelineList([location], {location.bucket: counting})
        # What the overview asks for (app.overview): a page, and the latency chart's runs.
        page = await pipelines.page(None, "", 1, 50)
        await pipelines.read_sections(charts.unsummarised(charts.recent_finished(await pipelines.all(), now)))
        first = list(counting.reads)
        pipelines._snapshot = None  # the shared listing expired: list again
        page = await pipelines.page(None, "", 1, 50)
        await pipelines.read_sections(charts.unsummarised(charts.recent_finished(await pipelines.all(), now)))
        return first, counting.reads[len(first):], {p.name: p.section for p in page.rows}

    first, again, sections = asyncio.run(run())
    assert first == ["pipeline/old.done.yaml"], "only the result written without a summary is read"
    assert again == [], "and only once"
    assert sections["p03"]["reason"] == "failure 3" and sections["p04"]["node"] == "node-0"
    assert sections["old"]["node"] == "node-old"


# -- the real stack ---------------------------------------------------------------------------------------------


class DashboardProcess(Server):
    """`poltergust dashboard` as a user starts it; ready once it serves its styles (which read no bucket)."""

    def __init__(self, workdir: Path, path: str, env: dict[str, str]) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        super().__init__("dashboard", [sys.executable, "-m", "poltergust", "dashboard", "--path", path,
                                       "--port", self.url.rsplit(":", 1)[1]],
                         workdir / "dashboard.log", env=env, cwd=ROOT)
        self.wait_ready()

    def ready(self) -> bool:
        return http_ok(self.url + "/static/dashboard.css")


class Requests:
    """Every request that passes the proxy, as (kind, object name or listing prefix)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def note(self, method: str, path: str, body: bytes) -> bool:
        parsed = urllib.parse.urlsplit(path)
        query = urllib.parse.parse_qs(parsed.query)
        if parsed.path.endswith("/o") and method == "GET":
            entry = ("list", query.get("prefix", [""])[0])
        elif "/o/" in parsed.path:
            name = urllib.parse.unquote(parsed.path.split("/o/", 1)[1])
            entry = ("download" if query.get("alt") == ["media"] else f"{method.lower()} object", name)
        else:
            entry = (f"{method.lower()} other", parsed.path)
        with self._lock:
            self.seen.append(entry)
        return False  # never hold anything back: only count

    def since(self, mark: int) -> list[tuple[str, str]]:
        with self._lock:
            return self.seen[mark:]

    def mark(self) -> int:
        with self._lock:
            return len(self.seen)


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read().decode()


@pytest.mark.parametrize("backend", ["gcs"], indirect=True)
def test_overview_of_finished_pipelines_is_listings_only_on_the_emulator(
    start_node, bucket, environment_yaml: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two results written by a real node, `count` more by the same finishing code, one from before summaries.
    start_node("node-a")
    task = {"module": "poltergust_testpipes"}
    submit(bucket, "good", {**task, "name": "Touch", "out-dir": str(tmp_path / "good")}, environment_yaml)
    submit(bucket, "bad", {**task, "name": "Fail", "out-dir": str(tmp_path / "bad")}, environment_yaml)
    result(bucket, "good", "done")
    result(bucket, "bad", "error")
    stat = bucket.stat("pipeline/bad.error.yaml")
    assert stat is not None and summary_from_metadata(stat.get("metadata") or {})["node"] == "node-a"

    count = 20
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", bucket.gcs.url)

    async def finish_more() -> None:
        from poltergust.storage import GcsStore

        async with GcsStore(bucket.name, retry_for=10) as store:
            for index in range(count):
                config = await store.write(f"pipeline/more-{index:02d}.config.yaml", CONFIG)
                reason = f"täsk {index} failed ✓\nTraceback (most recent call last):"
                await finish(store, config, run_result("error" if index % 4 == 0 else "done",
                                                                           reason=reason, node="node-z"))

    asyncio.run(finish_more())
    bucket.upload("pipeline/old.done.yaml", claim.result_document(CONFIG, run_result("done", node="node-old")))

    requests = Requests()
    proxy = GatedProxy(bucket.gcs.url, requests.note)
    dashboard = DashboardProcess(tmp_path, bucket.url("pipeline"), dict(os.environ, STORAGE_EMULATOR_HOST=proxy.url))
    try:
        mark = requests.mark()
        page = get(dashboard.url + "/")
        cold = requests.since(mark)

        mark = requests.mark()

        def refresh() -> tuple[str, list[tuple[str, str]]] | None:
            body = get(dashboard.url + "/")
            made = requests.since(mark)  # the new listing is made in the background: count from the first refresh
            return (body, made) if ("list", "pipeline/") in made else None

        # The shared listing expires after SNAPSHOT_SECONDS: refresh until the overview lists again.
        page_again, warm = wait_for(refresh, 10 * SNAPSHOT_SECONDS + 30, "a refresh that lists again", 0.2)
    finally:
        dashboard.stop()
        proxy.close()

    errors = 1 + len(range(0, count, 4))
    assert f'data-count="error">{errors}<' in page and f'data-count="done">{count + 3 - errors}<' in page
    assert "täsk 0 failed ✓ Traceback (most recent call last):</span>" in page, "the reason, from the metadata"
    assert "on node-z" in page and "on node-old" in page
    # The nodes card reads each node's heartbeat (one object per node, not per pipeline); all else is listings.
    pipeline_requests = sorted(entry for entry in cold if not entry[1].startswith("_poltergust/nodes/"))
    assert pipeline_requests == [("download", "pipeline/old.done.yaml"), ("get object", "pipeline/old.done.yaml"),
                                 ("list", "pipeline/")], \
        "one listing of the pipelines, one read of the result without a summary, no other read"
    assert cold.count(("list", "_poltergust/nodes/")) == 1
    warm_pipelines = {entry for entry in warm if not entry[1].startswith("_poltergust/nodes/")}
    assert warm_pipelines == {("list", "pipeline/")}, \
        f"a refresh lists again and reads nothing (the old result's section is cached): {warm}"
    assert "on node-old" in page_again


class GatedStore(CountingStore):
    """Listings wait for `open`: a slow bucket."""

    def __init__(self, store: ObjectStore) -> None:
        super().__init__(store)
        self.open = asyncio.Event()
        self.open.set()
        self.lists = 0

    async def list(self, *args: Any, **kwargs: Any) -> list[ObjectInfo]:
        self.lists += 1
        await self.open.wait()
        return await self.store.list(*args, **kwargs)


def test_a_held_listing_is_shown_at_once_and_renewed_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A viewer never waits for a listing while the overview is watched; a change shows on a later refresh."""
    from poltergust.dashboard import pipelines as module

    store = LocalStore(tmp_path)
    clock = [1000.0]
    monkeypatch.setattr(module, "time", SimpleNamespace(monotonic=lambda: clock[0]))  # not the event loop's clock

    async def run() -> None:
        async def finished(name: str) -> None:
            config = await store.write(f"pipeline/{name}.config.yaml", CONFIG)
            await finish(store, config, run_result("done"))

        await finished("first")
        gated = GatedStore(store)
        location = Location.parse(str(tmp_path / "pipeline"))
        pipelines = PipelineList([location], {location.bucket: gated})
        first = await pipelines.page(None, "", 1, 50)
        assert [p.name for p in first.rows] == ["first"] and gated.lists == 1

        await finished("second")
        gated.open.clear()  # the bucket is slow from now on
        clock[0] += module.SNAPSHOT_SECONDS + 1
        held = await asyncio.wait_for(pipelines.page(None, "", 1, 50), 1)
        assert [p.name for p in held.rows] == ["first"] and held.listed == first.listed, "the held listing, at once"
        await wait_until(lambda: gated.lists == 2)
        assert [p.name for p in (await asyncio.wait_for(pipelines.all(), 1))] == ["first"], "one listing at a time"
        assert gated.lists == 2
        gated.open.set()
        await wait_until(lambda: len(pipelines._snapshot[2]) == 2)  # type: ignore[index]
        renewed = await pipelines.page(None, "", 1, 50)
        assert sorted(p.name for p in renewed.rows) == ["first", "second"] and renewed.listed > first.listed

        await finished("third")
        clock[0] += module.HELD_SECONDS + 1  # nobody watched for a minute: the page waits for a new listing
        gated.open.clear()
        waiting = asyncio.ensure_future(pipelines.page(None, "", 1, 50))
        await wait_until(lambda: gated.lists == 3)
        assert not waiting.done()
        gated.open.set()
        assert sorted(p.name for p in (await asyncio.wait_for(waiting, 5)).rows) == ["first", "second", "third"]
        await pipelines.close()

    asyncio.run(run())


async def wait_until(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_local_listing_reads_each_generations_metadata_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local backend keeps metadata in side files; a dashboard lists thousands of them every few seconds."""
    store = LocalStore(tmp_path)
    reads: list[str] = []
    read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self.name) or read_text(self, *a, **k))
    opened = local.open_no_follow  # side files are opened without following links; count the reads

    def open_no_follow(path: Path, flags: int = os.O_RDONLY, *rest: int) -> int:
        if flags == os.O_RDONLY:
            reads.append(Path(path).name)
        return opened(path, flags, *rest)

    monkeypatch.setattr(local, "open_no_follow", open_no_follow)

    async def run() -> list[list[ObjectInfo]]:
        await store.write("pipeline/a.done.yaml", b"x", metadata={"poltergust-result-outcome": "done"})
        listings = [await store.list("pipeline/"), await store.list("pipeline/")]
        await store.write("pipeline/a.done.yaml", b"y", metadata={"poltergust-result-outcome": "error"})
        listings.append(await store.list("pipeline/"))
        return listings

    first, second, rewritten = asyncio.run(run())
    assert first[0].metadata == second[0].metadata == {"poltergust-result-outcome": "done"}
    assert rewritten[0].metadata == {"poltergust-result-outcome": "error"}, "a new generation, its own metadata"
    side_files = [name for name in reads if name.endswith(".meta.json")]
    assert len(side_files) == 2, f"each generation's side file read once (by its write), by no listing: {side_files}"
