"""One node: its lifecycle, the runs it has in flight, and how each run ends.

Lifecycle: attach the subscription, then scan (so no upload falls between
the two), then serve events and rescan periodically until told to stop. A run
is identified by (bucket, object name, generation): duplicate events and
rescans of a run already in flight are no-ops, and a delete or overwrite of
that generation cancels that run only.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import signal
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, NamedTuple

from . import metrics, results
from .config import ConfigError, PipelineConfig, parse_environment, parse_pipeline
from .environments import EnvironmentBuildError, Environments
from .events import Event, EventSource, is_config_name
from .logs import CURRENT_RUN
from .notify import NotifyTarget, notify
from .runlog import RunLog
from .runner import Outcome, luigi_command, luigi_environ, node_extra_environ, run_until_settled
from .storage import Blob, Location, NotFound, ObjectStore, StorageError, split_url
from .subprocesses import run_streaming
from .warm import WarmPool

log = logging.getLogger(__name__)


@dataclass
class Settings:
    locations: list[Location]
    scheduler_url: str
    node_name: str
    data_dir: Path
    env_dir: Path
    embedded_scheduler_port: int = 8082
    """Used only when `scheduler_url` is empty: the node then starts or joins a local luigid."""
    max_concurrent: int = 4
    rescan_interval: float = 300.0
    outage_limit: float = 600.0
    """How long a storage or scheduler outage is ridden out before a run gives up."""
    claim_grace: float = 60.0
    """How long a claim by another node is left to that node before anyone else completes it."""
    log_upload_interval: float = 5.0
    notify: NotifyTarget | None = None
    allowed_environment_prefixes: list[str] = field(default_factory=list)
    """URL prefixes environment files may come from; empty means the pipelines' own buckets."""
    warm: bool = True
    """Start luigi from a warm interpreter per environment (see `warm`) rather than afresh each time."""
    warm_idle_seconds: float = 600.0
    warm_prestart: bool = False


class RunKey(NamedTuple):
    bucket: str
    name: str
    generation: int

    def url(self) -> str:
        return f"{self.bucket}/{self.name}"


