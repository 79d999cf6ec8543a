"""Tell an endpoint that a pipeline finished (the original's DB_URL hook, and a JSON POST).

Only the node that claimed the run notifies. The endpoint's failures are
retried with backoff and then logged: they never change the run's result.
"""
from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Any, Mapping

import aiohttp

from .metrics import NOTIFY_ERRORS

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


async def notify(target: NotifyTarget, payload: Mapping[str, Any], attempts: int = 5) -> bool:
    delay = 0.5
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
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 30.0)
    NOTIFY_ERRORS.inc()
    log.warning("could not notify %s after %d attempts (%s); the run's result stands",
                target.url.split("?")[0], attempts, problem)
    return False
