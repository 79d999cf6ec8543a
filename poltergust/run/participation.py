"""A node's part in one pipeline: run luigi, and watch the graph in luigid until the pipeline is over.

Several nodes' luigi workers share one graph through luigid. A worker exits
when it has nothing left to do, which says little about the pipeline, so
the outcome is read from luigid (see `graph`): done when the root task is
DONE; an error, naming the failed tasks, once a task FAILED or is DISABLED and
nothing else runs or could be taken; while others still run tasks this node
waits (asking luigid, not starting luigi again) and takes part again when a
task is free for it.
Without a graph (a plain luigid that pruned it, a root that never reached the
scheduler), luigi's exit codes decide, as they would for a single process.
When nothing can move because an external task's data is missing or a
task's complete() raised, the run ends as the error a single luigi process
would exit with (the nodes' kept-alive workers would otherwise wait for ever).
A scheduler that cannot be reached, or accepts connections but does not
answer luigi in time (an overloaded luigid), is waited for (up to
`outage_limit`) rather than counted as a failure of the pipeline; a joined
node whose luigi fails while luigid cannot tell the graph's state stands
down instead.
"""
from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

from poltergust.backoff import Backoff
from poltergust.launch import assistant
from poltergust.launch.processes import run_streaming
from poltergust.launch.sandbox import Launcher
from poltergust.luigid.graph import Luigid, SchedulerError, Tasks, Verdict
from poltergust.masking import redact_url
from poltergust.node import metrics
from poltergust.run.command import (
    CRASHED,
    MISSING_DATA,
    NOT_COMPLETE,
    NOT_RUN,
    OTHERS_RUNNING,
    REASONS,
    SCHEDULING_ERROR,
    Outcome,
    exit_reason,
    last_error,
)
from poltergust.run.log import RunLog

log = logging.getLogger(__name__)

ROOT_LINE = re.compile(r"Informed scheduler that task\s+(\S+)\s+has status|"
                       + re.escape(assistant.ROOT_PREFIX) + r"(\S+)")
"""luigi's first such line is about the root task: the one place its task id shows before it runs (an assistant,
which schedules nothing, says it itself)."""
FAILED_LINE = re.compile(r"Informed scheduler that task\s+(\S+)\s+has status\s+FAILED")
DONE_LINE = re.compile(r"Informed scheduler that task\s+(\S+)\s+has status\s+DONE")
PENDING_LINE = re.compile(r"Informed scheduler that task\s+\S+\s+has status\s+PENDING")
SCHEDULED_LINE = "Done scheduling tasks"
"""What luigi logs once it has added the whole graph (both its command line and the fast start)."""
SCHEDULER_SILENT = re.compile(r"RPCError: Errors \(\d+ attempts?\) when connecting to remote scheduler")
"""luigi gave up on the scheduler: its calls failed or went unanswered, whatever the pipeline."""
WATCH_SECONDS = 1.0
"""How often a node asks luigid about its pipeline while it takes part (one request each time); it also asks at
once when its luigi reports a failure, a starter's luigi has scheduled a graph wider than its root, or an
assistant's has run the root task."""
EXIT_GRACE_SECONDS = 30.0
"""How long a worker that is not an assistant gets to exit by itself once the pipeline is over (its root task's
`complete()` is checked meanwhile: a DONE this node did not report and the task does not confirm ends it at once)."""
STUCK_CHECKS = 3
"""Verdicts in a row that say nothing can move before the run ends (luigid's graph changes a task at a time)."""
MAX_NOT_RUN = 5
"""Consecutive runs with nothing to do and nothing running elsewhere before giving up."""

Recruit = Callable[[int], None]
"""Asks that many more nodes to join the pipeline (the node that started it does)."""


