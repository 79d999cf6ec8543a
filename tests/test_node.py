"""A node on the real stack: Pub/Sub emulator, fake-gcs-server, luigid, real environments."""
from __future__ import annotations

from pathlib import Path

import yaml
from harness import result, submit, wait_for


def test_uploaded_config_runs_to_done(start_node, bucket, environment_yaml: str, tmp_path: Path) -> None:
    node = start_node("node-a")
    out = tmp_path / "out"
    submit(bucket, "hello", {"name": "Touch", "module": "poltergust_testpipes", "out-dir": str(out),
                             "variable": "GREETING"}, environment_yaml, {"GREETING": "hi"})
    done = result(bucket, "hello", "done")
    assert done["task"]["name"] == "Touch"
    assert done["variables"] == {"GREETING": "hi"}
    assert done["poltergust"]["outcome"] == "done"
    assert done["poltergust"]["node"] == "node-a"
    assert (out / "touch.txt").read_text() == "node-a\nhi\n"
    wait_for(lambda: not bucket.exists("pipeline/hello.config.yaml"), 10, "the config to be removed")
    assert not bucket.exists("pipeline/hello.error.yaml")
    log = bucket.read(bucket.log_name("hello", "node-a")).decode()
    assert "luigi exited with code 0" in log
    node.check_alive()


def test_config_uploaded_before_start_is_found_by_the_startup_scan(
    start_node, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    submit(bucket, "early", {"name": "Touch", "module": "poltergust_testpipes", "out-dir": str(tmp_path / "o")},
           environment_yaml)
    node = start_node("node-a")
    assert result(bucket, "early", "done")["poltergust"]["node"] == "node-a"
    assert "1 run(s) scheduled" in node.output()


def test_failing_task_ends_as_error_and_the_node_goes_on(
    start_node, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    start_node("node-a")
    submit(bucket, "broken", {"name": "Fail", "module": "poltergust_testpipes", "out-dir": str(tmp_path / "f")},
           environment_yaml)
    error = result(bucket, "broken", "error")
    section = error["poltergust"]
    assert section["outcome"] == "error"
    assert section["reason"].startswith("a luigi task failed")
    assert "this task fails on purpose" in section["log_tail"]
    assert error["task"]["name"] == "Fail"
    wait_for(lambda: not bucket.exists("pipeline/broken.config.yaml"), 10, "the config to be removed")
    assert not bucket.exists("pipeline/broken.done.yaml")

    submit(bucket, "after", {"name": "Touch", "module": "poltergust_testpipes", "out-dir": str(tmp_path / "a")},
           environment_yaml)
    result(bucket, "after", "done")


def test_a_pipeline_that_cannot_go_on_ends_as_a_single_luigi_would(
    start_node, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    """A missing external input, a complete() that raises: luigi alone exits, so the run ends as that error
    instead of the nodes' kept-alive workers waiting for the pipeline's timeout."""
    start_node("node-a")
    missing, present = tmp_path / "missing", tmp_path / "present"
    present.mkdir()
    (present / "input.txt").write_text("data\n")
    for name, out in (("missing", missing), ("present", present)):
        submit(bucket, name, {"name": "NeedsInput", "module": "poltergust_testpipes", "out-dir": str(out)},
               environment_yaml)
    submit(bucket, "undecided", {"name": "NeedsUndecidable", "module": "poltergust_testpipes",
                                 "out-dir": str(tmp_path / "undecided")}, environment_yaml)

    reason = result(bucket, "missing", "error")["poltergust"]["reason"]
    assert reason == f"an external dependency's data is missing: Input(path={missing / 'input.txt'})", reason
    assert (missing / "touch.txt").exists() and not (missing / "used.txt").exists(), \
        "what could run ran first, as in a single luigi process"
    assert result(bucket, "present", "done")["poltergust"]["outcome"] == "done"
    reason = result(bucket, "undecided", "error")["poltergust"]["reason"]
    assert reason.startswith("luigi could not schedule the tasks (complete() or requires() raised) for "
                             "Undecidable(): ") and reason.endswith("ValueError: the catalogue cannot be reached"), \
        reason


def test_bad_input_ends_as_error_with_a_clear_reason(
    start_node, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    start_node("node-a")
    invalid = "environment: [unclosed\ntask: {name: X\n"
    bucket.upload("pipeline/invalid.config.yaml", invalid)
    bucket.upload("pipeline/noenv.config.yaml", yaml.safe_dump(
        {"environment": bucket.url("environment/missing.yaml"), "task": {"name": "T", "module": "m"}}))
    submit(bucket, "nomodule", {"name": "Touch", "module": "no_such_module", "out-dir": str(tmp_path)},
           environment_yaml)
    bucket.upload("pipeline/notask.config.yaml", "environment: ../environment/test.yaml\n")

    invalid_error = result(bucket, "invalid", "error")
    assert invalid_error["original_config"] == invalid, "the user's text is kept verbatim"
    assert "invalid.config.yaml: invalid YAML" in invalid_error["poltergust"]["reason"]
    assert "missing.yaml does not exist" in result(bucket, "noenv", "error")["poltergust"]["reason"]
    reason = result(bucket, "nomodule", "error")["poltergust"]["reason"]
    assert "could not import the pipeline's module" in reason and "no_such_module" in reason
    notask = result(bucket, "notask", "error")
    assert notask["environment"] == "../environment/test.yaml"
    assert notask["poltergust"]["reason"].endswith("notask.config.yaml: task: required key is missing")
    wait_for(lambda: not [n for n in bucket.names("pipeline/") if n.endswith(".config.yaml")], 10,
             "every config to be moved")


def test_healthz_answers_once_ready_and_not_while_the_node_is_stalled(start_node) -> None:
    import signal
    import urllib.error
    import urllib.request

    from harness import free_port

    port = free_port()
    node = start_node("node-a", "--http-port", str(port))
    url = f"http://127.0.0.1:{port}/healthz"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200 and response.read() == b"ok\n"
    node.process.send_signal(signal.SIGSTOP)
    try:
        try:
            urllib.request.urlopen(url, timeout=1)
            raise AssertionError("a stalled node must not pass its health check")
        except (urllib.error.URLError, TimeoutError):
            pass
    finally:
        node.process.send_signal(signal.SIGCONT)
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
