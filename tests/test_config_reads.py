"""A node reads a config it heard of with one storage request: the notification or the listing says its size.

GCS's JSON_API_V1 payload is the object resource, and a listing's items are
too: with the size in hand a node downloads the config at once instead of
asking for its metadata first. The size is a hint, as events are: a node
never reads more than one byte past what a config may have on its word.
"""
from __future__ import annotations

import json
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from harness import Proxy, result, submit, wait_for
from harness.proxy import kind

from poltergust.storage import GcsStore, ObjectInfo, TooLarge

NAME = "pipeline/p.config.yaml"


class _Stream:
    def __init__(self, data: bytes, served: list[int]) -> None:
        self._data, self._served = data, served

    async def __aenter__(self) -> _Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def read(self, size: int) -> bytes:
        chunk, self._data = self._data[:size], self._data[size:]
        self._served.append(len(chunk))
        return chunk


class _Client:
    """The two ways `GcsStore.read` asks gcloud-aio for an object, on one object in memory."""

    def __init__(self, data: bytes, generation: int = 7) -> None:
        self.data, self.generation = data, generation
        self.calls: list[str] = []
        self.served: list[int] = []

    async def _download(self, bucket: str, name: str, *, params: dict[str, str]) -> bytes:
        self.calls.append(params["alt"])
        resource = {"name": name, "generation": str(self.generation), "size": str(len(self.data))}
        return json.dumps(resource).encode() if params["alt"] == "json" else self.data

    async def _download_stream(self, bucket: str, name: str, *, params: dict[str, str]) -> _Stream:
        assert params == {"alt": "media", "generation": str(self.generation)}
        self.calls.append("stream")
        return _Stream(self.data, self.served)


def _store(client: _Client) -> GcsStore:
    store = GcsStore("bucket", retry_for=1)
    store._client = client  # type: ignore[assignment]
    return store


def _known(size: int, generation: int = 7) -> ObjectInfo:
    return ObjectInfo(NAME, generation, datetime.now(timezone.utc), {}, size)


async def test_a_known_size_reads_the_config_in_one_request() -> None:
    client = _Client(b"task: {}\n")
    store = _store(client)
    try:
        blob = await store.read(NAME, 7, max_bytes=100, known=_known(9))
        assert (blob.data, blob.info.generation, blob.info.size) == (b"task: {}\n", 7, 9)
        assert client.calls == ["stream"], "no metadata request"
        await store.read(NAME, 7, max_bytes=100, known=_known(9, generation=6))
        await store.read(NAME, 7, max_bytes=100)
        assert client.calls == ["stream", "json", "media", "json", "media"], "another generation, or none known"
    finally:
        await store.close()


async def test_an_understated_size_reads_one_byte_past_the_limit_and_no_more() -> None:
    client = _Client(b"x" * 1_000_000)
    store = _store(client)
    try:
        with pytest.raises(TooLarge, match="more than the 100 bytes accepted"):
            await store.read(NAME, 7, max_bytes=100, known=_known(10))
        assert sum(client.served) == 101
        with pytest.raises(TooLarge):  # an honest size says so before anything is downloaded
            await store.read(NAME, 7, max_bytes=100, known=_known(1_000_000))
        assert client.calls == ["stream", "json"]
    finally:
        await store.close()


def _config_reads(method: str, path: str, body: bytes) -> str:
    """`download NAME`, `get NAME` for requests on a config; `other` for the rest."""
    object_path = urllib.parse.urlsplit(path).path
    if "/o/" not in object_path or not object_path.endswith(".config.yaml"):
        return "other"
    return f"{kind(method, path)} {urllib.parse.unquote(object_path.rsplit('/o/', 1)[1])}"


@pytest.mark.parametrize("backend", ["gcs"], indirect=True)
def test_each_node_reads_a_notified_or_listed_config_with_one_download(
    start_node, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    """node-a and node-b hear of `heard` (the notification's payload); node-c, started later, finds `listed`
    in its first scan. Only the node that claims a run asks for the config's metadata, once, before it
    removes the config."""
    proxy = Proxy(bucket.gcs.url, classify=_config_reads)
    try:
        nodes = [start_node(name, env_overrides={"STORAGE_EMULATOR_HOST": proxy.url}) for name in ("node-a", "node-b")]
        submit(bucket, "heard", {"name": "Touch", "module": "poltergust_testpipes", "out-dir": str(tmp_path / "h")},
               environment_yaml)
        result(bucket, "heard", "done")
        wait_for(lambda: proxy.counts().get("delete pipeline/heard.config.yaml"), 30, "the config's removal")
        for node in nodes:
            node.stop()
        submit(bucket, "listed", {"name": "Touch", "module": "poltergust_testpipes", "out-dir": str(tmp_path / "l")},
               environment_yaml)
        start_node("node-c", env_overrides={"STORAGE_EMULATOR_HOST": proxy.url})
        result(bucket, "listed", "done")
        wait_for(lambda: proxy.counts().get("delete pipeline/listed.config.yaml"), 30, "the config's removal")
        counts: dict[str, Any] = {what: n for what, n in proxy.counts().items() if what != "other"}
    finally:
        proxy.close()
    assert counts == {
        "download pipeline/heard.config.yaml": 2, "get pipeline/heard.config.yaml": 1,
        "delete pipeline/heard.config.yaml": 1,
        "download pipeline/listed.config.yaml": 1, "get pipeline/listed.config.yaml": 1,
        "delete pipeline/listed.config.yaml": 1,
    }, counts
