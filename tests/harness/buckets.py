"""Buckets as tests see them: one on the GCS emulator over plain HTTP, or a local directory, with one set of methods.

Both are independent of the code under test, so a test reads what a node really wrote.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from harness.servers import FakeGcs


def latest_log(names: list[str], pipeline: str, node: str, prefix: str = "pipeline/") -> str:
    """The object name of `node`'s log of the newest run of `pipeline` (a name that does not exist if none)."""
    base = f"_poltergust/logs/{prefix}{pipeline}/"
    runs = [name for name in names if name.startswith(base) and name.endswith(f"/{node}.log.txt")
            and name[len(base):].split("/")[0].isdigit() and name[len(base):].count("/") == 1]
    if not runs:
        return f"{base}none/{node}.log.txt"
    return max(runs, key=lambda name: int(name[len(base):].split("/")[0]))



class Bucket:
    """Plain HTTP access to one emulator bucket, independent of the code under test."""

    def __init__(self, gcs: FakeGcs, name: str) -> None:
        self.gcs = gcs
        self.name = name
        self._request("POST", f"{gcs.url}/storage/v1/b", json.dumps({"name": name}).encode(),
                      {"Content-Type": "application/json"})

    def _request(self, method: str, url: str, data: bytes | None = None, headers: dict | None = None) -> bytes:
        request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        with urllib.request.urlopen(request, timeout=60) as response:  # the emulator slows down under load
            return response.read()

    def url(self, name: str = "") -> str:
        return f"gs://{self.name}/{name}"

    def _object_url(self, name: str) -> str:
        return f"{self.gcs.url}/storage/v1/b/{self.name}/o/{urllib.parse.quote(name, safe='')}"

    def upload(self, name: str, data: bytes | str, metadata: dict[str, str] | None = None) -> int:
        body = data.encode() if isinstance(data, str) else data
        if metadata:
            boundary = "poltergust-test-boundary"
            resource = json.dumps({"name": name, "metadata": metadata}).encode()
            body = (f"--{boundary}\r\nContent-Type: application/json\r\n\r\n".encode() + resource
                    + f"\r\n--{boundary}\r\nContent-Type: text/plain\r\n\r\n".encode() + body
                    + f"\r\n--{boundary}--\r\n".encode())
            url = f"{self.gcs.url}/upload/storage/v1/b/{self.name}/o?uploadType=multipart"
            headers = {"Content-Type": f"multipart/related; boundary={boundary}"}
            return int(json.loads(self._request("POST", url, body, headers))["generation"])
        url = (f"{self.gcs.url}/upload/storage/v1/b/{self.name}/o?uploadType=media&name="
               f"{urllib.parse.quote(name, safe='')}")
        return int(json.loads(self._request("POST", url, body))["generation"])

    def read(self, name: str) -> bytes | None:
        try:
            return self._request("GET", self._object_url(name) + "?alt=media")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def stat(self, name: str) -> dict | None:
        try:
            return json.loads(self._request("GET", self._object_url(name)))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def exists(self, name: str) -> bool:
        return self.stat(name) is not None

    def delete(self, name: str) -> None:
        self._request("DELETE", self._object_url(name))

    def log_name(self, pipeline: str, node: str) -> str:
        return latest_log(self.names("_poltergust/logs/"), pipeline, node)

    def names(self, prefix: str = "") -> list[str]:
        query = urllib.parse.urlencode({"prefix": prefix})
        listing = json.loads(self._request("GET", f"{self.gcs.url}/storage/v1/b/{self.name}/o?{query}"))
        return sorted(item["name"] for item in listing.get("items", []))


class LocalBucket:
    """A directory used as a bucket (the local backend), with the same helper methods as `Bucket`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.name = root.name
        root.mkdir(parents=True, exist_ok=True)

    def url(self, name: str = "") -> str:
        return f"file://{self.root}/{name}"

    def upload(self, name: str, data: bytes | str, metadata: dict[str, str] | None = None) -> int:
        if metadata:  # as a node writes a claim: through the local backend itself
            import asyncio

            from poltergust.storage.local import LocalStore

            body = data.encode() if isinstance(data, str) else data
            return asyncio.run(LocalStore(self.root).write(name, body, metadata=metadata)).generation
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.parent / f".upload-{os.getpid()}-{time.monotonic_ns()}"
        temporary.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)
        return path.stat().st_mtime_ns

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def delete(self, name: str) -> None:
        (self.root / name).unlink()

    def log_name(self, pipeline: str, node: str) -> str:
        return latest_log(self.names("_poltergust/logs/"), pipeline, node)

    def names(self, prefix: str = "") -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*")
                      if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
                      and str(p.relative_to(self.root)).startswith(prefix))
