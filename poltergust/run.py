"""One run of one config generation: config -> environment -> luigi -> outcome -> claim and result.

Whatever the user submitted, a run ends with an outcome: bad input, a failed
build, a timeout or a bug in the node all become an error result naming the
problem. Only a storage outage (the result could not be written) or a
shutdown leaves the config in place, for the next scan.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timezone
from typing import Callable, Protocol

from . import joining, metrics, results
from .config import MAX_FILE_SIZE, ConfigError, PipelineConfig, parse_environment, parse_pipeline
from .environments import EnvironmentBuildError, Environments
from .events import Event
from .graph import pipeline_assistants
from .layout import RunKey, log_name, pipeline_name, run_tag, safe_name, split_url, under_prefix
from .logs import CURRENT_RUN
from .notify import Notifier
from .runlog import RunLog
from .sandbox import spawner, work_directory
from .warm import WarmPool
from .secret_env import SecretEnv
from .participate import Participation
from .runner import Outcome, luigi_command, luigi_environ, node_extra_environ, worker_id
from .settings import Settings
from .storage import Blob, NotFound, ObjectInfo, ObjectStore, StorageError, TooLarge

log = logging.getLogger(__name__)


class HelpCaller(Protocol):
    def call_for_help(self, key: RunKey, wanted: int, wave: int) -> None:
        """Tell every node that this run could use `wanted` more nodes (in the background)."""


class Run:
    def __init__(self, key: RunKey, settings: Settings, stores: Callable[[str], ObjectStore],
                 environments: Environments, notifier: Notifier, finishing: set[RunKey],
                 slots: asyncio.Semaphore, helpers: HelpCaller, secrets: SecretEnv,
                 warm: WarmPool | None = None) -> None:
        self.key = key
        self.settings = settings
        self.stores = stores
        """The node's store for a bucket (environment files may live in another bucket)."""
        self.store = stores(key.bucket)
        self.environments = environments
        self.notifier = notifier
        self.finishing = finishing
        """Runs of this node past luigi, claiming and writing their result (shared with the node, which forgets a
        run there when its task ends: the claim's own notifications may arrive while it writes its last log)."""
        self.slots = slots
        """The node's room for runs taking part; a run standing by holds none."""
        self.helpers = helpers
        self.secrets = secrets
        self.warm = warm
        self.name = pipeline_name(key.name)
        self.log_object = log_name(key.name, key.generation, settings.node_name)
        self._calls: asyncio.Queue[Event] = asyncio.Queue()
        self.taking_part = False
        self.found_at_start = False
        """Found by the node's first scan: this node may have started it before a crash."""
        self._recruiting: joining.Recruiting | None = None

    async def execute(self) -> None:
        key = self.key
        CURRENT_RUN.set((key.url(), key.generation))
        try:
            config = await self.store.read(key.name, key.generation, max_bytes=MAX_FILE_SIZE)
        except NotFound:
            log.debug("%s#%d is gone (finished, replaced or deleted): nothing to do", key.url(), key.generation)
            return
        except TooLarge as exc:
            with contextlib.suppress(StorageError):  # gone meanwhile: nothing to refuse
                info = await self.store.stat(key.name)
                if info.generation == key.generation:
                    await self._refuse(Blob(info, b""), f"{key.url()}: {exc}: a pipeline config is at most "
                                                        f"{MAX_FILE_SIZE} bytes")
            return
        except StorageError as exc:
            log.error("%s: cannot read the config, leaving it for the next scan: %s", key.url(), exc)
            return
        try:
            if results.claimed_outcome(config.info.metadata):
                await self._complete_claim(config)
            else:
                await self._join(config)
        except Exception:  # noqa: BLE001 -- one broken run must not take the node down
            log.exception("%s: unexpected error; the config stays for the next scan", key.url())

    def hear(self, event: Event) -> None:
        """A call for help for this run (see `joining`)."""
        self._calls.put_nowait(event)

    async def _join(self, config: Blob) -> None:
        """Start the run, or stand by until it wants help (see `joining`); `nodes: all` starts it everywhere."""
        key, node = self.key, self.settings.node_name
        try:
            parsed: PipelineConfig | None = parse_pipeline(config.data, key.url())
        except ConfigError:
            parsed = None  # the starting node reports it
        if parsed is not None and parsed.all_nodes:
            async with self.slots:
                await self._take_part(config)
            return
        async with self.slots:
            marker = await joining.take_start(self.store, key, node, restarted=self.found_at_start)
            if marker is not None:
                log.info("%s: this node starts generation %d", key.url(), key.generation)
                await self._take_part(config, marker=marker, limit=parsed.nodes if parsed else None)
                return
        log.info("%s: started by another node; standing by to help", key.url())
        # Look at the starter's marker as often as it is refreshed: a dead starter's run waits at most that long more.
        check = min(self.settings.rescan_interval, joining.refresh_interval(self.settings.start_stale_after))
        while True:
            try:
                call = await asyncio.wait_for(self._calls.get(), check)
            except asyncio.TimeoutError:
                if not await self._still_wanted():
                    return
                marker = await joining.take_over_if_stale(self.store, key, node,
                                                          self.settings.start_stale_after)
                if marker is not None:
                    log.warning("%s: its starting node stopped showing signs of life; taking the run over", key.url())
                    async with self.slots:
                        await self._take_part(config, marker=marker, limit=parsed.nodes if parsed else None)
                    return
                continue
            if self.slots.locked():
                continue  # no room on this node: another node will answer
            if await joining.take_helper_place(self.store, key, node, call.wave, call.wanted):
                log.info("%s: joining the run (call for help %d)", key.url(), call.wave)
                async with self.slots:
                    await self._take_part(config)
                return

    async def _still_wanted(self) -> bool:
        """Whether this generation of the config is still waiting for its result (its events may be lost)."""
        try:
            return (await self.store.stat(self.key.name)).generation == self.key.generation
        except NotFound:
            return False

    async def _take_part(self, config: Blob, marker: ObjectInfo | None = None, limit: int | None = None) -> None:
        """This node's part: environment, luigi, and the race to finish; the starter also keeps its marker."""
        self.taking_part = True
        refresher = asyncio.create_task(self._keep_marker(marker)) if marker is not None else None
        self._recruiting = joining.Recruiting(limit) if marker is not None else None
        try:
            await self._run(config)
        except asyncio.CancelledError:
            if marker is not None:  # stopping before the end: let another node start it now
                await asyncio.shield(self._release(marker))
            raise
        finally:
            if refresher is not None:
                refresher.cancel()

    async def _release(self, marker: ObjectInfo) -> None:
        try:
            await joining.release_start(self.store, marker)
        except StorageError as exc:
            log.warning("%s: could not release the start marker (it goes stale instead): %s", self.key.url(), exc)

    async def _keep_marker(self, marker: ObjectInfo) -> None:
        while True:
            await asyncio.sleep(joining.refresh_interval(self.settings.start_stale_after))
            try:
                refreshed = await joining.refresh_start(self.store, self.key, self.settings.node_name, marker)
            except StorageError as exc:
                log.warning("%s: could not refresh the start marker: %s", self.key.url(), exc)
                continue
            if refreshed is None:
                log.warning("%s: another node took this run over; both go on, one result is written", self.key.url())
                return
            marker = refreshed

    def _recruit(self, takeable: int) -> None:
        """Ask other nodes to join while tasks wait that nobody runs (the starter only, with backoff)."""
        recruiting = self._recruiting
        if recruiting is None or not recruiting.due():
            return
        wanted = recruiting.places(takeable)
        if wanted:
            self.helpers.call_for_help(self.key, wanted, recruiting.wave)

    async def _run(self, config: Blob) -> None:
        key, node = self.key, self.settings.node_name
        runlog = RunLog(self.settings.data_dir / "logs" / f"{safe_name(self.name)}.{key.generation}.log")
        uploader = asyncio.create_task(self._upload_log_periodically(runlog))
        started = _now()
        metrics.RUNS_STARTED.inc()
        metrics.RUNS_ACTIVE.inc()
        log.info("%s: run of generation %d started", key.url(), key.generation)
        for secret in self.secrets.values():
            runlog.add_secret(secret)
        runlog.note(f"node {node} starts {key.url()} generation {key.generation}")
        try:
            try:
                outcome = await self._outcome(config, runlog)
            finally:
                uploader.cancel()
            result = results.Result(
                outcome="done" if outcome.ok else "error", node=node, started=started, finished=_now(),
                reason=outcome.reason, log_tail=runlog.tail(), generation=key.generation,
                submitted=config.info.updated,
                logs=f"{key.bucket}/{self.log_object.rsplit('/', 1)[0]}/",
            )
            metrics.RUNS_FINISHED.labels(result.outcome).inc()
            runlog.note(f"finished locally: {result.outcome}{': ' + outcome.reason if outcome.reason else ''}")
            await self._upload_log(runlog)
            await self._finish(config, result, runlog)
            await self._upload_log(runlog)
        except asyncio.CancelledError:
            runlog.note("run stopped on this node (shutdown, or the config was deleted, replaced or claimed)")
            await asyncio.shield(self._upload_log(runlog))
            raise
        finally:
            metrics.RUNS_ACTIVE.dec()
            runlog.close()

    async def _outcome(self, config_blob: Blob, runlog: RunLog) -> Outcome:
        """Everything between reading the config and luigi's final answer; never raises for bad input."""
        config: PipelineConfig | None = None
        try:
            config = parse_pipeline(config_blob.data, self.key.url())
            return await asyncio.wait_for(self._with_retries(config, runlog, config_blob.info.updated),
                                          config.timeout)
        except ConfigError as exc:
            runlog.note(f"error: {exc}")
            return Outcome(False, runlog.mask(str(exc)))
        except asyncio.TimeoutError:
            reason = f"timed out after {config.timeout:g}s (the config's timeout)" if config else "timed out"
            runlog.note(reason)
            return Outcome(False, reason)
        except Exception as exc:  # noqa: BLE001 -- a bug here must still end the run visibly
            log.exception("%s: unexpected error", self.key.url())
            reason = runlog.mask(f"internal error in the node: {type(exc).__name__}: {exc}")
            runlog.note(reason)
            return Outcome(False, reason)

    async def _with_retries(self, config: PipelineConfig, runlog: RunLog, uploaded: datetime) -> Outcome:
        """Run the pipeline, trying again up to the config's `retries` times after a failure."""
        outcome = await self._run_luigi(config, runlog, uploaded)
        for retry in range(1, config.retries + 1):
            if outcome.ok:
                break
            runlog.note(f"run failed ({outcome.reason}); trying again, retry {retry} of {config.retries}")
            outcome = await self._run_luigi(config, runlog, None)
        return outcome

    async def _run_luigi(self, config: PipelineConfig, runlog: RunLog, uploaded: datetime | None) -> Outcome:
        """Read the environment, get it built, and run luigi in it until luigi settles."""
        key = self.key
        env_bucket, env_name = self._environment_object(config.environment)
        try:
            env_blob = await self.stores(env_bucket).read(env_name, max_bytes=MAX_FILE_SIZE)
        except NotFound:
            raise ConfigError(key.url(), f"environment file {config.environment} does not exist",
                              "environment") from None
        except TooLarge as exc:
            raise ConfigError(key.url(), f"environment file {exc}", "environment") from None
        except StorageError as exc:
            return Outcome(False, runlog.mask(f"cannot read the environment file {config.environment}: {exc}"))
        spec = parse_environment(env_blob.data, config.environment)
        for secret in self.secrets.values():
            runlog.add_secret(secret)
        try:
            env_path = await self.environments.get(spec, runlog)
        except EnvironmentBuildError as exc:
            runlog.note(f"error: {exc}")
            return Outcome(False, runlog.mask(str(exc)))
        scheduler = self.settings.scheduler_url
        assistant = self._recruiting is None and await pipeline_assistants(scheduler)
        command = luigi_command(env_path / "bin" / "python", config, scheduler,
                                worker_id(run_tag(key), self.settings.node_name), assistant=assistant)
        env = luigi_environ(self.secrets.without_secrets(), spec, config,
                            node_extra_environ(self.settings.node_name, key.url(), key.generation))
        if uploaded is not None:
            metrics.PICKUP_SECONDS.observe(max(0.0, (_now() - uploaded).total_seconds()))
        run_as = self.settings.run_as
        async with work_directory(self.settings.data_dir / "work", safe_name(self.name), run_as) as cwd:
            if run_as is not None:
                env["HOME"] = str(cwd)
            warm = self.warm is not None and config.warm
            start = self.warm.runner(env_path, spec, config, runlog.note) if warm else spawner(run_as)
            return await Participation(command, env=env, cwd=cwd, runlog=runlog, scheduler_url=scheduler,
                                       outage_limit=self.settings.outage_limit, assistant=assistant,
                                       recruit=self._recruit, start=start).run()

    def _environment_object(self, url: str) -> tuple[str, str]:
        allowed = self.settings.environment_prefixes
        try:
            bucket, name = split_url(url)
        except ValueError as exc:
            raise ConfigError(self.key.url(), str(exc), "environment") from None
        if not any(under_prefix(url, prefix) for prefix in allowed):
            raise ConfigError(self.key.url(), f"{url} is outside the allowed environment prefixes "
                              f"({', '.join(allowed)})", "environment")
        return bucket, name

    async def _finish(self, config: Blob, result: results.Result, runlog: RunLog) -> None:
        """Claim the run and write its result, unless another node did so first."""
        key = self.key
        self.finishing.add(key)
        try:
            won = await results.finish(self.store, config, result)
            if not won:
                runlog.note("another node finished this run first (claim got HTTP 412); nothing to write")
                log.info("%s: claim lost (HTTP 412): another node finished generation %d", key.url(), key.generation)
                return
            runlog.note(f"claimed the run; wrote {self.name}.{result.outcome}.yaml")
            self._claimed(result)
        except StorageError as exc:
            runlog.note(f"could not write the result: {exc}; the config stays for the next scan")
            log.error("%s: could not finish: %s", key.url(), exc)

    async def _refuse(self, config: Blob, reason: str) -> None:
        """End a run that cannot even start (its config cannot be read) as an error, without running anything."""
        now = _now()
        result = results.Result("error", self.settings.node_name, now, now, reason=reason,
                                generation=self.key.generation)
        log.error("%s", reason)
        self.finishing.add(self.key)  # the claim's own notifications must not stop this
        try:
            if await results.finish(self.store, config, result):
                self._claimed(result)
        except StorageError as exc:
            log.error("%s: could not write the error result: %s", self.key.url(), exc)

    def _claimed(self, result: results.Result) -> None:
        metrics.RUNS_CLAIMED.labels(result.outcome).inc()
        log.info("%s: %s (claimed by this node)", self.key.url(), result.outcome)
        self.notifier.send({
            "pipeline_url": self.key.url(), "outcome": result.outcome, "node": result.node,
            "started": result.started.isoformat(), "finished": result.finished.isoformat(), "reason": result.reason,
        })

    async def _complete_claim(self, config: Blob) -> None:
        """Complete a run another node claimed but did not finish (it may have crashed)."""
        key = self.key
        if any((k.bucket, k.name) == (key.bucket, key.name) for k in self.finishing):
            return  # this node's own claim, being completed right now
        info = config.info
        claimer = info.metadata.get(results.NODE_KEY, "?")
        age = (_now() - info.updated).total_seconds()
        if claimer != self.settings.node_name and age < self.settings.claim_grace:
            return  # the claimer is most likely writing the result right now
        log.info("%s: completing the run claimed by %s %.0fs ago", key.url(), claimer, age)
        try:
            if not await results.complete(self.store, info, config.data):
                return  # the claimer (or another node) completed it meanwhile
        except StorageError as exc:
            log.error("%s: could not complete the claimed run: %s", key.url(), exc)
            return
        result = results.Result.from_document(config.data, info.metadata)
        if result is not None:
            self._claimed(result)

    # -- logs --------------------------------------------------------------

    async def _upload_log_periodically(self, runlog: RunLog) -> None:
        """Show the log at once (the run has started here), then refresh it rarely: every write costs a request."""
        uploaded = -1
        while True:
            if runlog.version != uploaded:
                uploaded = runlog.version
                await self._upload_log(runlog)
            await asyncio.sleep(self.settings.log_upload_interval)

    async def _upload_log(self, runlog: RunLog) -> None:
        try:
            await self.store.write(self.log_object, runlog.read())
        except (StorageError, OSError) as exc:
            log.warning("could not upload the log %s: %s", self.log_object, exc)


def _now() -> datetime:
    return datetime.now(timezone.utc)
