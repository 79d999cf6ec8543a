"""One node's lifecycle: attach the event stream -> scan -> serve events and rescan -> stop.

Subscribing before scanning means no upload can fall between the two. A run
is identified by its `RunKey` (bucket, object name, generation): duplicate
events and rescans of a run already in flight are no-ops, and a delete or
overwrite of that generation cancels that run only. What one run does is
`run.Run`'s business.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import signal
import tempfile
from pathlib import Path

from poltergust.backoff import Backoff
from poltergust.environments import Environments
from poltergust.events import Event, EventSource, open_events
from poltergust.launch.sandbox import lock_down
from poltergust.launch.warm import WarmPool
from poltergust.layout import RunKey, is_config_name, safe_name
from poltergust.locks import try_lock
from poltergust.luigid.embedded import embedded_scheduler
from poltergust.node import heartbeat, metrics
from poltergust.node.backlog import Backlog
from poltergust.node.health import disk_shortage, health_server
from poltergust.node.notify import Notifier
from poltergust.run.execute import Run, RunContext
from poltergust.settings import Settings, default_data_dir
from poltergust.storage import ObjectInfo, ObjectStore, StorageError, open_store

log = logging.getLogger(__name__)

ATTACH_BEFORE_SCAN_SECONDS = 10.0
"""The first scan waits this long for the event stream (so nothing falls in between), then runs regardless."""
SHUTDOWN_UPLOADS_SECONDS = 60.0
"""How long a stopping node waits for environment archives it is still uploading."""
FINISH_ON_STOP_SECONDS = 10.0
"""How long a stopping node waits for runs that are writing their result (a few storage requests)."""


class Node:
    def __init__(self, settings: Settings, events: EventSource, environments: Environments) -> None:
        self.settings = settings
        self.secrets = environments.secret_env
        self.warm = WarmPool(self.secrets,
                             idle_seconds=settings.warm_idle_seconds,
                             prestart=settings.warm_prestart, run_as=settings.run_as) if settings.warm else None
        self.events = events
        self.environments = environments
        self._stores: dict[str, ObjectStore] = {}
        self._runs: dict[RunKey, Run] = {}
        """Every run this node has in flight, standing by or taking part, until its task ends."""
        self._context = RunContext(settings, self.store, environments, Notifier(settings.notify), self.secrets,
                                   asyncio.Semaphore(settings.max_concurrent), self.call_for_help, self.warm)
        self._background: set[asyncio.Task[None]] = set()
        self._scanned = False
        self.stopping = asyncio.Event()
        """Set once the node stops taking work."""
        self.attached = asyncio.Event()
        """Set while the event stream is attached: the node is then ready for work."""

    # -- lifecycle ---------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        metrics.watch_event_loop(loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        log.info("node %s starting: %s, scheduler %s", self.settings.node_name,
                 ", ".join(loc.url() for loc in self.settings.locations), self.settings.scheduler_url)
        background = [asyncio.create_task(self._scan_periodically()), asyncio.create_task(self._serve_events()),
                      asyncio.create_task(self._keep_events_attached()),
                      asyncio.create_task(heartbeat.beat(self.settings, self.store, self._taking_part, self.attached))]
        try:
            await self.stopping.wait()
            log.info("stopping: taking no new work, stopping %d run(s); their configs stay for the next scan",
                     len(self._runs))
            runs = [run.task for run in self._runs.values() if run.task is not None and not run.finishing]
            for task in [*background, *runs]:
                task.cancel()
            await asyncio.gather(*background, *runs, return_exceptions=True)
            await self._let_finish()
            await self._context.notifier.wait(timeout=10)
            if self.warm is not None:
                await self.warm.close()
            await self.environments.wait_background(timeout=SHUTDOWN_UPLOADS_SECONDS)
        finally:
            await self.events.close(delete=True)
            for store in self._stores.values():
                await store.close()
            log.info("node %s stopped", self.settings.node_name)

    async def _let_finish(self) -> None:
        """Give runs that are writing their result time to remove their config too.

        Stopped between the two, a run would leave its config to be run again by the next node that finds it.
        """
        finishing = [run.task for run in self._runs.values() if run.task is not None and not run.task.done()]
        if not finishing:
            return
        log.info("stopping: %d run(s) finishing, waiting up to %.0fs for them", len(finishing), FINISH_ON_STOP_SECONDS)
        _, left = await asyncio.wait(finishing, timeout=FINISH_ON_STOP_SECONDS)
        for task in left:
            task.cancel()
        await asyncio.gather(*finishing, return_exceptions=True)

    def evicted(self, env_key: str) -> None:
        """An environment left the cache: its warm interpreter goes too."""
        if self.warm is not None:
            self.warm.evicted(env_key)

    def stop(self) -> None:
        self.stopping.set()

    def task(self, key: RunKey) -> asyncio.Task[None] | None:
        """The task of this node's run of `key`, while it is in flight."""
        run = self._runs.get(key)
        return run.task if run is not None else None

    def _taking_part(self) -> list[RunKey]:
        """Runs this node takes part in (not those it stands by for), for its heartbeat."""
        return [key for key, run in self._runs.items() if run.taking_part]

    def problem(self) -> str | None:
        """Why this node cannot take work right now (for /healthz), or None when it can."""
        if not self.attached.is_set():
            return "event stream not attached (yet)"
        shortage = disk_shortage((self.settings.data_dir, self.settings.env_dir), self.settings.min_free_disk)
        if shortage is not None:
            return shortage
        broken = self.events.broken
        return f"event stream broken: {broken}" if broken is not None else None

    def store(self, bucket: str) -> ObjectStore:
        if bucket not in self._stores:
            self._stores[bucket] = open_store(bucket, retry_for=self.settings.outage_limit)
        return self._stores[bucket]

    # -- finding work ------------------------------------------------------

    async def _keep_events_attached(self, check_every: float = 5.0) -> None:
        """Attach the event stream, and re-attach it whenever it breaks, until it works; rescan after each."""
        backoff = Backoff(first=1.0, cap=30.0)
        first = True
        while True:
            broken = self.events.broken if self.attached.is_set() else None
            if broken is not None:
                log.error("event stream broken (%s); re-attaching", broken)
                metrics.EVENT_ERRORS.labels(type(broken).__name__).inc()
                self.attached.clear()
            if not self.attached.is_set():
                try:
                    await self.events.close()
                    await self.events.attach()
                except Exception as exc:  # noqa: BLE001 -- any failure here is worth another try
                    metrics.EVENT_ERRORS.labels(type(exc).__name__).inc()
                    delay = backoff.next()
                    log.error("cannot attach the event stream (%s); trying again in %.0fs", exc, delay)
                    await asyncio.sleep(delay)
                    continue
                backoff.reset()
                self.attached.set()
                log.info("ready: subscribed%s", ", scanning" if first else "; rescanning for what was missed")
                if not first:
                    await self._scan_logged()
                first = False
            await asyncio.sleep(check_every)

    async def _scan_periodically(self) -> None:
        """The safety net: scan at start (even while events cannot attach) and every rescan interval."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.attached.wait(), ATTACH_BEFORE_SCAN_SECONDS)
        while True:
            await self._scan_logged()
            await asyncio.sleep(self.settings.rescan_interval)

    async def _scan_logged(self) -> None:
        try:
            scheduled = await self.scan()
            log.info("scanned: %d run(s) scheduled, %d in flight", scheduled, len(self._runs))
        except StorageError as exc:
            log.error("scan failed, will retry at the next rescan: %s", exc)

    async def scan(self) -> int:
        """Schedule every config under the prefixes, reading the listing a page at a time; returns how many."""
        scheduled = 0
        first = not self._scanned
        for location in self.settings.locations:
            async for page in self.store(location.bucket).pages(location.prefix, glob="*.config.yaml"):
                for info in page:
                    if is_config_name(info.name, location.prefix):
                        scheduled += self.schedule(RunKey(location.bucket, info.name, info.generation), first, info)
        self._scanned = True
        return scheduled

    async def _serve_events(self) -> None:
        while True:
            self.handle(await self.events.get())

    def handle(self, event: Event) -> None:
        key = RunKey(event.bucket, event.name, event.generation)
        log.debug("event %s %s#%d%s", event.kind, key.url(), key.generation,
                  " (already in progress)" if key in self._runs else "")
        if event.kind == "finalize":
            self.schedule(key, info=event.info)
            return
        run = self._runs.get(key)
        if run is None:
            return
        if event.kind == "help":
            run.hear(event)
        elif not run.finishing and run.task is not None:
            why = f"replaced by generation {event.replaced_by}" if event.replaced_by else "deleted"
            log.info("%s generation %d was %s: stopping its run", key.url(), key.generation, why)
            run.task.cancel()

    def schedule(self, key: RunKey, found_at_start: bool = False, info: ObjectInfo | None = None) -> bool:
        """Start a run of `key` unless one is in flight (or the node is stopping); True if started.

        `found_at_start`: found by the node's first scan (or redelivered by the backlog), so a run this node
        may have started before a crash. `info`: the config as the event or the listing described it.
        """
        if key in self._runs or self.stopping.is_set():
            return False
        run = Run(key, self._context, found_at_start, info)
        run.task = asyncio.create_task(run.execute(), name=f"run {key.url()}#{key.generation}")
        self._runs[key] = run
        run.task.add_done_callback(lambda _: self._runs.pop(key, None))
        return True

    def call_for_help(self, key: RunKey, wanted: int, wave: int) -> None:
        """Publish a run's call for help in the background (see `membership`)."""
        async def publish() -> None:
            try:
                await self.events.call_for_help(key.bucket, key.name, key.generation, wanted, wave)
                log.info("%s: asked for %d more node(s) (call %d)", key.url(), wanted, wave)
            except Exception as exc:  # noqa: BLE001 -- the run goes on with the nodes it has
                log.warning("%s: could not ask for help: %s", key.url(), exc)

        task = asyncio.create_task(publish())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def take_node_name(settings: Settings) -> tuple[Settings, str]:
    """Make the node's name unique among node processes on this host watching the same paths and topic.

    Two such processes started with the same name (the host name, by default)
    would share a subscription, each hearing half the events, and write each
    other's log objects. The second one becomes NAME-2, and so on. Returns the
    settings and, when renamed, a line to log saying so.
    """
    watched = "\n".join([settings.topic, *sorted(loc.url() for loc in settings.locations)])
    scope = hashlib.sha256(watched.encode()).hexdigest()[:12]
    for index in range(1, 1000):
        name = settings.node_name if index == 1 else f"{settings.node_name}-{index}"
        fd = try_lock(Path(tempfile.gettempdir()) / f"poltergust-node-{safe_name(name)}-{scope}.lock")
        if fd is not None:
            _NAME_LOCKS.append(fd)
            if index == 1:
                return settings, ""
            data_dir = settings.data_dir
            if data_dir == default_data_dir(settings.node_name):
                data_dir = default_data_dir(name)
            return (dataclasses.replace(settings, node_name=name, data_dir=data_dir),
                    f"another node process on this host watching the same paths is named {settings.node_name}: "
                    f"this one is {name}")
    raise RuntimeError(f"too many node processes named {settings.node_name} on this host")


