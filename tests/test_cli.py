"""The `poltergust` command and the original `luigi RunTasks --module poltergust` entry point."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from harness import ROOT, WHEELHOUSE, Node, Server, free_port, http_ok, poltergust, result, submit, wait_for


def write_pipeline(directory: Path, environment_yaml: str, task: dict, name: str = "job") -> Path:
    (directory / "environment").mkdir(parents=True, exist_ok=True)
    (directory / "environment" / "test.yaml").write_text(environment_yaml)
    (directory / "pipeline").mkdir(exist_ok=True)
    config = directory / "pipeline" / f"{name}.config.yaml"
    config.write_text(yaml.safe_dump({"environment": "../environment/test.yaml", "task": task}))
    return config


def test_validate_accepts_good_files_and_names_each_problem(tmp_path: Path, environment_yaml: str) -> None:
    config = write_pipeline(tmp_path, environment_yaml, {"name": "Touch", "module": "m"})
    ok = poltergust("validate", str(config), str(tmp_path / "environment" / "test.yaml"))
    assert ok.returncode == 0, ok.stderr
    assert "2 file(s) valid" in ok.stdout

    (tmp_path / "bad.config.yaml").write_text("environment: x.yaml\ntask: [unclosed\n")
    (tmp_path / "nomodule.config.yaml").write_text("environment: x.yaml\ntask: {name: T}\n")
    (tmp_path / "env.yaml").write_text("dependencies: pandas\n")
    bad = poltergust("validate", str(tmp_path / "bad.config.yaml"), str(tmp_path / "nomodule.config.yaml"),
                     str(tmp_path / "env.yaml"), str(tmp_path / "missing.yaml"))
    assert bad.returncode == 1
    lines = bad.stderr.splitlines()
    assert f"{tmp_path / 'bad.config.yaml'}: invalid YAML" in lines[0]
    assert lines[1].endswith("nomodule.config.yaml: task.module: required key is missing")
    assert lines[2] == f"{tmp_path / 'env.yaml'}: dependencies: must be a list of strings (got a string)"
    assert lines[3] == f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory"


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_submit_wait_status_and_logs(start_node, bucket, environment_yaml: str, tmp_path: Path) -> None:
    start_node("node-a")
    source = tmp_path / "source"
    config = write_pipeline(source, environment_yaml, {"name": "Touch", "module": "poltergust_testpipes",
                                                       "out-dir": str(tmp_path / "out")})
    path = bucket.url("pipeline")
    done = poltergust("submit", str(config), "--path", path, "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "uploaded environment" in done.stdout
    assert "job: done on node-a" in done.stdout
    assert bucket.read("environment/test.yaml").decode() == environment_yaml

    failing = write_pipeline(source, environment_yaml, {"name": "Fail", "module": "poltergust_testpipes",
                                                        "out-dir": str(tmp_path / "f")}, name="failing")
    error = poltergust("submit", str(failing), "--path", path, "--wait")
    assert error.returncode == 1
    assert "failing: error on node-a" in error.stdout and "a luigi task failed" in error.stdout

    status = poltergust("status", "--path", path)
    assert status.returncode == 0, status.stderr
    lines = {line.split()[0]: line for line in status.stdout.splitlines()}
    assert " done " in lines["job"] and "on node-a" in lines["job"]
    assert " error " in lines["failing"] and "a luigi task failed" in lines["failing"]

    logs = poltergust("logs", "job", "--path", path, "--node", "node-a")
    assert logs.returncode == 0 and "luigi exited with code 0" in logs.stdout
    assert poltergust("logs", "nothing", "--path", path).returncode == 1


def test_submit_refuses_bad_input_and_uploads_nothing(tmp_path: Path, environment_yaml: str) -> None:
    bucket = tmp_path / "bucket"
    (tmp_path / "bad.config.yaml").write_text("environment: x.yaml\ntask: [unclosed\n")
    bad = poltergust("submit", str(tmp_path / "bad.config.yaml"), "--path", str(bucket / "pipeline"))
    assert bad.returncode == 1 and "bad.config.yaml: invalid YAML" in bad.stderr
    missing_env = write_pipeline(tmp_path / "src", "", {"name": "T", "module": "m"})
    (tmp_path / "src" / "environment" / "test.yaml").unlink()
    refused = poltergust("submit", str(missing_env), "--path", str(bucket / "pipeline"))
    assert refused.returncode == 1 and "environment" in refused.stderr and "does not exist" in refused.stderr
    missing = poltergust("submit", str(tmp_path / "nope.yaml"), "--path", str(bucket / "pipeline"))
    assert missing.returncode == 2 and "nope.yaml: cannot read" in missing.stderr
    assert not list(bucket.rglob("*.config.yaml"))


def test_unreachable_bucket_gives_a_clear_error(tmp_path: Path) -> None:
    env = dict(os.environ, STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{free_port()}")
    status = poltergust("status", "--path", "gs://nowhere/pipeline", env=env, timeout=60)
    assert status.returncode == 2
    assert status.stderr.startswith("poltergust status: gs://nowhere/pipeline:")


@pytest.mark.stack  # luigid and nodes of its own
def test_demo_runs_to_completion(wheelhouse: Path) -> None:
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(WHEELHOUSE))
    demo = poltergust("demo", env=env, timeout=300)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "top_artists: done on demo-node-" in demo.stdout
    top = demo.stdout.split("top 10 artists: ", 1)[1].splitlines()
    assert Path(top[0]).exists() and len(top[1:11]) == 10
    assert demo.stdout.rstrip().endswith("nodes and scheduler stopped")


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_luigi_runtasks_entry_point_runs_a_node(bucket, luigid, environment_yaml: str, tmp_path: Path,
                                                 env_dir: Path) -> None:
    node = Server("luigi RunTasks", [
        sys.executable, "-m", "luigi", "RunTasks", "--module", "poltergust", f"--path={bucket.url('pipeline')}",
        "--hostname", "old-style", "--scheduler-url", luigid.url, "--no-lock"],
        tmp_path / "runtasks.log", env=dict(os.environ, POLTERGUST_ENV_DIR=str(env_dir),
                                            POLTERGUST_DATA_DIR=str(tmp_path / "data")), cwd=ROOT)
    try:
        wait_for(lambda: node.check_alive() or "ready: subscribed" in node.output(), 60, "the node to start")
        submit(bucket, "classic", {"name": "Touch", "module": "poltergust_testpipes", "out-dir": str(tmp_path / "o")},
               environment_yaml)
        assert result(bucket, "classic", "done")["poltergust"]["node"] == "old-style"
        node.process.send_signal(signal.SIGTERM)
        assert node.process.wait(timeout=30) == 0
    finally:
        node.stop()


@pytest.mark.parametrize("backend", ["local"], indirect=True)
@pytest.mark.stack  # luigid and nodes of its own
def test_nodes_without_scheduler_url_share_an_embedded_luigid(bucket, environment_yaml: str, tmp_path: Path,
                                                              env_dir: Path) -> None:
    port = str(free_port())
    # Both ways to start a node: the documented `poltergust node` and `python -m poltergust.async_worker`.
    nodes = [Node.launch(name, tmp_path, "--embedded-scheduler-port", port, path=str(bucket.root / "pipeline"),
                         scheduler_url=None, env_dir=env_dir, data_dir=tmp_path / name, wait=False, entry=entry)
             for name, entry in (("first", ("poltergust", "node")), ("second", ("poltergust.async_worker",)))]
    try:
        for node in nodes:
            node.wait_ready()
        started = [n for n in nodes if f"started a luigi scheduler at http://127.0.0.1:{port}" in n.output()]
        assert len(started) == 1, "exactly one node starts luigid; the other joins it"
        assert all(f"http://127.0.0.1:{port}" in n.output() for n in nodes)
        out = tmp_path / "fan"
        submit(bucket, "fan", {"name": "Fan", "module": "poltergust_testpipes", "out-dir": str(out), "parts": 4,
                               "seconds": 1.0}, environment_yaml)
        follow = poltergust("logs", "fan", "--path", bucket.url("pipeline"), "--follow")
        # luigi's own output, from the node that started it (whose luigi may be stopped, not exit, once a helper
        # that ran the root task has finished the run)
        assert follow.returncode == 0
        assert "luigi attempt 1" in follow.stdout and "Done scheduling tasks" in follow.stdout, follow.stdout[-3000:]
        assert result(bucket, "fan", "done")
        assert {p.read_text() for p in out.glob("part-*.txt")} == {"first", "second"}
    finally:
        for node in reversed(nodes):
            node.stop()


def test_poltergust_node_takes_the_node_flags_and_refuses_bad_values_alike() -> None:
    from poltergust.settings import OPTIONS

    shown = poltergust("node", "--help", timeout=60)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: poltergust node ")
    for option in OPTIONS:
        assert f"--{option.flag}" in shown.stdout and f"[{option.variable}]" in shown.stdout
    assert "node" in poltergust("--help", timeout=60).stdout
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLTERGUST_")}
    for flags, problem in ((["--max-concurrent", "many"], "argument --max-concurrent: invalid int value: 'many'"),
                           (["--start-stale-after", "1"], "--start-stale-after: must be at least 3 seconds (got 1)")):
        node = poltergust("node", "--path", "/tmp/b/pipeline", *flags, env=env, timeout=60)
        worker = subprocess.run([sys.executable, "-m", "poltergust.async_worker", "--path", "/tmp/b/pipeline", *flags],
                                capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
        assert node.returncode == worker.returncode == 2
        assert node.stderr.splitlines()[-1] == f"poltergust node: error: {problem}"
        assert worker.stderr.splitlines()[-1] == f"python -m poltergust.async_worker: error: {problem}"


@pytest.mark.stack  # luigid and nodes of its own
def test_demo_stops_everything_on_ctrl_c(wheelhouse: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(WHEELHOUSE))
    demo = Server("demo", [sys.executable, "-m", "poltergust", "demo"], tmp_path / "demo.log", env=env, cwd=ROOT)
    try:
        wait_for(lambda: demo.check_alive() or "are watching" in demo.output(), 120, "the demo's nodes")
        root = Path(demo.output().split("demo directory: ", 1)[1].split()[0])
        dashboard = demo.output().split("dashboard: ", 1)[1].split()[0]
        assert http_ok(dashboard + "nodes"), "the demo serves the dashboard"
        demo.process.send_signal(signal.SIGINT)
        assert demo.process.wait(timeout=30) == 130
        assert "interrupted; everything is stopped" in demo.output()
        leftovers = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True).stdout.split()
        assert leftovers == [], "no node or luigid of the demo is left running"
    finally:
        demo.stop()


def test_status_groups_dotted_pipeline_names(tmp_path: Path) -> None:
    pipeline = tmp_path / "bucket" / "pipeline"
    pipeline.mkdir(parents=True)
    (pipeline / "my.pipe.done.yaml").write_text(yaml.safe_dump(
        {"poltergust": {"outcome": "done", "node": "node-a", "duration_seconds": 1.5}}))
    _write_log(tmp_path / "bucket", "my.pipe", 1, "node-a", "log\n")
    (pipeline / "my.config.yaml").write_text("environment: e.yaml\n")
    status = poltergust("status", "--path", str(pipeline))
    assert status.returncode == 0, status.stderr
    lines = {line.split()[0]: line for line in status.stdout.splitlines()}
    assert set(lines) == {"my", "my.pipe"}
    assert " queued " in lines["my"], "the other pipeline's log is not taken for this one's"
    assert " done " in lines["my.pipe"] and "on node-a" in lines["my.pipe"]


def test_logs_of_a_pipeline_show_its_newest_run_and_leave_out_a_dotted_neighbour(tmp_path: Path) -> None:
    pipeline = tmp_path / "bucket" / "pipeline"
    pipeline.mkdir(parents=True)
    (pipeline / "my.done.yaml").write_text("poltergust: {outcome: done}\n")
    _write_log(tmp_path / "bucket", "my", 5, "node-a", "old\n")
    _write_log(tmp_path / "bucket", "my", 17, "node-a", "mine\n")
    (pipeline / "my.pipe.config.yaml").write_text("environment: e.yaml\n")
    _write_log(tmp_path / "bucket", "my.pipe", 1, "node-a", "theirs\n")
    logs = poltergust("logs", "my", "--path", str(pipeline))
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == "mine\n"


def _write_log(bucket: Path, pipeline: str, generation: int, node: str, text: str) -> None:
    path = bucket / "_poltergust" / "logs" / "pipeline" / pipeline / str(generation) / f"{node}.log.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
