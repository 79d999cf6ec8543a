"""One run of one config generation: config -> environment -> luigi -> outcome -> claim and result.

Whatever the user submitted, a run ends with an outcome: bad input, a failed
build, a timeout or a bug in the node all become an error result naming the
problem. Only a storage outage (the result could not be written) or a
shutdown leaves the config in place, for the next scan.

Who takes part is `membership`'s business, the claim and the result file
`claim`'s, the log's copy in the bucket `log`'s; a `Run` strings them together.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from poltergust.config import MAX_FILE_SIZE, ConfigError, PipelineConfig, parse_environment, parse_pipeline
from poltergust.environments import Environments
from poltergust.errors import RunFailed
from poltergust.events import Event
from poltergust.launch.sandbox import spawner, work_directory
from poltergust.launch.warm import WarmPool
from poltergust.layout import RunKey, log_name, pipeline_name, run_tag, safe_name, split_url, under_prefix
from poltergust.luigid.graph import pipeline_assistants
from poltergust.node import metrics
from poltergust.node.log_format import CURRENT_RUN
from poltergust.node.notify import Notifier
from poltergust.run import claim
from poltergust.run.command import (
    Outcome,
    confirm_command,
    fast_start,
    luigi_command,
    luigi_environ,
    node_extra_environ,
    worker_id,
)
from poltergust.run.credentials import Impersonation, metadata_endpoint
from poltergust.run.log import LogMirror, RunLog
from poltergust.run.membership import CallForHelp, Membership
from poltergust.run.participation import Participation
from poltergust.run.worker_config import LuigiSettingError, write_run_config
from poltergust.secret_env import SecretEnv
from poltergust.settings import Settings
from poltergust.storage import Blob, NotFound, ObjectInfo, ObjectStore, StorageError, TooLarge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """Everything a run uses that outlives it, shared by the node's runs."""

    settings: Settings
    stores: Callable[[str], ObjectStore]
    """The node's store for a bucket (environment files may live in another bucket)."""
    environments: Environments
    notifier: Notifier
    secrets: SecretEnv
    slots: asyncio.Semaphore
    """The node's room for runs taking part; a run standing by holds none."""
    call_for_help: CallForHelp
    """Publishes a run's call for help (the node does it, in the background)."""
    warm: WarmPool | None = None


