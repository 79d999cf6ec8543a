"""The dashboard against what anyone with write access to a bucket can put there, and against browsers.

Result files are parsed with the limits configs get (an alias bomb shows as
unreadable, the pages keep answering), and a request for a name the
dashboard does not serve (a rebound name through the tunnel) is refused.
"""
from __future__ import annotations

import http.client
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from harness import Dashboard

from poltergust.dashboard.pipelines import section_of

BOMB = ("task: {name: T}\npoltergust:\n  outcome: error\n  l: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        + "".join(f"  l{level}: &{chr(98 + level)} [{', '.join([f'*{chr(97 + level)}'] * 9)}]\n"
                  for level in range(8)) + "  reason: *i\n").encode()
"""A result file of a few hundred bytes whose `poltergust:` section expands to 9**9 strings."""


@pytest.fixture
def dashboard_on(bucket, tmp_path: Path) -> Iterator[Callable[..., Dashboard]]:
    """Starts `poltergust dashboard` on the bucket's pipelines, and stops it after the test."""
    started: list[Dashboard] = []

    def start(*extra: str) -> Dashboard:
        started.append(Dashboard(tmp_path, bucket.url("pipeline"), dict(os.environ), *extra))
        return started[-1]

    yield start
    for dashboard in started:
        dashboard.stop()


def get(dashboard: Dashboard, path: str, host: str | None = None) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", dashboard.port, timeout=10)
    try:
        connection.request("GET", path, headers={"Host": host} if host else {})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_the_bomb_is_small_and_its_section_is_unreadable() -> None:
    assert len(BOMB) <= 700
    started = time.monotonic()
    section = section_of(BOMB, "b/pipeline/bomb.error.yaml")
    assert "too complex" in section["unreadable"] and time.monotonic() - started < 2


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_an_alias_bomb_result_shows_as_unreadable_and_the_pages_answer(bucket, dashboard_on) -> None:
    bucket.upload("pipeline/bomb.error.yaml", BOMB)
    bucket.upload("pipeline/fine.done.yaml", b"poltergust:\n  outcome: done\n  node: n\n")
    dashboard = dashboard_on()
    for path in ("/", "/nodes", "/?state=error", "/pipeline?path=0&name=bomb"):
        started = time.monotonic()
        status, body = get(dashboard, path)
        assert status == 200 and time.monotonic() - started < 5, (path, status)
        if path.startswith("/?"):
            assert "too complex" in body and "bomb" in body
    assert dashboard.check_alive() is None


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_the_dashboard_answers_only_its_own_names(dashboard_on) -> None:
    dashboard = dashboard_on("--allowed-host", "dash.internal")
    for host in (f"localhost:{dashboard.port}", f"127.0.0.1:{dashboard.port}", f"[::1]:{dashboard.port}",
                 "dash.internal"):
        assert get(dashboard, "/", host)[0] == 200, host
    for host in (f"evil.example:{dashboard.port}", "127.0.0.1.evil.example", "localhost.:80"):
        status, body = get(dashboard, "/", host)
        assert status == 403 and "Host" in body, host
