"""Outages of the GCS emulator, the Pub/Sub emulator and luigid, on a stack of the test's own."""
from __future__ import annotations

from pathlib import Path

from harness import TOPIC, Bucket, result, submit, wait_for

TOUCH = {"name": "Touch", "module": "poltergust_testpipes"}


def test_node_rides_out_gcs_pubsub_and_luigid_outages(stack, stack_node, tmp_path: Path,
                                                       environment_yaml: str) -> None:
    pubsub, gcs, luigid = stack
    bucket = Bucket(gcs, "outages")
    node = stack_node("node-a", bucket, "--outage-limit", "120")
    try:
        # GCS goes away mid-run: luigi finishes meanwhile, and the result is written once GCS is back.
        out = tmp_path / "gcs"
        submit(bucket, "during-gcs", {"name": "Sleep", "module": "poltergust_testpipes", "out-dir": str(out),
                                      "seconds": 2}, environment_yaml)
        wait_for(lambda: list(out.glob("started-*")), 60, "the task to start")
        gcs.stop()
        wait_for(lambda: (out / "slept.txt").exists(), 30, "luigi to finish during the outage")
        wait_for(lambda: "retrying in" in node.output(), 30, "the node to log the storage outage")
        gcs.start()
        gcs.wait_ready()
        assert result(bucket, "during-gcs", "done")["poltergust"]["outcome"] == "done"

        # Pub/Sub restarts empty: the subscription is gone and an upload's notification is lost.
        pubsub.stop()
        pubsub.start()
        pubsub.wait_ready()
        pubsub.create_topic(TOPIC)
        submit(bucket, "missed", {**TOUCH, "out-dir": str(tmp_path / "missed")}, environment_yaml)
        wait_for(lambda: "event stream broken" in node.output(), 60, "the node to notice the broken stream")
        result(bucket, "missed", "done")  # found by the scan after re-attaching
        submit(bucket, "heard", {**TOUCH, "out-dir": str(tmp_path / "heard")}, environment_yaml)
        result(bucket, "heard", "done", timeout=30)  # events flow again (the next rescan is minutes away)

        # luigid goes away: the run waits for it instead of failing.
        luigid.stop()
        submit(bucket, "during-luigid", {**TOUCH, "out-dir": str(tmp_path / "l")}, environment_yaml)
        wait_for(lambda: "unreachable; waiting" in node.output(), 60, "the node to wait for luigid")
        luigid.start()
        luigid.wait_ready()
        assert result(bucket, "during-luigid", "done")["poltergust"]["outcome"] == "done"
        assert not [n for n in bucket.names("pipeline/") if n.endswith(".error.yaml")]
        node.check_alive()
    finally:
        node.stop()


def test_an_outage_past_the_limit_ends_the_run_as_an_error(stack, stack_node, tmp_path: Path,
                                                           environment_yaml: str) -> None:
    pubsub, gcs, luigid = stack
    bucket = Bucket(gcs, "outlasting")
    node = stack_node("node-a", bucket, "--outage-limit", "3")
    try:
        luigid.stop()
        submit(bucket, "stranded", {**TOUCH, "out-dir": str(tmp_path / "s")}, environment_yaml)
        reason = result(bucket, "stranded", "error")["poltergust"]["reason"]
        assert reason == f"the luigi scheduler at {luigid.url} was unreachable for 3s"
    finally:
        node.stop()
