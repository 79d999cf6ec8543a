"""Keeping browsers out of luigid: requests with a foreign `Origin` or an unknown `Host` are refused.

luigid's RPCs (`/api/set_task_status`, `/api/add_task`, ...) change state on a
plain GET, so any web page open in an operator's browser could call them
through the ssh tunnel to luigid's port (a cross-origin GET needs no CORS), or
rebind its own name to the tunnel's address and read the pages as well. A
browser always names the page's origin in `Origin` on such a cross-origin call
and the name it looked up in `Host`; nodes (luigi's `RemoteScheduler`) send
no `Origin` and the name they were given in `--scheduler-url`. So a request
passes when its `Host` is one of the scheduler's own names and its `Origin`,
if any, is that same host: luigid's own page still works through the tunnel.
"""
from __future__ import annotations

import urllib.parse
from typing import Any

import tornado.httputil
import tornado.routing
import tornado.web

from poltergust.hosts import host_name


def refusal(headers: tornado.httputil.HTTPHeaders, hosts: frozenset[str]) -> str | None:
    """Why a request with these headers is refused, or None when it passes."""
    host = headers.get("Host", "")
    if host_name(host) not in hosts:
        return f"Host {host!r} is not one of this scheduler's names (see --allowed-host)"
    origin = headers.get("Origin")
    if origin is not None and urllib.parse.urlsplit(origin).netloc.lower() != host.strip().lower():
        return f"Origin {origin!r} is not this scheduler's own: cross-origin calls are refused"
    return None


class _Refused(tornado.web.RequestHandler):
    def initialize(self, reason: str) -> None:
        self.reason = reason

    def prepare(self) -> None:
        self.set_status(403)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(f"refused: {self.reason}\n")


class Guarded(tornado.routing.Router):
    """luigid's application behind the check: refused requests never reach a handler."""

    def __init__(self, application: tornado.web.Application, hosts: frozenset[str]) -> None:
        self.application = application
        self.hosts = hosts

    def find_handler(self, request: tornado.httputil.HTTPServerRequest,
                     **kwargs: Any) -> tornado.httputil.HTTPMessageDelegate | None:
        reason = refusal(request.headers, self.hosts)
        if reason is not None:
            return self.application.get_handler_delegate(request, _Refused, {"reason": reason})
        return self.application.find_handler(request, **kwargs)
