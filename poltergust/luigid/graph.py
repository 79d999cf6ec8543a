"""What the central scheduler knows about a pipeline's task graph, and what that says about its outcome.

When several workers share a graph, a luigi process's exit code says what
that one process saw; the root task's state in luigid says how the pipeline
stands. `verdict` reads it the way a plain single-process luigi run would end:
done when the root task is DONE; failed once a task FAILED or is DISABLED
and nothing else runs or could be taken (a single process goes on with every
other task it can run after one fails); busy while anything runs or could be
taken, or a failed task waits to be retried under a retry policy the user set
(`retrying` in poltergust.luigid's graph: luigi's keep-alive workers, which
the nodes' are, retry such a task after `retry_delay`); stuck when nothing
can move, which ends the pipeline once the graph shows why: an external
task's data is missing, or a task's complete() raised (a single luigi
process exits then; the nodes' keep-alive workers would wait for ever).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Literal, Mapping
from urllib.parse import quote

import aiohttp

from poltergust.errors import PoltergustError
from poltergust.masking import redact_url


class SchedulerError(PoltergustError):
    """luigid did not answer as expected."""


VerdictState = Literal["done", "failed", "busy", "stuck", "unknown"]
"""done, failed, busy (tasks run, or wait to be taken), stuck (nothing can move), unknown (no graph)."""
Tasks = list[tuple[str, str]]
"""(task id, display name) of some of the graph's tasks."""


@dataclass(frozen=True)
class Verdict:
    state: VerdictState
    running: int = 0
    takeable: int = 0
    """Pending tasks a worker of the pipeline could start right now."""
    retrying: int = 0
    """Failed tasks luigid will queue again under the user's retry policy."""
    failed: Tasks = field(default_factory=list)
    """The FAILED and DISABLED tasks, and those that failed on this node."""
    missing: Tasks = field(default_factory=list)
    """External tasks whose data is missing: no worker may run them (PENDING, not runnable)."""
    undecided: Tasks = field(default_factory=list)
    """Tasks whose complete() or requires() raised in the worker that scheduled them (UNKNOWN, with a family)."""


def verdict(graph: Mapping[str, Mapping[str, Any]], root: str, failed_here: Collection[str] = ()) -> Verdict:
    """The pipeline's state; `failed_here`: tasks this node saw fail, still failed once luigid queues them again.

    luigid puts a FAILED task back to PENDING after its retry delay; a single
    luigi process would not run it again, so neither does the verdict, unless
    the user's retry policy says it is to be retried (`retrying`).
    """
    if root not in graph:
        return Verdict("unknown")
    if graph[root].get("status") == "DONE":
        return Verdict("done")
    running = sum(1 for task in graph.values() if task.get("status") == "RUNNING")
    retrying = sum(1 for task in graph.values() if task.get("retrying") and task.get("status") == "FAILED")
    failed = sorted((task_id, display_name(task_id, task)) for task_id, task in graph.items()
                    if not task.get("retrying") and (task.get("status") in ("FAILED", "DISABLED")
                                                     or (task.get("status") == "PENDING" and task_id in failed_here)))
    failed_ids = {task_id for task_id, _ in failed}
    takeable = sum(
        1 for task_id, task in graph.items()
        if task.get("status") == "PENDING" and task_id not in failed_ids and task.get("runnable", True)
        and all(graph.get(dep, {}).get("status") == "DONE" for dep in task.get("deps", ()))
    )
    if failed and not running and not takeable and not retrying:
        return Verdict("failed", failed=failed)
    if running or takeable or retrying:
        return Verdict("busy", running=running, takeable=takeable, retrying=retrying, failed=failed)
    if any(_known_by_id_only(task_id, task) for task_id, task in graph.items()):
        return Verdict("stuck")  # a worker is still adding the graph (luigi may wait 30 s to retry an add_task)
    return Verdict("stuck", missing=_named(graph, lambda task: task.get("status") == "PENDING"
                                           and not task.get("runnable", True)),
                   undecided=_named(graph, lambda task: task.get("status") == "UNKNOWN"))


def _known_by_id_only(task_id: str, task: Mapping[str, Any]) -> bool:
    """A dependency no worker has added yet: luigi's dep_graph names it after its id's family, with the id as its
    only parameter (a task whose complete() raised was added by a worker, with its own parameters)."""
    return task.get("status") == "UNKNOWN" and (not task.get("name") or task.get("params") == {"task_id": task_id})


def _named(graph: Mapping[str, Mapping[str, Any]], which: Callable[[Mapping[str, Any]], bool]) -> Tasks:
    return sorted((task_id, display_name(task_id, task)) for task_id, task in graph.items() if which(task))


def display_name(task_id: str, task: Mapping[str, Any]) -> str:
    """`Family(param=value, ...)`, as luigi shows a task (dep_graph gives `display_name` for its root only)."""
    if task.get("display_name"):
        return str(task["display_name"])
    if not task.get("name"):
        return task_id
    params = task.get("params") or {}
    return f"{task['name']}({', '.join(f'{key}={value}' for key, value in sorted(params.items()))})"


class Luigid:
    """The few calls of luigid's JSON API a node makes (each one request: luigid serves one at a time)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def call(self, method: str, **data: Any) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        url = f"{self.url}/api/{method}?data={quote(json.dumps(data))}"
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    raise SchedulerError(f"luigid {method}: HTTP {response.status}")
                return (await response.json(content_type=None))["response"]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            raise SchedulerError(f"luigid {method} at {redact_url(self.url)}: {type(exc).__name__}: {exc}") from exc

    async def graph(self, root: str) -> dict[str, dict[str, Any]]:
        return await self.call("dep_graph", task_id=root, include_done=True)

    async def verdict(self, root: str, failed_here: Collection[str] = ()) -> Verdict:
        return verdict(await self.graph(root), root, failed_here)

    async def error(self, task_id: str) -> str:
        """The last line of a failed task's error (its exception), or empty when no worker gave one.

        Workers send their explanation JSON-encoded. A task luigid fails itself,
        because the worker running it vanished, keeps the explanation of its
        last report: `null` when that was a DONE without a message.
        """
        text = (await self.call("fetch_error", task_id=task_id)).get("error") or ""
        try:
            decoded = json.loads(text)
        except ValueError:
            decoded = text
        text = "" if decoded is None else str(decoded)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


_ASSISTANTS: dict[str, bool] = {}


async def pipeline_assistants(url: str) -> bool:
    """Whether the luigid at `url` keeps assistants to their pipeline (asked once per process)."""
    if url not in _ASSISTANTS:
        luigid = Luigid(url)
        try:
            _ASSISTANTS[url] = bool((await luigid.call("poltergust_features")).get("pipeline_assistants"))
        except SchedulerError as exc:
            if "HTTP 404" not in str(exc):
                return False  # unreachable now: ask again next time
            _ASSISTANTS[url] = False
        finally:
            await luigid.close()
    return _ASSISTANTS[url]
