"""Never lose a pipeline: crashes, cancellation, re-submission, timeouts and retries, on the real stack."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import yaml
from harness import alive, result, results, submit, wait_for

SLEEP = {"name": "Sleep", "module": "poltergust_testpipes"}


def _started(out: Path) -> list[Path]:
    return wait_for(lambda: list(out.glob("started-*")), 60, "the task to start")


def test_a_killed_node_restarted_completes_its_pipeline(start_node, bucket, environment_yaml, tmp_path) -> None:
    node = start_node("node-a")
    out = tmp_path / "killed"
    submit(bucket, "killed", {**SLEEP, "out-dir": str(out), "seconds": 3}, environment_yaml)
    luigi_pid = int(_started(out)[0].name.rsplit("-", 1)[1])
    node.signal(signal.SIGKILL)  # the node and, as on a machine that dies, its luigi too
    os.killpg(luigi_pid, signal.SIGKILL)
    node.process.wait(10)
    assert bucket.exists("pipeline/killed.config.yaml")

    start_node("node-a")
    assert result(bucket, "killed", "done")["poltergust"]["node"] == "node-a"
    assert results(bucket, "killed") == ["pipeline/killed.done.yaml"]


def test_a_claim_left_by_a_crash_is_completed(start_node, bucket, environment_yaml, tmp_path) -> None:
    """Crashed between the claim and removing the config: the claim's result is what ends the run, once."""
    unclaimed = {"environment": "x.yaml", "task": {"name": "T", "module": "m"}}
    claims = {"mine": ("done", "node-a"), "theirs": ("error", "vanished")}  # node-a restarted; one never back
    for name, (outcome, claimer) in claims.items():
        generation = bucket.upload(f"pipeline/{name}.config.yaml", yaml.safe_dump(unclaimed))
        body = yaml.safe_dump({**unclaimed, "poltergust": {"outcome": outcome, "node": claimer}})
        bucket.upload(f"_poltergust/runs/pipeline/{name}/{generation}/claim", body,
                      {"poltergust-outcome": outcome, "poltergust-node": claimer})
    start_node("node-a", "--claim-grace", "2", "--rescan-interval", "1")
    assert result(bucket, "mine", "done")["poltergust"]["node"] == "node-a"
    assert result(bucket, "theirs", "error")["poltergust"]["node"] == "vanished"
    wait_for(lambda: not bucket.exists("pipeline/mine.config.yaml") and not bucket.exists(
        "pipeline/theirs.config.yaml"), 10, "the claimed configs to be removed")


def test_deleting_a_config_stops_its_run_on_every_node(start_node, bucket, environment_yaml, tmp_path) -> None:
    nodes = [start_node("node-a"), start_node("node-b")]
    out = tmp_path / "cancel"
    submit(bucket, "cancel", {**SLEEP, "out-dir": str(out), "seconds": 120}, environment_yaml, nodes="all")
    luigi_pid = int(_started(out)[0].name.rsplit("-", 1)[1])
    for node in nodes:
        wait_for(lambda: "run of generation" in node.output(), 30, f"{node.name} to join the run")
    bucket.delete("pipeline/cancel.config.yaml")
    for node in nodes:
        wait_for(lambda: "was deleted: stopping its run" in node.output(), 15, f"{node.name} to stop")
    wait_for(lambda: not alive(luigi_pid), 15, "luigi to be stopped")
    for node in nodes:
        wait_for(lambda: b"run stopped on this node" in (bucket.read(bucket.log_name("cancel", node.node_name))
                                                        or b""), 15, "the final log upload")
    assert results(bucket, "cancel") == []
    assert not (out / "slept.txt").exists()


def test_resubmitting_replaces_the_running_generation_and_reruns_a_finished_one(
    start_node, bucket, environment_yaml, tmp_path,
) -> None:
    node = start_node("node-a")
    first = tmp_path / "first"
    submit(bucket, "again", {**SLEEP, "out-dir": str(first), "seconds": 60}, environment_yaml)
    _started(first)
    second = tmp_path / "second"
    submit(bucket, "again", {"name": "Touch", "module": "poltergust_testpipes", "out-dir": str(second)},
           environment_yaml)
    done = result(bucket, "again", "done")
    assert done["task"]["out-dir"] == str(second), "the new upload ran, and was not deleted by the old run"
    assert "stopping its run" in node.output()
    wait_for(lambda: not bucket.exists("pipeline/again.config.yaml"), 10, "the config to be removed")
    assert results(bucket, "again") == ["pipeline/again.done.yaml"]

    submit(bucket, "again", {"name": "Touch", "module": "poltergust_testpipes", "out-dir": str(second)},
           environment_yaml)
    rerun = wait_for(lambda: (doc := yaml.safe_load(bucket.read("pipeline/again.done.yaml")))["poltergust"][
        "started"] != done["poltergust"]["started"] and doc, 60, "a fresh run of the re-submitted config")
    assert rerun["poltergust"]["outcome"] == "done"


def test_timeout_and_retries(start_node, bucket, environment_yaml, tmp_path) -> None:
    start_node("node-a")
    bucket.upload("environment/test.yaml", environment_yaml)
    env = bucket.url("environment/test.yaml")
    bucket.upload("pipeline/slow.config.yaml", yaml.safe_dump(
        {"environment": env, "timeout": 3, "task": {**SLEEP, "out-dir": str(tmp_path / "slow"), "seconds": 120}}))
    bucket.upload("pipeline/flaky.config.yaml", yaml.safe_dump(
        {"environment": env, "retries": 1, "task": {"name": "Flaky", "module": "poltergust_testpipes",
                                                     "out-dir": str(tmp_path / "flaky")}}))
    bucket.upload("pipeline/once.config.yaml", yaml.safe_dump(
        {"environment": env, "retries": 0, "task": {"name": "Flaky", "module": "poltergust_testpipes",
                                                     "out-dir": str(tmp_path / "once")}}))
    bucket.upload("pipeline/badtimeout.config.yaml", yaml.safe_dump(
        {"environment": env, "timeout": "soon", "task": {"name": "T", "module": "m"}}))

    slow = result(bucket, "slow", "error")["poltergust"]
    assert slow["reason"] == "timed out after 3s (the config's timeout)"
    assert 3 <= slow["duration_seconds"] < 30
    flaky = result(bucket, "flaky", "done")
    assert "retry 1 of 1" in bucket.read(bucket.log_name("flaky", "node-a")).decode()
    assert flaky["retries"] == 1
    assert result(bucket, "once", "error")["poltergust"]["reason"].startswith("a luigi task failed")
    assert "timeout: must be a positive number" in result(bucket, "badtimeout", "error")["poltergust"]["reason"]


def test_environment_outside_the_allowed_prefixes_is_refused(start_node, bucket, tmp_path) -> None:
    start_node("node-a")
    bucket.upload("pipeline/elsewhere.config.yaml", yaml.safe_dump(
        {"environment": "gs://someone-elses-bucket/env.yaml", "task": {"name": "T", "module": "m"}}))
    bucket.upload("pipeline/local.config.yaml", yaml.safe_dump(
        {"environment": "file:///etc/passwd", "task": {"name": "T", "module": "m"}}))
    for name in ("elsewhere", "local"):
        assert "outside the allowed environment prefixes" in result(bucket, name, "error")["poltergust"]["reason"]