class Run:
    def __init__(self, key: RunKey, context: RunContext, found_at_start: bool = False,
                 info: ObjectInfo | None = None) -> None:
        self.key = key
        self.info = info
        """The config as an event or a listing described it: reading it then takes one request, not two."""
        self.context = context
        self.settings = context.settings
        self.store = context.stores(key.bucket)
        self.name = pipeline_name(key.name)
        self.membership = Membership(key, self.store, context.settings, context.slots, context.call_for_help,
                                     found_at_start)
        self.end = claim.Finish(key, self.store, context.settings.node_name, context.settings.claim_grace,
                                context.notifier)
        self.task: asyncio.Task[None] | None = None
        """The task running `execute`, set by the node that schedules it."""

    @property
    def taking_part(self) -> bool:
        """Running luigi (or about to), rather than standing by."""
        return self.membership.taking_part

    @property
    def finishing(self) -> bool:
        """Past luigi, claiming and writing the result: no event may interrupt that."""
        return self.end.finishing

    def hear(self, event: Event) -> None:
        """A call for help for this run (see `membership`)."""
        self.membership.hear(event)

    async def execute(self) -> None:
        key = self.key
        CURRENT_RUN.set((key.url(), key.generation))
        try:
            config = await self.store.read(key.name, key.generation, max_bytes=MAX_FILE_SIZE, known=self.info)
        except NotFound:
            log.debug("%s#%d is gone (finished, replaced or deleted): nothing to do", key.url(), key.generation)
            return
        except TooLarge as exc:
            with contextlib.suppress(StorageError):  # gone meanwhile: nothing to refuse
                info = await self.store.stat(key.name)
                if info.generation == key.generation:
                    await self.end.refuse(Blob(info, b""), f"{key.url()}: {exc}: a pipeline config is at most "
                                                           f"{MAX_FILE_SIZE} bytes")
            return
        except StorageError as exc:
            log.error("%s: cannot read the config, leaving it for the next scan: %s", key.url(), exc)
            return
        try:
            await self._join(config)
        except Exception:  # noqa: BLE001 -- one broken run must not take the node down
            log.exception("%s: unexpected error; the config stays for the next scan", key.url())

    async def _join(self, config: Blob) -> None:
        """Take part when membership says so; a config that cannot be parsed is reported by its starter."""
        try:
            parsed: PipelineConfig | None = parse_pipeline(config.data, self.key.url())
        except ConfigError:
            parsed = None
        await self.membership.join(parsed is not None and parsed.all_nodes, parsed.nodes if parsed else None,
                                   lambda: self._run(config))

    async def _run(self, config: Blob) -> None:
        key, node = self.key, self.settings.node_name
        runlog = RunLog(self.settings.data_dir / "logs" / f"{safe_name(self.name)}.{key.generation}.log")
        log_object = log_name(key.name, key.generation, node)
        mirror = LogMirror(runlog, self.store, log_object, self.settings.log_upload_interval)
        uploader = asyncio.create_task(mirror.keep_up())
        started = _now()
        metrics.RUNS_STARTED.inc()
        metrics.RUNS_ACTIVE.inc()
        log.info("%s: run of generation %d started", key.url(), key.generation)
        for secret in self.context.secrets.values():
            runlog.add_secret(secret)
        runlog.note(f"node {node} starts {key.url()} generation {key.generation}")
        try:
            try:
                outcome = await self._outcome(config, runlog)
            finally:
                uploader.cancel()
            if outcome.stood_down:
                runlog.note(f"this node's luigi failed ({outcome.reason}) while luigid could not say how the "
                            "pipeline stands; leaving the run to the node that started it")
                await mirror.upload()
                return
            result = claim.Result(
                outcome="done" if outcome.ok else "error", node=node, started=started, finished=_now(),
                reason=outcome.reason, log_tail=runlog.tail(), generation=key.generation,
                submitted=config.info.updated, logs=f"{key.bucket}/{log_object.rsplit('/', 1)[0]}/",
            )
            metrics.RUNS_FINISHED.labels(result.outcome).inc()
            runlog.note(f"finished locally: {result.outcome}{': ' + outcome.reason if outcome.reason else ''}")
            await mirror.upload()
            await self.end.finish(config, result, runlog.note, responsible=self.membership.started_here)
            await mirror.upload()
        except asyncio.CancelledError:
            runlog.note("run stopped on this node (shutdown, or the config was deleted, replaced or claimed)")
            await asyncio.shield(mirror.upload())
            raise
        finally:
            metrics.RUNS_ACTIVE.dec()
            runlog.close()

    async def _outcome(self, config_blob: Blob, runlog: RunLog) -> Outcome:
        """Everything between reading the config and luigi's final answer: the one place failures become outcomes."""
        config: PipelineConfig | None = None
        try:
            config = parse_pipeline(config_blob.data, self.key.url())
            return await asyncio.wait_for(self._with_retries(config, runlog, config_blob.info.updated),
                                          config.timeout)
        except RunFailed as exc:
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
        """Run the pipeline, trying again up to the config's `retries` times after a failure.

        A wrong config (`ConfigError`) fails at once: trying again cannot help.
        """
        for attempt in range(config.retries + 1):
            try:
                return await self._run_luigi(config, runlog, uploaded if attempt == 0 else None)
            except RunFailed as exc:
                if isinstance(exc, ConfigError) or attempt == config.retries:
                    raise
                runlog.note(f"run failed ({exc}); trying again, retry {attempt + 1} of {config.retries}")
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _run_luigi(self, config: PipelineConfig, runlog: RunLog, uploaded: datetime | None) -> Outcome:
        """Read the environment, get it built, and run luigi in it until the pipeline is done; else `RunFailed`."""
        key, context = self.key, self.context
        env_bucket, env_name = self._environment_object(config.environment)
        try:
            env_blob = await context.stores(env_bucket).read(env_name, max_bytes=MAX_FILE_SIZE)
        except NotFound:
            raise ConfigError(key.url(), f"environment file {config.environment} does not exist",
                              "environment") from None
        except TooLarge as exc:
            raise ConfigError(key.url(), f"environment file {exc}", "environment") from None
        except StorageError as exc:
            raise RunFailed(f"cannot read the environment file {config.environment}: {exc}") from None
        spec = parse_environment(env_blob.data, config.environment)
        for secret in context.secrets.values():
            runlog.add_secret(secret)
        env_path = await context.environments.get(spec, runlog)
        scheduler = self.settings.scheduler_url
        assistant = not self.membership.started_here and await pipeline_assistants(scheduler)
        worker = worker_id(run_tag(key), self.settings.node_name)
        command = luigi_command(env_path / "bin" / "python", config, scheduler, worker, assistant=assistant,
                                pure=assistant and self.membership.helping)
        env = luigi_environ(context.secrets.without_secrets(), spec, config,
                            node_extra_environ(self.settings.node_name, key.url(), key.generation))
        if uploaded is not None:
            metrics.PICKUP_SECONDS.observe(max(0.0, (_now() - uploaded).total_seconds()))
        async with contextlib.AsyncExitStack() as stack:
            run_as = None
            if self.settings.run_as is not None:
                run_as = await stack.enter_async_context(self.settings.run_as.lease(
                    lambda: runlog.note("waiting for a free pipeline user (all of --run-as-pool are taken)")))
            if self.settings.pipeline_service_account:
                env.update(await self._metadata_endpoint(stack, runlog))
            cwd = await stack.enter_async_context(
                work_directory(self.settings.data_dir / "work", safe_name(self.name), run_as))
            if run_as is not None:
                env["HOME"] = str(cwd)
            try:
                write_run_config(cwd, config.luigi, env)
            except LuigiSettingError as exc:
                raise ConfigError(key.url(), exc.problem, exc.key) from None
            warm = context.warm if config.warm else None
            start = (warm.launcher(env_path, spec, config, runlog.note, run_as,
                                   fast_start(config, scheduler, worker, assistant)) if warm is not None
                     else spawner(run_as))
            outcome = await Participation(command, env=env, cwd=cwd, runlog=runlog, scheduler_url=scheduler,
                                          outage_limit=self.settings.outage_limit, assistant=assistant,
                                          recruit=self.membership.recruit, start=start,
                                          confirm=confirm_command(env_path / "bin" / "python", config),
                                          responsible=self.membership.started_here).run()
        if not outcome.ok and not outcome.stood_down:
            raise RunFailed(outcome.reason)
        return outcome

    async def _metadata_endpoint(self, stack: contextlib.AsyncExitStack, runlog: RunLog) -> dict[str, str]:
        """The run's own metadata endpoint, with the pipeline service account's tokens (see `credentials`)."""
        minter = Impersonation(self.settings.pipeline_service_account, self.settings.iam_credentials_url,
                               self.context.secrets.environ.get("GCE_METADATA_HOST"))
        host = await stack.enter_async_context(metadata_endpoint(minter, self.settings.project, runlog.add_secret))
        runlog.note(f"Google credentials: {minter.email}, from a metadata endpoint at {host}")
        return {"GCE_METADATA_HOST": host, "GCE_METADATA_IP": host}

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


def _now() -> datetime:
    return datetime.now(timezone.utc)
