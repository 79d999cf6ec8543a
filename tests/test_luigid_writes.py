"""luigid's state is not the node's word for a pipeline's outcome, and browsers cannot change it.

Any worker may tell luigid any task is DONE; a node ends a run as done only
when the root task's own `complete()` agrees. `python -m poltergust.luigid`
refuses calls carrying a foreign `Origin` or a `Host` that is not its own, so
a web page in an operator's browser cannot call its GET-able RPCs through
the tunnel (nor read it after rebinding a name to loopback).
"""
from __future__ import annotations

import asyncio
import http.client
import json
import urllib.parse
from pathlib import Path

from harness import Luigid, result, run_log, submit, wait_for

from poltergust.luigid import graph


def rpc(luigid: Luigid, method: str, data: dict, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """A GET of luigid's RPC `method`, as a browser (or a pipeline) could send it."""
    connection = http.client.HTTPConnection("127.0.0.1", luigid.port, timeout=10)
    try:
        connection.request("GET", f"/api/{method}?data={urllib.parse.quote(json.dumps(data))}",
                           headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def running_task(luigid: Luigid, family: str) -> str:
    tasks = luigid.tasks("RUNNING")
    return next((task_id for task_id, task in tasks.items() if task["name"] == family), "")


def test_a_root_task_another_worker_says_is_done_ends_as_an_error(
    start_node, bucket, environment_yaml: str, tmp_path: Path, luigid: Luigid,
) -> None:
    start_node("node-a")
    out = tmp_path / "victim"
    submit(bucket, "victim", {"name": "Sleep", "module": "poltergust_testpipes", "out-dir": str(out),
                              "seconds": 600}, environment_yaml)
    task_id = wait_for(lambda: running_task(luigid, "Sleep"), 120, "the victim's task to run")
    # Another pipeline's luigi (anyone who reaches luigid) marks the victim's running root task DONE.
    status, body = rpc(luigid, "mark_as_done", {"task_id": task_id})
    assert status == 200, body
    error = result(bucket, "victim", "error")
    assert "luigid's DONE was not confirmed" in error["poltergust"]["reason"]
    assert not bucket.exists("pipeline/victim.done.yaml") and not (out / "slept.txt").exists()
    log = run_log(tmp_path, "node-a", "victim")
    assert log.index("checking its complete()") < log.index("stopping this node's luigi"), \
        "a DONE this node did not report is checked at once, not after its luigi had time to exit"


def test_a_done_root_task_is_confirmed_and_the_run_is_done(
    start_node, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    start_node("node-a")
    submit(bucket, "fan", {"name": "Fan", "module": "poltergust_testpipes", "out-dir": str(tmp_path / "fan"),
                           "parts": 2, "seconds": 0.1}, environment_yaml)
    assert result(bucket, "fan", "done")["poltergust"]["outcome"] == "done"


def test_a_task_failed_without_an_explanation_reads_as_no_error(luigid: Luigid) -> None:
    """A node reruns a task luigid failed for a vanished worker; it must not read `null` as the task's error.

    luigid fails the running task of a worker it no longer hears from and
    keeps the explanation of the task's last report: `null` after a DONE
    (a task scheduled again, say by a worker that could not see its output).
    """
    def report(task_id: str, status: str, **extra: str) -> None:
        status_code, body = rpc(luigid, "add_task", {"worker": "w", "task_id": task_id, "status": status, **extra})
        assert status_code == 200, body

    report("Part_1", "DONE", expl=json.dumps(None))
    report("Part_1", "FAILED")
    report("Part_2", "FAILED", expl=json.dumps("Traceback (most recent call last):\n  ...\nValueError: boom\n"))

    async def errors() -> tuple[str, str]:
        scheduler = graph.Luigid(f"http://127.0.0.1:{luigid.port}")
        try:
            return await scheduler.error("Part_1"), await scheduler.error("Part_2")
        finally:
            await scheduler.close()

    assert json.loads(rpc(luigid, "fetch_error", {"task_id": "Part_1"})[1])["response"]["error"] == "null"
    assert asyncio.run(errors()) == ("", "ValueError: boom")


def test_a_cross_origin_call_is_refused_and_changes_nothing(luigid: Luigid) -> None:
    task = {"task_id": "Browser_attack_1", "status": "PENDING", "worker": "browser"}
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Origin": f"http://localhost:{luigid.port}", "Host": f"127.0.0.1:{luigid.port}"}):
        status, body = rpc(luigid, "add_task", task, headers)
        assert status == 403 and "Origin" in body, (headers, status, body)
    assert "Browser_attack_1" not in luigid.tasks("PENDING")


def test_a_foreign_host_is_refused_even_for_pages(luigid: Luigid) -> None:
    """A name rebound to loopback (DNS rebinding) reaches neither the RPCs nor the pages."""
    status, body = rpc(luigid, "task_list", {}, {"Host": f"evil.example:{luigid.port}"})
    assert status == 403 and "Host" in body
    connection = http.client.HTTPConnection("127.0.0.1", luigid.port, timeout=10)
    connection.request("GET", "/static/visualiser/index.html", headers={"Host": "evil.example"})
    assert connection.getresponse().status == 403
    connection.close()


def test_the_scheduler_page_and_nodes_still_get_through(luigid: Luigid) -> None:
    """Same-origin calls (luigid's own page, through the tunnel) and nodes' calls (no Origin) pass."""
    for headers in ({}, {"Host": f"localhost:{luigid.port}", "Origin": f"http://localhost:{luigid.port}"},
                    {"Host": f"[::1]:{luigid.port}"}):
        status, body = rpc(luigid, "task_list", {}, headers)
        assert status == 200 and "response" in body, (headers, status, body)