class Node:
    def __init__(
        self, settings: Settings, events: EventSource,
        open_store: Callable[[str], ObjectStore], environments: Environments,
    ) -> None:
        self.settings = settings
        self.events = events
        self._open_store = open_store
        self._stores: dict[str, ObjectStore] = {}
        self.environments = environments
        self._runs: dict[RunKey, asyncio.Task[None]] = {}
        self._finishing: set[RunKey] = set()
        """Runs past luigi, claiming and writing their result: no event may interrupt that."""
        self._slots = asyncio.Semaphore(settings.max_concurrent)
        self._notifications: set[asyncio.Task[bool]] = set()
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        """Set once the subscription is attached and the first scan is done."""
        self.warm = WarmPool(settings.data_dir / "warm", environments.environ, idle_seconds=settings.warm_idle_seconds,
                             prestart=settings.warm_prestart) if settings.warm else None
        if self.warm is not None:
            environments.on_evict = self.warm.evicted

    # -- lifecycle ---------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        metrics.watch_event_loop(loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        log.info("node %s starting: %s, scheduler %s", self.settings.node_name,
                 ", ".join(loc.url() for loc in self.settings.locations), self.settings.scheduler_url)
        try:
            if not await self._attach():
                return
            background = [asyncio.create_task(self._scan_periodically()), asyncio.create_task(self._serve_events()),
                          asyncio.create_task(self._keep_events_attached())]
            await self._stopping.wait()
            log.info("stopping: taking no new work, stopping %d run(s); their configs stay for the next scan",
                     len(self._runs))
            for task in background:
                task.cancel()
            for task in list(self._runs.values()):
                task.cancel()
            await asyncio.gather(*background, *self._runs.values(), return_exceptions=True)
            if self._notifications:
                await asyncio.wait(self._notifications, timeout=10)
        finally:
            if self.warm is not None:
                await self.warm.close()
            await self.events.close()
            for store in self._stores.values():
                await store.close()
            log.info("node %s stopped", self.settings.node_name)

    def stop(self) -> None:
        self._stopping.set()

    async def _attach(self) -> bool:
        """Attach the event stream, waiting (not failing) while Pub/Sub cannot be reached; False if stopped."""
        delay = 1.0
        while True:
            try:
                await self.events.attach()
                return True
            except Exception as exc:  # noqa: BLE001 -- any failure here is worth another try
                metrics.EVENT_ERRORS.labels(type(exc).__name__).inc()
                log.error("cannot attach the event stream (%s); trying again in %.0fs", exc, delay)
                await self.events.close()
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
                return False
            except asyncio.TimeoutError:
                delay = min(delay * 2, 30.0)

    def store(self, bucket: str) -> ObjectStore:
        if bucket not in self._stores:
            self._stores[bucket] = self._open_store(bucket)
        return self._stores[bucket]

    # -- finding work ------------------------------------------------------

    async def _scan_periodically(self) -> None:
        while True:
            try:
                await self.scan()
                if not self.ready.is_set():
                    self.ready.set()
                    log.info("ready: subscribed and scanned, %d run(s) scheduled", len(self._runs))
            except StorageError as exc:
                log.error("scan failed, will retry at the next rescan: %s", exc)
            await asyncio.sleep(self.settings.rescan_interval)

    async def scan(self) -> None:
        """Schedule every config under the prefixes (the safety net for lost events)."""
        for location in self.settings.locations:
            for info in await self.store(location.bucket).list(location.prefix):
                if is_config_name(info.name, location.prefix):
                    self._schedule(RunKey(location.bucket, info.name, info.generation))

    async def _keep_events_attached(self, check_every: float = 5.0) -> None:
        """Re-attach a broken event stream, then rescan for whatever it missed meanwhile."""
        while True:
            await asyncio.sleep(check_every)
            broken = self.events.broken
            if broken is None:
                continue
            log.error("event stream broken (%s); re-attaching", broken)
            metrics.EVENT_ERRORS.labels(type(broken).__name__).inc()
            try:
                await self.events.close()
                await self.events.attach()
                await self.scan()
            except Exception as exc:  # noqa: BLE001 -- keep trying; the rescan still runs meanwhile
                log.error("could not re-attach the event stream: %s", exc)

    async def _serve_events(self) -> None:
        while True:
            event = await self.events.get()
            self.handle(event)

    def handle(self, event: Event) -> None:
        key = RunKey(event.bucket, event.name, event.generation)
        log.debug("event %s %s#%d%s", event.kind, key.url(), key.generation,
                  " (already in progress)" if key in self._runs else "")
        if event.kind == "finalize":
            self._schedule(key)
        elif key in self._runs and key not in self._finishing:
            why = f"replaced by generation {event.replaced_by}" if event.replaced_by else "deleted"
            log.info("%s generation %d was %s: stopping its run", key.url(), key.generation, why)
            self._runs[key].cancel()

    def _schedule(self, key: RunKey) -> None:
        if key in self._runs or self._stopping.is_set():
            return
        task = asyncio.create_task(self._execute(key), name=f"run {key.url()}#{key.generation}")
        self._runs[key] = task
        task.add_done_callback(lambda _: self._runs.pop(key, None))

    # -- one run -----------------------------------------------------------

    async def _execute(self, key: RunKey) -> None:
        CURRENT_RUN.set((key.url(), key.generation))
        async with self._slots:
            store = self.store(key.bucket)
            try:
                config = await store.read(key.name, key.generation)
            except NotFound:
                log.debug("%s#%d is gone (finished, replaced or deleted): nothing to do", key.url(), key.generation)
                return
            except StorageError as exc:
                log.error("%s: cannot read the config, leaving it for the next scan: %s", key.url(), exc)
                return
            try:
                if results.claimed_outcome(config.info.metadata):
                    await self._complete_claim(key, store, config)
                else:
                    await self._run(key, store, config)
            except Exception:  # noqa: BLE001 -- one broken run must not take the node down
                log.exception("%s: unexpected error; the config stays for the next scan", key.url())

    async def _run(self, key: RunKey, store: ObjectStore, config: Blob) -> None:
        name = results.pipeline_name(key.name)
        runlog = RunLog(self.settings.data_dir / "logs" / f"{_safe(name)}.{key.generation}.log")
        log_object = results.log_name(key.name, self.settings.node_name)
        uploader = asyncio.create_task(self._upload_log_periodically(store, log_object, runlog))
        started = _now()
        metrics.RUNS_STARTED.inc()
        metrics.RUNS_ACTIVE.inc()
        log.info("%s: run of generation %d started", key.url(), key.generation)
        runlog.note(f"node {self.settings.node_name} starts {key.url()} generation {key.generation}")
        try:
            try:
                outcome = await self._attempt(key, config, runlog)
            finally:
                uploader.cancel()
            result = results.Result(
                outcome="done" if outcome.ok else "error", node=self.settings.node_name,
                started=started, finished=_now(), reason=outcome.reason, log_tail=runlog.tail(),
            )
            metrics.RUNS_FINISHED.labels(result.outcome).inc()
            runlog.note(f"finished locally: {result.outcome}{': ' + outcome.reason if outcome.reason else ''}")
            await self._upload_log(store, log_object, runlog)
            await self._finish(key, store, config, result, runlog)
            await self._upload_log(store, log_object, runlog)
        except asyncio.CancelledError:
            runlog.note("run stopped on this node (shutdown, or the config was deleted, replaced or claimed)")
            await asyncio.shield(self._upload_log(store, log_object, runlog))
            raise
        finally:
            metrics.RUNS_ACTIVE.dec()
            runlog.close()

    async def _attempt(self, key: RunKey, config_blob: Blob, runlog: RunLog) -> Outcome:
        """Everything between reading the config and luigi's final answer; never raises for bad input."""
        try:
            config = parse_pipeline(config_blob.data, key.url())
            return await asyncio.wait_for(self._attempts(key, config, runlog, config_blob.info.updated), config.timeout)
        except ConfigError as exc:
            runlog.note(f"error: {exc}")
            return Outcome(False, runlog.mask(str(exc)))
        except asyncio.TimeoutError:
            reason = f"timed out after {config.timeout:g}s (the config's timeout)"
            runlog.note(reason)
            return Outcome(False, reason)
        except Exception as exc:  # noqa: BLE001 -- a bug here must still end the run visibly
            log.exception("%s: unexpected error", key.url())
            reason = runlog.mask(f"internal error in the node: {type(exc).__name__}: {exc}")
            runlog.note(reason)
            return Outcome(False, reason)

    async def _attempts(self, key: RunKey, config: PipelineConfig, runlog: RunLog, uploaded: datetime) -> Outcome:
        """Run the pipeline, trying again up to the config's `retries` times after a failure."""
        outcome = await self._attempt_once(key, config, runlog, uploaded)
        for retry in range(1, config.retries + 1):
            if outcome.ok:
                break
            runlog.note(f"run failed ({outcome.reason}); trying again, retry {retry} of {config.retries}")
            outcome = await self._attempt_once(key, config, runlog, None)
        return outcome

    async def _attempt_once(self, key: RunKey, config: PipelineConfig, runlog: RunLog,
                            uploaded: datetime | None) -> Outcome:
        env_bucket, env_name = self._environment_object(config.environment, key)
        try:
            env_blob = await self.store(env_bucket).read(env_name)
        except NotFound:
            raise ConfigError(key.url(), f"environment file {config.environment} does not exist", "environment") from None
        except StorageError as exc:
            return Outcome(False, f"cannot read the environment file {config.environment}: {exc}")
        spec = parse_environment(env_blob.data, config.environment)
        for secret in self.environments.secrets(spec):
            runlog.add_secret(secret)
        try:
            env_path = await self.environments.get(spec, runlog)
        except EnvironmentBuildError as exc:
            runlog.note(f"error: {exc}")
            return Outcome(False, runlog.mask(str(exc)))
        command = luigi_command(env_path / "bin" / "python", config, self.settings.scheduler_url)
        env = luigi_environ(self.environments.environ, spec, config,
                            node_extra_environ(self.settings.node_name, key.url(), key.generation))
        if uploaded is not None:
            metrics.PICKUP_SECONDS.observe(max(0.0, (_now() - uploaded).total_seconds()))
        run = self.warm.runner(env_path, spec, config, runlog.note) if self.warm and config.warm else run_streaming
        return await run_until_settled(
            command, env=env, cwd=self.settings.data_dir / "work" / _safe(results.pipeline_name(key.name)),
            runlog=runlog, scheduler_url=self.settings.scheduler_url, outage_limit=self.settings.outage_limit, run=run,
        )

    def _environment_object(self, url: str, key: RunKey) -> tuple[str, str]:
        allowed = self.settings.allowed_environment_prefixes or [f"{loc.bucket}/" for loc in self.settings.locations]
        try:
            bucket, name = split_url(url)
        except ValueError as exc:
            raise ConfigError(key.url(), str(exc), "environment") from None
        if not any(f"{bucket}/{name}".startswith(prefix) for prefix in allowed):
            raise ConfigError(key.url(), f"{url} is outside the allowed environment prefixes ({', '.join(allowed)})",
                              "environment")
        return bucket, name

    async def _finish(self, key: RunKey, store: ObjectStore, config: Blob, result: results.Result,
                      runlog: RunLog) -> None:
        body = results.result_document(config.data, result)
        self._finishing.add(key)
        try:
            claimed = await results.claim(store, config, body, result.outcome, self.settings.node_name)
            if claimed is None:
                runlog.note("another node finished this run first (claim got HTTP 412); nothing to write")
                log.info("%s: claim lost (HTTP 412): another node finished generation %d",
                         key.url(), key.generation)
                return
            runlog.note(f"claimed the run; writing {results.pipeline_name(key.name)}.{result.outcome}.yaml")
            await results.complete(store, claimed, body)
            metrics.RUNS_CLAIMED.labels(result.outcome).inc()
            log.info("%s: %s (claimed by this node)", key.url(), result.outcome)
            self._notify(key, result)
        except StorageError as exc:
            runlog.note(f"could not write the result: {exc}; the config stays for the next scan")
            log.error("%s: could not finish: %s", key.url(), exc)
        finally:
            self._finishing.discard(key)

    def _notify(self, key: RunKey, result: results.Result) -> None:
        """Send the completion notification in the background: the endpoint must not hold up the node."""
        if self.settings.notify is None:
            return
        task = asyncio.create_task(notify(self.settings.notify, {
            "pipeline_url": key.url(), "outcome": result.outcome, "node": result.node,
            "started": result.started.isoformat(), "finished": result.finished.isoformat(), "reason": result.reason,
        }))
        self._notifications.add(task)
        task.add_done_callback(self._notifications.discard)

    async def _complete_claim(self, key: RunKey, store: ObjectStore, config: Blob) -> None:
        """Complete a run another node claimed but did not finish (it may have crashed)."""
        if any((k.bucket, k.name) == (key.bucket, key.name) for k in self._finishing):
            return  # this node's own claim, being completed right now
        info = config.info
        claimer = info.metadata.get(results.NODE_KEY, "?")
        age = (_now() - info.updated).total_seconds()
        if claimer != self.settings.node_name and age < self.settings.claim_grace:
            return  # the claimer is most likely writing the result right now
        log.info("%s: completing the run claimed by %s %.0fs ago", key.url(), claimer, age)
        try:
            await results.complete(store, info, config.data)
        except StorageError as exc:
            log.error("%s: could not complete the claimed run: %s", key.url(), exc)

    # -- logs --------------------------------------------------------------

    async def _upload_log_periodically(self, store: ObjectStore, name: str, runlog: RunLog) -> None:
        uploaded = -1
        while True:
            await asyncio.sleep(self.settings.log_upload_interval)
            if runlog.version != uploaded:
                uploaded = runlog.version
                await self._upload_log(store, name, runlog)

    async def _upload_log(self, store: ObjectStore, name: str, runlog: RunLog) -> None:
        try:
            await store.write(name, runlog.read())
        except (StorageError, OSError) as exc:
            log.warning("could not upload the log %s: %s", name, exc)


def _safe(name: str) -> str:
    """A pipeline name made safe as a single local file name (object names may hold anything)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"
    if cleaned == name and len(name) <= 100:
        return name
    return f"{cleaned[:100]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _now() -> datetime:
    return datetime.now(timezone.utc)