class Participation:
    def __init__(self, command: list[str], *, env: Mapping[str, str], cwd: Path, runlog: RunLog,
                 scheduler_url: str, outage_limit: float, assistant: bool = False, recruit: Recruit | None = None,
                 start: Launcher = run_streaming, max_backoff: float = 30.0,
                 confirm: list[str] | None = None, responsible: bool = True) -> None:
        self.command = command
        self.env = env
        self.cwd = cwd
        self.runlog = runlog
        self.scheduler_url = scheduler_url
        self.outage_limit = outage_limit
        self.assistant = assistant
        """luigi runs as an assistant: it never exits by itself, the pipeline's end stops it."""
        self.recruit = recruit
        self.start = start
        """Starts luigi: `run_streaming`, or a warm pool's runner (see `warm`)."""
        self.max_backoff = max_backoff
        self.confirm = confirm
        """Checks the root task's own `complete()` before luigid's DONE is believed (see `command.confirm_command`)."""
        self.responsible = responsible
        """This node started the run. A node that only joined it leaves the pipeline's fate to luigid's graph or
        to the starter: its own luigi failing (an overloaded luigid, a local problem) says nothing of the
        pipeline, which the starter's luigi meets too if the pipeline itself is broken."""
        self.luigid = Luigid(scheduler_url)
        self.root: str | None = None
        self.failed_here: set[str] = set()
        """Tasks this node's luigi reported FAILED (luigid may already have queued them again)."""
        self.done_here: set[str] = set()
        """Tasks this node's luigi reported DONE."""
        self.confirmation: Outcome | None = None
        """What the root task's `complete()` said of luigid's DONE, once checked."""

    async def run(self) -> Outcome:
        try:
            return await self._run()
        finally:
            await self.luigid.close()

    async def _run(self) -> Outcome:
        attempt = 0
        not_run = 0
        silent_since: float | None = None
        """Since when luigi's attempts end, one after another, because luigid did not answer it."""
        loop = asyncio.get_running_loop()
        backoff = Backoff(first=1.0, cap=self.max_backoff, jitter=(0.8, 1.2))
        while True:
            if not await wait_for_scheduler(self.scheduler_url, self.runlog, self.outage_limit):
                return Outcome(False, f"the luigi scheduler at {redact_url(self.scheduler_url)} was unreachable for "
                                      f"{self.outage_limit:.0f}s")
            attempt += 1
            if attempt > 1:
                metrics.LUIGI_RERUNS.inc()
            self.runlog.note(f"luigi attempt {attempt}: " + " ".join(self.command[1:]))
            code, settled = await self._luigi_while_watching()
            if code is not None:
                self.runlog.note(f"luigi exited with code {code}")
            if code == 0:
                return Outcome(True)  # luigi itself saw the root task complete
            reason = exit_reason(code, self.runlog) if code is not None else ""
            silent = code == CRASHED and SCHEDULER_SILENT.search(reason) is not None
            silent_since = (loop.time() if silent_since is None else silent_since) if silent else None
            if settled is not None and settled.state == "stuck":
                return Outcome(False, self._stuck_reason(settled))
            current = settled or await self._verdict()
            if current.state == "busy":
                current = await self._wait_while_others_work()
                if current.state == "busy":
                    continue  # a task is free for this node: take part again
            if current.state in ("done", "failed"):
                outcome = await self._outcome(current)
                if outcome is not None:
                    return outcome
                await asyncio.sleep(backoff.next())
                continue
            assert code is not None
            if code in (OTHERS_RUNNING, NOT_RUN):
                not_run = not_run + 1 if code == NOT_RUN else 0
                if not_run >= MAX_NOT_RUN:
                    return Outcome(False, "the root task was not run: a dependency failed or is disabled "
                                          "in the scheduler")
                delay = backoff.next()
                self.runlog.note(f"other workers hold tasks of this pipeline; running luigi again in {delay:.0f}s")
                await asyncio.sleep(delay)
                continue
            if not await scheduler_reachable(self.scheduler_url):
                self.runlog.note("luigi failed while the scheduler was unreachable: not a failure of the pipeline")
                continue
            if not self.responsible:
                return Outcome(False, reason, stood_down=True)
            if silent_since is None:
                return Outcome(False, reason)
            if loop.time() - silent_since >= self.outage_limit:
                return Outcome(False, f"the luigi scheduler at {redact_url(self.scheduler_url)} did not answer "
                                      f"luigi for {self.outage_limit:.0f}s: {reason}")
            delay = backoff.next()
            self.runlog.note("luigi gave up on the scheduler, which accepts connections but did not answer it: "
                             f"not a failure of the pipeline; running luigi again in {delay:.0f}s")
            await asyncio.sleep(delay)

    async def _luigi_while_watching(self) -> tuple[int | None, Verdict | None]:
        """Run luigi once, watching luigid; returns luigi's exit code (None if stopped) and a final verdict.

        A worker usually exits by itself once the pipeline is over; one that
        stays (an assistant, or a kept-alive worker behind a failed task) is
        stopped when luigid says the pipeline is over.
        """
        look_now = asyncio.Event()
        just_scheduled = False
        added = 0
        """Tasks this node's luigi added as PENDING: with the root alone there is nobody to call for help."""

        def sink(line: str) -> None:
            nonlocal just_scheduled, added
            self.runlog.write(line)
            if self.root is None and (match := ROOT_LINE.search(line)):
                self.root = match.group(1) or match.group(2)
            if match := FAILED_LINE.search(line):
                self.failed_here.add(match.group(1))
                look_now.set()  # the scheduler may queue it again within a second
            elif match := DONE_LINE.search(line):
                self.done_here.add(match.group(1))
                if self.assistant and match.group(1) == self.root:
                    look_now.set()  # the pipeline is over and an assistant never exits by itself: stop it now
            elif PENDING_LINE.search(line):
                added += 1
            elif SCHEDULED_LINE in line and self.recruit is not None and added > 1:
                just_scheduled = True
                look_now.set()  # the graph is whole in luigid: a starter calls for help now, not at its next look

        luigi: asyncio.Future[int] = asyncio.ensure_future(self.start(self.command, env=self.env, cwd=self.cwd,
                                                                      sink=sink))
        over: Verdict | None = None
        stop_at = 0.0
        checking: asyncio.Future[Outcome] | None = None
        stuck = 0
        loop = asyncio.get_running_loop()
        try:
            while True:
                woken: asyncio.Future[Any] = asyncio.ensure_future(look_now.wait())
                watched: set[asyncio.Future[Any]] = {luigi, woken} | ({checking} if checking else set())
                timeout = WATCH_SECONDS if over is None else min(WATCH_SECONDS, max(0.0, stop_at - loop.time()))
                done, _ = await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                look_now.clear()
                if luigi in done:
                    return luigi.result(), over
                if checking is not None and checking in done:
                    if not checking.result().ok:
                        stop_at = loop.time()  # luigid's DONE is not confirmed: no reason to wait for this luigi
                    checking = None
                if over is not None:
                    if loop.time() >= stop_at:
                        self.runlog.note(f"the scheduler says the pipeline is {over.state}: stopping this node's luigi")
                        return None, over
                    continue
                current = await self._verdict()
                if self.failed_here and current.state == "unknown":
                    # Without a graph, as a single luigi process would: a failed task ends the run.
                    current = Verdict("failed", failed=[(task, task) for task in sorted(self.failed_here)])
                stuck = stuck + 1 if current.state == "stuck" and (current.missing or current.undecided) else 0
                if current.state in ("done", "failed") or stuck >= STUCK_CHECKS:
                    over = current
                    grace = 0.0 if self.assistant or current.state != "done" else EXIT_GRACE_SECONDS
                    stop_at = loop.time() + grace
                    if grace and self.root not in self.done_here:
                        checking = asyncio.ensure_future(self._confirmed())
                elif current.state == "busy" and self.recruit is not None:
                    # Right after scheduling, this node's own worker is about to take one of the free tasks.
                    wanted = current.takeable - (1 if just_scheduled else 0)
                    if wanted > 0:
                        self.recruit(wanted)
                just_scheduled = False
        finally:
            for future in (luigi, checking):
                if future is not None and not future.done():
                    future.cancel()
                    await asyncio.gather(future, return_exceptions=True)

    async def _verdict(self) -> Verdict:
        if self.root is None:
            return Verdict("unknown")
        try:
            return await self.luigid.verdict(self.root, self.failed_here)
        except SchedulerError as exc:
            log.debug("cannot read the task graph: %s", exc)
            return Verdict("unknown")

    async def _wait_while_others_work(self) -> Verdict:
        """Wait, asking luigid with backoff, while other workers run tasks and none is free for this node."""
        self.runlog.note("other workers run tasks of this pipeline; waiting for them")
        backoff = Backoff(first=0.5, cap=5.0)
        while True:
            current = await self._verdict()
            if current.state != "busy" or current.takeable > 0:
                return current
            await asyncio.sleep(backoff.next())

    async def _outcome(self, current: Verdict) -> Outcome | None:
        """The pipeline's outcome from a final verdict; None when its failures are only vanished workers'.

        luigid marks a task FAILED, with no error, when the worker running it
        disappears (a node stopped or died, or luigid, overloaded, stopped
        hearing from it); luigi runs such a task again when it is scheduled
        anew, so this node takes part again instead. Whether a task failed so
        is asked of luigid; while it does not answer, only the failures this
        node's own luigi reported count.
        """
        if current.state == "done":
            return await self._confirmed()
        parts = []
        for task_id, name in current.failed[:3]:
            try:
                error = await self.luigid.error(task_id)
            except SchedulerError:
                if task_id not in self.failed_here:
                    self.runlog.note(f"luigid did not say why {name} failed; taking part again")
                    return None
                error = last_error(self.runlog) or "?"
            if error:
                parts.append(f"{name}: {error[:300]}")
        if not parts:
            self.runlog.note("a worker running a task of this pipeline vanished; running its tasks again")
            return None
        more = _more(current.failed, len(parts))
        reason = f"a luigi task failed: {'; '.join(parts)}{more}"
        self.runlog.note(reason)
        return Outcome(False, self.runlog.mask(reason))

    def _stuck_reason(self, current: Verdict) -> str:
        """Why nothing can move, in the words of the exit code a single luigi process would end with."""
        parts = []
        if current.missing:
            parts.append(f"{REASONS[MISSING_DATA]}: {_listed(current.missing)}")
        if current.undecided:
            detail = last_error(self.runlog)
            parts.append(f"{REASONS[SCHEDULING_ERROR]} for {_listed(current.undecided)}"
                         + (f": {detail[:300]}" if detail else ""))
        reason = "; ".join(parts)
        self.runlog.note(reason)
        return self.runlog.mask(reason)

    async def _confirmed(self) -> Outcome:
        """Done only if the pipeline's own luigi finds the root task complete, whatever luigid says.

        A root task this node's luigi ran and reported DONE needs no check, as luigi's own exit 0 needs none.
        """
        if self.root in self.done_here:
            return Outcome(True)
        if self.confirmation is None:
            self.confirmation = await self._check_complete()
        return self.confirmation

    async def _check_complete(self) -> Outcome:
        if self.confirm is None:
            return Outcome(True)
        self.runlog.note("the scheduler says the root task is DONE; checking its complete() in the environment")
        code = await self.start(self.confirm, env=self.env, cwd=self.cwd, sink=self.runlog.write)
        if code == 0:
            return Outcome(True)
        why = "its complete() is False" if code == NOT_COMPLETE else f"checking its complete() failed (exit {code})"
        reason = f"the luigi scheduler says the root task is DONE, but {why}: luigid's DONE was not confirmed"
        self.runlog.note(reason)
        return Outcome(False, reason)


def _listed(tasks: Tasks, shown: int = 3) -> str:
    return ", ".join(name for _, name in tasks[:shown]) + _more(tasks, shown)


def _more(tasks: Tasks, shown: int) -> str:
    return f" (and {len(tasks) - shown} more)" if len(tasks) > shown else ""


async def wait_for_scheduler(url: str, runlog: RunLog, limit: float) -> bool:
    """True once the scheduler accepts connections; False if it does not within `limit` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    backoff = Backoff(first=0.5, cap=15.0)
    shown = redact_url(url)
    waited = False
    while not await scheduler_reachable(url):
        delay = backoff.next()
        if loop.time() + delay > deadline:
            return False
        if not waited:
            runlog.note(f"the luigi scheduler at {shown} is unreachable; waiting up to {limit:.0f}s")
            log.warning("luigi scheduler %s unreachable; waiting", shown)
            waited = True
        await asyncio.sleep(delay)
    if waited:
        runlog.note("the luigi scheduler is reachable again")
        log.info("luigi scheduler %s reachable again", shown)
    return True


async def scheduler_reachable(url: str) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(parsed.hostname, port), 5)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


