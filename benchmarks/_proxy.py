"""A tiny counting HTTP proxy, put in front of the GCS emulator (or luigid) to count the requests nodes make."""
from __future__ import annotations

import collections
import http.client
import sys
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    """Dozens of nodes may connect at once (the default backlog is 5)."""

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hung up (a luigi worker stopped mid-request) is no error of the proxy's."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


def luigid_call(method: str, path: str, body: bytes = b"") -> str:
    """The name of a luigid API call (`add_task`, `get_work`, `dep_graph`, ...); `page` for anything else."""
    parsed = urllib.parse.urlsplit(path)
    return parsed.path[len("/api/"):] if parsed.path.startswith("/api/") else "page"


class CountingProxy:
    """Forwards every request to `upstream`, counting them by `classify(method, path, body)`."""

    def __init__(self, upstream: str, classify: Callable[[str, str, bytes], str] = kind) -> None:
        target = urllib.parse.urlsplit(upstream)
        self._host, self._port = target.hostname or "127.0.0.1", target.port or 80
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                body = self._body()
                with proxy._lock:
                    proxy._counts[classify(self.command, self.path, body)] += 1
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("POST", "PUT", "PATCH"):
                    headers["Content-Length"] = str(len(body))
                upstream = getattr(self, "_upstream", None)
                if upstream is None:
                    upstream = self._upstream = http.client.HTTPConnection(proxy._host, proxy._port, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                except (OSError, http.client.HTTPException):
                    upstream.close()
                    self._upstream = None
                    self.send_error(502)
                    return
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
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

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="counting proxy")
        self._thread.start()

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
