"""The node's Prometheus metrics, served at /metrics by the health server.

One node runs per process, so the metrics live in prometheus-client's default
registry, which also carries the process's CPU, memory and open files.
"""
from __future__ import annotations

import asyncio

from prometheus_client import Counter, Gauge, Histogram

RUNS_STARTED = Counter("poltergust_runs_started", "Runs this node started")
RUNS_FINISHED = Counter("poltergust_runs_finished", "Runs this node finished locally, by outcome",
                        ["outcome"])
RUNS_CLAIMED = Counter("poltergust_runs_claimed", "Runs this node won the claim for and wrote the result of",
                       ["outcome"])
RUNS_ACTIVE = Gauge("poltergust_runs_active", "Runs in progress on this node")
PICKUP_SECONDS = Histogram(
    "poltergust_pickup_seconds", "From the config's upload (object time) to luigi's first start on this node",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
LUIGI_RERUNS = Counter("poltergust_luigi_reruns", "luigi started again because other workers held tasks")
ENV_BUILDS = Counter("poltergust_environment_builds", "Environment builds, by result", ["result"])
ENV_CACHE_HITS = Counter("poltergust_environment_cache_hits", "Runs that found their environment ready")
ENV_BUILD_SECONDS = Histogram(
    "poltergust_environment_build_seconds", "Duration of environment builds",
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
STORAGE_ERRORS = Counter("poltergust_storage_errors", "Failed storage requests, by kind", ["kind"])
EVENTS_RECEIVED = Counter(
    "poltergust_events_received",
    "Messages delivered to this node's subscription, by kind (finalize, delete, help, other) and scope (watched: "
    "under one of its prefixes, what its filter lets through; outside: only delivered where no filter applies)",
    ["kind", "scope"],
)
EVENT_ERRORS = Counter("poltergust_event_errors", "Event stream failures, by kind", ["kind"])
NOTIFY_ERRORS = Counter("poltergust_notify_errors", "Failed completion notifications (after retries)")
WARM_STARTS = Counter("poltergust_warm_starts", "luigi starts meant for a warm interpreter, by result: forked, "
                      "or fallback (started afresh)", ["result"])
WARM_INTERPRETERS = Gauge("poltergust_warm_interpreters", "Warm interpreters this node runs")
ASYNCIO_TASKS = Gauge("poltergust_asyncio_tasks", "asyncio tasks alive in the node's event loop")


def watch_event_loop(loop: asyncio.AbstractEventLoop) -> None:
    ASYNCIO_TASKS.set_function(lambda: len(asyncio.all_tasks(loop)))
