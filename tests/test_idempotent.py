"""Conditional writes whose answer is lost: each write path of a run goes on as the winner of its own write.

`GcsStore` runs against an in-memory GCS (its client calls, as gcloud-aio
makes them) that carries out a chosen request and then loses its answer: a
503, a reset connection or a timeout, after which the store retries and meets
its own write (412) or delete (404). The same stack behind the emulator is in
`test_faults`.
"""
from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from poltergust.layout import RunKey, run_marker
from poltergust.run import membership
from poltergust.run.claim import OUTCOME_KEY, Finish, Result, claim, claim_marker, complete
from poltergust.run.log import RunLog
from poltergust.storage import GcsStore, LocalStore, NotFound, PreconditionFailed
from poltergust.storage.base import TOKEN_KEY

CONFIG = "pipeline/p.config.yaml"
KEY = RunKey("gs://bucket", CONFIG, 1)
START = run_marker(CONFIG, 1, "start")


def _answer(status: int, name: str) -> aiohttp.ClientResponseError:
    url = URL(f"http://gcs/b/bucket/o/{name}")
    info = aiohttp.RequestInfo(url, "POST", CIMultiDictProxy(CIMultiDict()), url)
    return aiohttp.ClientResponseError(info, (), status=status, message=f"HTTP {status}")


LOSSES: dict[str, Callable[[str], Exception]] = {
    "503": lambda name: _answer(503, name),
    "reset": lambda name: aiohttp.ServerDisconnectedError(),
    "timeout": lambda name: asyncio.TimeoutError(),
}


class LosingGcs:
    """The calls `GcsStore` makes of gcloud-aio, on objects in memory; loses the answer to chosen requests.

    `lose(operation, name)` is asked after each upload or delete took effect;
    `refuse(operation, name)` before, to fail a request that never took effect.
    """

    def __init__(self, loss: str = "503") -> None:
        self.objects: dict[str, tuple[dict[str, Any], bytes]] = {}
        self.generation = 1000
        self.loss = LOSSES[loss]
        self.lose: Callable[[str, str], bool] = lambda operation, name: False
        self.refuse: Callable[[str, str], bool] = lambda operation, name: False
        self.lost = 0
        self.stats = 0

    def put(self, name: str, data: bytes, metadata: dict[str, str] | None = None, age: float = 0.0) -> int:
        self.generation += 1
        updated = datetime.now(timezone.utc) - timedelta(seconds=age)
        self.objects[name] = ({"name": name, "generation": str(self.generation), "updated": updated.isoformat(),
                               "metadata": dict(metadata or {}), "size": str(len(data))}, data)
        return self.generation

    def _current(self, name: str) -> int:
        return int(self.objects[name][0]["generation"]) if name in self.objects else 0

    def _after(self, operation: str, name: str) -> None:
        if self.lose(operation, name):
            self.lost += 1
            raise self.loss(name)

    async def upload(self, bucket: str, name: str, data: bytes, *, content_type: str, parameters: dict[str, str],
                     metadata: dict[str, Any], force_resumable_upload: bool) -> dict[str, Any]:
        if self.refuse("upload", name):
            raise _answer(503, name)
        match = parameters.get("ifGenerationMatch")
        if match is not None and int(match) != self._current(name):
            raise _answer(412, name)
        self.put(name, data, metadata["metadata"])
        self._after("upload", name)
        return self.objects[name][0]

    async def delete(self, bucket: str, name: str, *, params: dict[str, str]) -> None:
        if name not in self.objects:
            raise _answer(404, name)
        if "ifGenerationMatch" in params and int(params["ifGenerationMatch"]) != self._current(name):
            raise _answer(412, name)
        del self.objects[name]
        self._after("delete", name)

    async def download_metadata(self, bucket: str, name: str) -> dict[str, Any]:
        self.stats += 1
        if name not in self.objects:
            raise _answer(404, name)
        return self.objects[name][0]

    async def _download(self, bucket: str, name: str, *, params: dict[str, str]) -> bytes:
        if name not in self.objects:
            raise _answer(404, name)
        resource, data = self.objects[name]
        return json.dumps(resource).encode() if params.get("alt") == "json" else data


def _once(operation: str, name: str) -> Callable[[str, str], bool]:
    """Selects the first `operation` on `name`, and nothing else."""
    seen: list[bool] = []

    def select(op: str, on: str) -> bool:
        if seen or (op, on) != (operation, name):
            return False
        seen.append(True)
        return True

    return select


