"""One HTTP proxy in front of the GCS emulator or luigid, with hooks to count, hold back and fail requests.

Tests hold chosen requests until released (a node stuck mid-request) or fail them; benchmarks count the
requests nodes make. Each hook sees the request as `(method, path, body)`.
"""
from __future__ import annotations

import collections
import http.client
import random
import select
import socket
import struct
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
Hook = Callable[[str, str, bytes], object]


def kind(method: str, path: str, body: bytes = b"") -> str:
    """A name for the JSON API operation: list, get, download, upload, delete, ..."""
    parsed = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qs(parsed.query)
    if parsed.path.startswith("/upload/"):
        return "upload"
    if parsed.path.endswith("/o") and method == "GET":
        return "list"
    if "/o/" in parsed.path:
        if method == "DELETE":
            return "delete"
        if method == "GET":
            return "download" if query.get("alt") == ["media"] else "get"
        return f"{method.lower()} object"
    return f"{method.lower()} other"


def luigid_call(method: str, path: str, body: bytes = b"") -> str:
    """The name of a luigid API call (`add_task`, `get_work`, `dep_graph`, ...); `page` for anything else."""
    parsed = urllib.parse.urlsplit(path)
    return parsed.path[len("/api/"):] if parsed.path.startswith("/api/") else "page"


@dataclass(frozen=True)
class Fault:
    """What the proxy does instead of simply forwarding: answer `status`, after forwarding the request if
    `forward` (the server acted, the client never hears it: a lost answer) or without (a refusal).
    A `status` of None resets the connection instead of answering."""

    status: int | None = 503
    forward: bool = False


class Faults:
    """Storage faults as Google's retry conformance tests inject them, for a proxy's `fault` hook; seeded.

    A `refuse` fraction of requests is never forwarded (the connection is
    reset, or 503 answers); a `lose` fraction of the writes that `writes`
    selects is forwarded, takes effect, and is then answered 503: the answer
    is lost. Both fractions may be changed while the proxy runs.
    """

    WRITES = ("POST", "PUT", "PATCH", "DELETE")

    def __init__(self, refuse: float = 0.0, lose: float = 0.0, seed: int = 0,
                 writes: Callable[[str, str, bytes], bool] = lambda method, path, body: True) -> None:
        self.refuse, self.lose, self.writes = refuse, lose, writes
        self.refused = self.lost = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def __call__(self, method: str, path: str, body: bytes) -> Fault | None:
        with self._lock:
            if self._random.random() < self.refuse:
                self.refused += 1
                return Fault(self._random.choice((None, 503)))
            if method in self.WRITES and self.writes(method, path, body) and self._random.random() < self.lose:
                self.lost += 1
                return Fault(503, forward=True)
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    """Dozens of nodes may connect at once (the default backlog is 5)."""

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hung up (a luigi worker stopped mid-request) is no error of the proxy's."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class Proxy:
    """Forwards every request to `upstream`, counting them by `classify`.

    `hold` picks requests to hold back until `release()`; a held request whose client hangs up meanwhile
    is dropped, not forwarded, exactly as if the client's process had never sent it. `fault` returns a
    `Fault` for requests to fail (None to forward them); it may be replaced while the proxy runs.
    """

    def __init__(self, upstream: str, hold: Hook | None = None, *, classify: Callable[[str, str, bytes], str] = kind,
                 fault: Callable[[str, str, bytes], Fault | None] | None = None) -> None:
        target = urllib.parse.urlsplit(upstream)
        self._host, self._port = target.hostname or "127.0.0.1", target.port or 80
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._latencies: list[float] = []
        self._released = threading.Event()
        self.held = threading.Event()
        """Set once a request has been held back."""
        self.dropped = 0
        """Held requests whose client hung up before `release()`."""
        self.fault = fault
        self.url = ""
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            _upstream: http.client.HTTPConnection | None = None

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = self._body()
                with proxy._lock:
                    proxy._counts[classify(self.command, self.path, body)] += 1
                if hold is not None and hold(self.command, self.path, body) and not self._wait_release():
                    return
                fault = proxy.fault(self.command, self.path, body) if proxy.fault is not None else None
                if fault is not None and not fault.forward:
                    self._fail(fault.status, "proxy fault")
                    return
                started = time.perf_counter()
                try:
                    status, reason, headers, data = self._forward(body)
                except (OSError, http.client.HTTPException):
                    self.send_error(502)
                    return
                with proxy._lock:
                    proxy._latencies.append(time.perf_counter() - started)
                if fault is not None:
                    self._fail(fault.status, "proxy fault: answer lost")
                    return
                self._answer(status, reason, headers, data)

            def _wait_release(self) -> bool:
                """Hold until released; False if the client hung up meanwhile (the request is then dropped)."""
                proxy.held.set()
                proxy._released.wait(120)
                readable, _, _ = select.select([self.connection], [], [], 0)
                if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                    with proxy._lock:
                        proxy.dropped += 1
                    self.close_connection = True
                    return False
                return True

            def _forward(self, body: bytes) -> tuple[int, str, dict[str, str], bytes]:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("POST", "PUT", "PATCH"):
                    headers["Content-Length"] = str(len(body))
                if self._upstream is None:
                    self._upstream = http.client.HTTPConnection(proxy._host, proxy._port, timeout=60)
                try:
                    self._upstream.request(self.command, self.path, body=body or None, headers=headers)
                    response = self._upstream.getresponse()
                    return response.status, response.reason, dict(response.getheaders()), response.read()
                except (OSError, http.client.HTTPException):
                    self._upstream.close()
                    self._upstream = None
                    raise

            def _fail(self, status: int | None, reason: str) -> None:
                """Answer `status`, or reset the connection (None): the client gets no answer at all."""
                if status is not None:
                    self._answer(status, reason, {}, b"")
                    return
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

            def _answer(self, status: int, reason: str, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status, reason)
                for key, value in headers.items():
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True, name="test proxy").start()

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def latencies(self) -> list[float]:
        """Seconds the upstream took to answer each forwarded request, in the order they ended."""
        with self._lock:
            return list(self._latencies)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def release(self) -> None:
        """Let every held request (and every later one `hold` picks) through."""
        self._released.set()

    def close(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()


GatedProxy = Proxy
"""The name tests knew the holding proxy by: `GatedProxy(upstream, hold)`."""
