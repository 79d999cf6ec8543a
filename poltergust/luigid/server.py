"""`python -m poltergust.luigid`: luigi's own central scheduler, with assistants kept to their pipeline.

Nodes that join a pipeline run their luigi as assistants, so that they can
take tasks another worker yielded dynamically from `run()`. A plain assistant
takes any pending task, including another pipeline's whose module its
environment lacks. Here an assistant whose worker id carries a pipeline tag
(`poltergust:TAG:NODE`) is given only tasks that a worker of the same pipeline
scheduled, and the task graph says which pending tasks a worker could run
(`runnable`: an external task's data, for instance, is waited for, not run),
and whether a failed task is to be retried under a retry policy the user set
(`retrying`: a `retry_count` below luigid's unbounded default, per task or in
`[scheduler]`, not yet used up).
Requests from a browser on another site are refused (see `guard`: `--allowed-host NAME`, repeatable,
adds a name nodes reach it by). Everything else is luigid as shipped: same flags, API and pages.
Nodes ask for `poltergust_features` and do without assistants on a plain luigid.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import luigi.cmdline
import luigi.scheduler
import luigi.server
from luigi.scheduler import Scheduler, rpc_method

from poltergust.hosts import allowed_hosts
from poltergust.luigid.guard import Guarded

WORKER_PREFIX = "poltergust"
UNSET_RETRY_COUNT = dict(luigi.scheduler.scheduler.get_params())["retry_count"]._default  # noqa: SLF001
"""luigid's default retry_count (practically unbounded): a task with it has no retry policy of the user's."""


def pipeline_tag(worker_id: str) -> str | None:
    """The pipeline tag of a node's worker id (`poltergust:TAG:NODE`), None for any other worker."""
    parts = worker_id.split(":", 2)
    return parts[1] if len(parts) == 3 and parts[0] == WORKER_PREFIX else None


class PipelineScheduler(Scheduler):
    _assistant_tag: str | None = None
    """While an assistant of a pipeline asks for work: its tag (luigid serves one request at a time)."""

    def get_work(self, host: Any = None, assistant: bool = False, current_tasks: Any = None, worker: Any = None,
                 **kwargs: Any) -> Any:
        self._assistant_tag = pipeline_tag(worker or "") if assistant else None
        try:
            return super().get_work(host=host, assistant=assistant, current_tasks=current_tasks, worker=worker,
                                    **kwargs)
        finally:
            self._assistant_tag = None

    def _schedulable(self, task: Any) -> bool:
        tag = self._assistant_tag
        if tag is not None and not any(pipeline_tag(worker) == tag for worker in task.workers):
            return False
        return super()._schedulable(task)

    def _serialize_task(self, task_id: str, include_deps: bool = True, deps: Any = None) -> dict[str, Any]:
        serialized = super()._serialize_task(task_id, include_deps, deps)
        task = self._state.get_task(task_id)
        serialized["runnable"] = bool(getattr(task, "runnable", True))
        serialized["retrying"] = _retrying(task)
        return serialized

    @rpc_method()
    def poltergust_features(self, **kwargs: Any) -> dict[str, bool]:
        """What this scheduler adds to luigid's, for nodes to check."""
        return {"pipeline_assistants": True}


def _retrying(task: Any) -> bool:
    """A task that failed and that luigid will queue again under the user's retry policy (not yet DISABLED)."""
    policy = getattr(task, "retry_policy", None)
    if task is None or policy is None or task.status not in ("FAILED", "PENDING"):
        return False
    return 0 < task.num_failures() < policy.retry_count < UNSET_RETRY_COUNT


def main(argv: Sequence[str] | None = None) -> None:
    given = list(sys.argv[1:] if argv is None else argv)
    ours = argparse.ArgumentParser(add_help=False)
    ours.add_argument("--allowed-host", action="append", default=[])
    extra, rest = ours.parse_known_args(given)  # luigid's own parser does not know the flag
    listening = argparse.ArgumentParser(add_help=False)
    listening.add_argument("--address")
    hosts = allowed_hosts(extra.allowed_host, listening.parse_known_args(rest)[0].address)
    serve, build = luigi.server.run, luigi.server.app

    def run(api_port: int = 8082, address: str | None = None, unix_socket: str | None = None,
            scheduler: Scheduler | None = None) -> None:
        serve(api_port, address, unix_socket, scheduler or PipelineScheduler())

    luigi.server.run = run  # luigid's own command line, with this scheduler, behind the guard
    luigi.server.app = lambda scheduler: Guarded(build(scheduler), hosts)
    luigi.cmdline.luigid(rest)

