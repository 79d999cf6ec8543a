"""Tell an endpoint that a pipeline finished (the original's DB_URL hook, and a JSON POST).

Only the node that claimed the run notifies. The endpoint's failures are
retried with backoff and then logged: they never change the run's result.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Mapping

import aiohttp

from poltergust.backoff import Backoff
from poltergust.masking import redact_url
from poltergust.node.metrics import NOTIFY_ERRORS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NotifyTarget:
    url: str
    legacy_get: bool = False
    """The original's DB_URL protocol: GET URL?pipeline_url=... instead of a JSON POST."""


def notify_target(flag: str | None, db_url: str | None) -> NotifyTarget | None:
    if flag:
        return NotifyTarget(flag)
    return NotifyTarget(db_url, legacy_get=True) if db_url else None


class Notifier:
    """Sends notifications in the background (the endpoint must not hold up the node), and waits for them at exit."""

    def __init__(self, target: NotifyTarget | None) -> None:
        self.target = target
        self._pending: set[asyncio.Task[bool]] = set()

    def send(self, payload: Mapping[str, Any]) -> None:
        if self.target is None:
            return
        task = asyncio.create_task(notify(self.target, payload))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def wait(self, timeout: float) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=timeout)


async def notify(target: NotifyTarget, payload: Mapping[str, Any], attempts: int = 5) -> bool:
    backoff = Backoff(first=0.5, cap=30.0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for attempt in range(1, attempts + 1):
            try:
                if target.legacy_get:
                    request = session.get(target.url, params={"pipeline_url": payload["pipeline_url"]})
                else:
                    request = session.post(target.url, json=dict(payload))
                async with request as response:
                    if response.status < 300:
                        return True
                    problem = f"HTTP {response.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt < attempts:
                await backoff.sleep()
    NOTIFY_ERRORS.inc()
    log.warning("could not notify %s after %d attempts (%s); the run's result stands",
                redact_url(target.url), attempts, redact_url(problem))
    return False
