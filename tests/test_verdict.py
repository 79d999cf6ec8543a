"""`graph.verdict`: a pipeline's outcome read from luigid's task graph, as a single luigi process would end."""
from __future__ import annotations

from typing import Any

from poltergust.luigid.graph import Verdict, display_name, verdict

ROOT = "Root__0"


def task(status: str, *deps: str, name: str = "", params: dict[str, Any] | None = None,
         runnable: bool = True) -> dict[str, Any]:
    return {"status": status, "deps": list(deps), "name": name, "params": params or {}, "runnable": runnable}


def test_done_when_the_root_is_done() -> None:
    assert verdict({ROOT: task("DONE")}, ROOT).state == "done"


def test_unknown_without_the_root_in_the_graph() -> None:
    assert verdict({}, ROOT).state == "unknown"


def test_a_failure_waits_while_other_tasks_could_still_run() -> None:
    """A single luigi process goes on with every other task it can run after one failed."""
    graph = {ROOT: task("PENDING", "A", "B"), "A": task("FAILED", name="A"), "B": task("PENDING", name="B")}
    assert verdict(graph, ROOT) == Verdict("busy", takeable=1, failed=[("A", "A()")])


def test_a_failure_waits_while_a_task_runs() -> None:
    graph = {ROOT: task("PENDING", "A", "B"), "A": task("FAILED", name="A"), "B": task("RUNNING", name="B")}
    assert verdict(graph, ROOT).state == "busy"


def test_failed_once_nothing_else_runs_or_could_be_taken() -> None:
    graph = {ROOT: task("PENDING", "A", "B", "C"), "A": task("FAILED", name="A", params={"n": "1"}),
             "B": task("DONE"), "C": task("DISABLED", name="C")}
    assert verdict(graph, ROOT) == Verdict("failed", failed=[("A", "A(n=1)"), ("C", "C()")])


def test_a_task_that_failed_here_stays_failed_once_luigid_queues_it_again() -> None:
    """luigid puts a FAILED task back to PENDING after its retry delay; a plain run would not retry it."""
    graph = {ROOT: task("PENDING", "A", "B"), "A": task("PENDING", name="A"), "B": task("DONE")}
    assert verdict(graph, ROOT).state == "busy"
    assert verdict(graph, ROOT, failed_here={"A"}) == Verdict("failed", failed=[("A", "A()")])


def test_a_task_the_users_retry_policy_retries_keeps_the_pipeline_busy() -> None:
    """poltergust.luigid marks a failed task `retrying` while its retry_count (the user's) is not used up."""
    retrying = {**task("FAILED", name="A"), "retrying": True}
    graph = {ROOT: task("PENDING", "A", "B"), "A": retrying, "B": task("DONE")}
    assert verdict(graph, ROOT) == Verdict("busy", retrying=1)
    queued_again = {**task("PENDING", name="A"), "retrying": True}
    assert verdict({**graph, "A": queued_again}, ROOT, failed_here={"A"}) == Verdict("busy", takeable=1)
    disabled = {**task("DISABLED", name="A"), "retrying": False}
    assert verdict({**graph, "A": disabled}, ROOT) == Verdict("failed", failed=[("A", "A()")])


def test_a_pending_task_nobody_may_run_is_not_takeable() -> None:
    graph = {ROOT: task("PENDING", "E"), "E": task("PENDING", runnable=False)}
    assert verdict(graph, ROOT).state == "stuck"


def test_stuck_says_why_once_the_graph_is_scheduled() -> None:
    """An external task whose data is missing, a task whose complete() raised; a dependency luigid knows only by
    id (a worker is still adding the graph, maybe waiting 30 s to retry a call an overloaded luigid dropped) says
    nothing yet. The graphs are poltergust.luigid's (luigi's own dep_graph, plus `runnable`)."""
    from poltergust.luigid.server import PipelineScheduler

    scheduler = PipelineScheduler()
    scheduler.add_task(worker="w", task_id=ROOT, family="Root", deps=["E_1", "U_2", "T_3"], status="PENDING")
    scheduler.add_task(worker="w", task_id="E_1", family="E", params={"n": "1"}, status="PENDING", runnable=False)
    scheduler.add_task(worker="w", task_id="U_2", family="U", params={"n": "2"}, status="UNKNOWN", runnable=False)
    assert scheduler.dep_graph(ROOT, include_done=True)["T_3"]["name"] == "T", "luigi names it after its id"
    assert verdict(scheduler.dep_graph(ROOT, include_done=True), ROOT) == Verdict("stuck")
    scheduler.add_task(worker="w", task_id="T_3", family="T", status="PENDING")
    assert verdict(scheduler.dep_graph(ROOT, include_done=True), ROOT) == Verdict("busy", takeable=1)
    scheduler.add_task(worker="w", task_id="T_3", family="T", status="DONE")
    assert verdict(scheduler.dep_graph(ROOT, include_done=True), ROOT) == Verdict(
        "stuck", missing=[("E_1", "E(n=1)")], undecided=[("U_2", "U(n=2)")])


def test_display_names_as_luigi_shows_them() -> None:
    assert display_name("X__1", {"display_name": "examples.X()", "name": "examples.X"}) == "examples.X()"
    assert display_name("Data__2", {"name": "Data", "params": {"b": "2", "a": "1"}}) == "Data(a=1, b=2)"
    assert display_name("Gone__3", {"status": "UNKNOWN"}) == "Gone__3"


def test_poltergust_luigid_marks_the_tasks_its_retry_policy_retries() -> None:
    """The `retrying` the verdict reads: set while a task's own (or [scheduler]) retry_count is not used up."""
    from poltergust.luigid.server import PipelineScheduler

    scheduler = PipelineScheduler()
    scheduler.add_task(worker="w", task_id=ROOT, family="Root", deps=["A", "B"], status="PENDING")
    scheduler.add_task(worker="w", task_id="A", family="A", status="FAILED", retry_policy_dict={"retry_count": 2})
    scheduler.add_task(worker="w", task_id="B", family="B", status="FAILED")  # luigid's default: no user policy
    assert {task_id: task["retrying"] for task_id, task in scheduler.dep_graph(ROOT).items()} == {
        ROOT: False, "A": True, "B": False}
    scheduler.add_task(worker="w", task_id="A", family="A", status="FAILED", retry_policy_dict={"retry_count": 2})
    graph = scheduler.dep_graph(ROOT)
    assert graph["A"]["status"] == "DISABLED" and not graph["A"]["retrying"]