@pytest.fixture(params=sorted(LOSSES))
async def gcs(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    fake = LosingGcs(request.param)
    store = GcsStore("bucket", retry_for=10)
    store._client = fake  # type: ignore[assignment]
    try:
        yield store, fake
    finally:
        await store.close()


async def test_a_start_marker_whose_answer_was_lost_is_this_nodes_start(gcs) -> None:
    store, fake = gcs
    fake.lose = _once("upload", START)
    marker = await membership.take_start(store, KEY, "node-a")
    assert fake.lost == 1
    assert marker is not None and marker.generation == fake._current(START)


async def test_a_start_refresh_whose_answer_was_lost_keeps_the_run(gcs) -> None:
    store, fake = gcs
    marker = await membership.take_start(store, KEY, "node-a")
    fake.lose = _once("upload", START)
    refreshed = await membership.refresh_start(store, KEY, "node-a", marker)
    assert fake.lost == 1
    assert refreshed is not None and refreshed.generation == fake._current(START) != marker.generation


async def test_a_take_over_whose_answer_was_lost_is_this_nodes(gcs) -> None:
    store, fake = gcs
    fake.put(START, b"dead-node", age=600)
    fake.lose = _once("upload", START)
    marker = await membership.take_over_if_stale(store, KEY, "node-b", stale_after=180)
    assert fake.lost == 1
    assert marker is not None and fake.objects[START][1] == b"node-b"


async def test_a_helper_place_whose_answer_was_lost_is_this_nodes(gcs) -> None:
    store, fake = gcs
    fake.lose = lambda operation, name: operation == "upload" and "/helper-1-" in name and not fake.lost
    assert await membership.take_helper_place(store, KEY, "node-b", 1, 1)
    assert fake.lost == 1


async def test_a_claim_whose_answer_was_lost_is_this_nodes_and_completes(gcs) -> None:
    store, fake = gcs
    generation = fake.put(CONFIG, b"task: {}\n")
    key = RunKey("gs://bucket", CONFIG, generation)
    fake.lose = _once("upload", claim_marker(key))
    claimed = await claim(store, key, b"claimed", "done", "node-a")
    assert fake.lost == 1
    assert claimed is not None and claimed.metadata[OUTCOME_KEY] == "done"
    assert await claim(store, key, b"claimed", "done", "node-b") is None, "another node's claim still loses"
    assert fake._current(CONFIG) == generation, "the config is never rewritten"


async def test_a_config_removal_whose_answer_was_lost_is_this_nodes(gcs) -> None:
    store, fake = gcs
    key = RunKey("gs://bucket", CONFIG, fake.put(CONFIG, b"task: {}\n"))
    assert await claim(store, key, b"claimed", "done", "node-a") is not None
    fake.lose = _once("delete", CONFIG)
    assert await complete(store, key, "done", b"claimed")
    assert fake.lost == 1
    assert CONFIG not in fake.objects and "pipeline/p.done.yaml" in fake.objects


async def test_a_released_start_whose_answer_was_lost_is_released(gcs) -> None:
    store, fake = gcs
    marker = await membership.take_start(store, KEY, "node-a")
    fake.lose = _once("delete", START)
    await membership.release_start(store, marker)
    assert fake.lost == 1 and START not in fake.objects


@pytest.mark.parametrize("lost", ["claim", "result", "removal"])
async def test_the_winner_whose_answer_was_lost_reports_its_claim_and_never_a_lost_one(
    gcs, lost: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    store, fake = gcs
    key = RunKey("gs://bucket", CONFIG, fake.put(CONFIG, b"task: {}\n"))
    config = await store.read(CONFIG)
    fake.lose = {"claim": _once("upload", claim_marker(key)), "result": _once("upload", "pipeline/p.done.yaml"),
                 "removal": _once("delete", CONFIG)}[lost]
    sent: list[dict[str, Any]] = []
    notifier = type("Notifier", (), {"send": lambda self, message: sent.append(message)})()
    finish = Finish(key, store, "node-a", claim_grace=60, notifier=notifier)
    runlog = RunLog(tmp_path / "run.log")
    now = datetime.now(timezone.utc)
    with caplog.at_level(logging.INFO):
        await finish.finish(config, Result("done", "node-a", now, now, generation=key.generation), runlog.note)
    assert fake.lost == 1
    assert "claim lost" not in caplog.text
    assert "another node finished" not in runlog.read().decode()
    assert [message["outcome"] for message in sent] == ["done"]
    assert CONFIG not in fake.objects and "pipeline/p.done.yaml" in fake.objects


async def test_a_retry_that_meets_another_writers_object_still_loses(gcs) -> None:
    """The first attempt was refused before it took effect; meanwhile another node took the marker."""
    store, fake = gcs

    def refuse(operation: str, name: str) -> bool:
        if name == START and START not in fake.objects:
            fake.put(START, b"node-b", {TOKEN_KEY: "theirs"})
            return True
        return False

    fake.refuse = refuse
    assert await membership.take_start(store, KEY, "node-a") is None
    assert fake.objects[START][1] == b"node-b"


async def test_a_plain_412_or_404_is_an_answer_and_costs_no_read(gcs) -> None:
    store, fake = gcs
    fake.put(START, b"node-b")
    assert await membership.take_start(store, KEY, "node-a") is None
    assert fake.stats == 0, "a node that lost a race reads nothing more"
    with pytest.raises(NotFound):
        await store.delete("pipeline/absent.config.yaml", if_generation_match=1)


@pytest.mark.parametrize("backend", ["gcs", "local"])
async def test_every_conditional_write_carries_a_token_of_its_own(backend: str, tmp_path: Path) -> None:
    fake = LosingGcs()
    store = GcsStore("bucket", retry_for=1) if backend == "gcs" else LocalStore(tmp_path)
    if isinstance(store, GcsStore):
        store._client = fake  # type: ignore[assignment]
    async with store:
        first = await store.write("a", b"1", if_generation_match=0, metadata={"kept": "yes"})
        second = await store.write("a", b"2", if_generation_match=first.generation)
        plain = await store.write("b", b"3")
        with pytest.raises(PreconditionFailed):
            await store.write("a", b"4", if_generation_match=first.generation)
    assert first.metadata["kept"] == "yes"
    assert first.metadata[TOKEN_KEY] and second.metadata[TOKEN_KEY] and first.metadata[TOKEN_KEY] != second.metadata[
        TOKEN_KEY]
    assert TOKEN_KEY not in plain.metadata
