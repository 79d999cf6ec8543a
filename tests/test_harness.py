"""The harness's own moving parts that tests and benchmarks rely on: the proxy's hooks, the report writer."""
from __future__ import annotations

import http.client
import importlib
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from harness import ROOT, Fault, Proxy, wait_for


class Upstream(BaseHTTPRequestHandler):
    """Answers every request with its method and path; remembers what reached it."""

    protocol_version = "HTTP/1.1"
    seen: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).seen.append(f"{self.command} {self.path}")
        body = f"{self.command} {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


@pytest.fixture
def upstream() -> Iterator[str]:
    Upstream.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def request(url: str, method: str, path: str) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, body=b"x" if method == "POST" else None)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_the_proxy_counts_holds_and_fails_requests(upstream: str) -> None:
    proxy = Proxy(upstream, hold=lambda method, path, body: path == "/held")
    try:
        assert request(proxy.url, "GET", "/storage/v1/b/x/o") == (200, b"GET /storage/v1/b/x/o")
        held: list[tuple[int, bytes]] = []
        thread = threading.Thread(target=lambda: held.append(request(proxy.url, "GET", "/held")))
        thread.start()
        assert proxy.held.wait(10)
        assert "GET /held" not in Upstream.seen, "a held request waits for release()"
        proxy.release()
        thread.join(10)
        assert held == [(200, b"GET /held")]

        proxy.fault = lambda method, path, body: Fault(503) if path == "/refused" else None
        assert request(proxy.url, "GET", "/refused")[0] == 503
        assert "GET /refused" not in Upstream.seen, "a refused request never reaches the server"
        proxy.fault = lambda method, path, body: Fault(503, forward=True) if method == "POST" else None
        assert request(proxy.url, "POST", "/upload/storage/v1/b/x/o")[0] == 503
        assert "POST /upload/storage/v1/b/x/o" in Upstream.seen, "a lost answer: the server acted"
        assert proxy.counts() == {"list": 1, "get other": 2, "upload": 1} and proxy.total() == 4
    finally:
        proxy.close()


def test_a_held_request_whose_client_hung_up_is_dropped(upstream: str) -> None:
    proxy = Proxy(upstream, hold=lambda method, path, body: True)
    try:
        host, port = proxy.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("GET", "/gone")
        assert proxy.held.wait(10)
        connection.close()
        proxy.release()
        wait_for(lambda: proxy.dropped == 1, 10, "the held request to be dropped")
        assert Upstream.seen == []
    finally:
        proxy.close()


@pytest.fixture
def report(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    yield importlib.import_module("_report")
    sys.modules.pop("_report", None)


def test_write_section_replaces_appends_or_overwrites(report, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n## Pipelines: old\n\nold table\n\n## Fleet scale\n\nfleet\n")
    report.write_section(readme, "## Pipelines:", "## Pipelines: new\n\nnew table\n")
    assert readme.read_text() == "# Benchmarks\n\n## Pipelines: new\n\nnew table\n\n## Fleet scale\n\nfleet\n"
    report.write_section(readme, "## Dynamic", "## Dynamic\n\nrows\n")
    assert readme.read_text().endswith("## Fleet scale\n\nfleet\n\n## Dynamic\n\nrows\n")

    scratch = tmp_path / "scratch.md"
    scratch.write_text("an earlier run's notes\n")
    report.write_section(scratch, "## Pipelines:", "## Pipelines: new\n", append=False)
    assert scratch.read_text() == "## Pipelines: new\n"
    report.write_section(tmp_path / "new.md", "## Fleet scale", "## Fleet scale\n")
    assert (tmp_path / "new.md").read_text() == "## Fleet scale\n"