_NAME_LOCKS: list[int] = []
"""Descriptors holding this process's name lock; released when the process ends."""


async def serve(settings: Settings) -> None:
    """Run a node with everything it needs (scheduler, events, environments, health server) until stopped."""
    if settings.run_as is not None:
        lock_down(settings.data_dir)
    async with contextlib.AsyncExitStack() as stack:
        if not settings.scheduler_url:
            url = await stack.enter_async_context(
                embedded_scheduler(settings.data_dir, settings.embedded_scheduler_port, settings.scheduler_config))
            settings = dataclasses.replace(settings, scheduler_url=url)
        events = await stack.enter_async_context(
            open_events(settings.locations, settings.node_name, settings.project, settings.topic,
                        settings.subscription))
        node_environ = {**os.environ, **settings.file_secrets}  # (file secrets stay out of os.environ)
        node = Node(settings, events, Environments(settings.env_dir, node_environ,
                                                   cache_size=settings.env_cache_size,
                                                   share=settings.share_environments, share_key=settings.share_key,
                                                   secret_names=settings.secret_env, builders=settings.run_as,
                                                   on_evict=lambda key: node.evicted(key)))
        if settings.http_port:
            await stack.enter_async_context(health_server(node.problem, settings.http_host, settings.http_port))
        if settings.backlog_subscription:
            await stack.enter_async_context(Backlog(settings, node))
        await node.run()
