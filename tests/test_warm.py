"""Warm starts on real nodes: luigi forked from a warm interpreter per environment, and every way back.

A warm run's luigi is a child of the environment's warm interpreter (`zygote.py`),
in a session of its own; a spawned one is a child of the node. Tests tell the two
apart by the parent of luigi's process, and by the run log.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from harness import WHEELHOUSE, free_port, result, run_log, submit, wait_for

FORKED = "luigi forked from the environment's warm interpreter"
REPORT = {"name": "Report", "module": "poltergust_testpipes"}
SLEEP = {"name": "Sleep", "module": "poltergust_testpipes"}


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


def is_zygote(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return b"zygote.py" in handle.read()
    except FileNotFoundError:
        return False


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def started_sleep(out: Path) -> int:
    """The pid of a Sleep task's luigi, once the task is running."""
    marker = wait_for(lambda: list(out.glob("started-*")), 60, "the task to start")[0]
    return int(marker.name.rsplit("-", 1)[1])


def test_warm_run_done(start_node, bucket, environment_yaml: str, tmp_path: Path) -> None:
    port = free_port()
    node = start_node("node-a", "--http-port", str(port))
    out = tmp_path / "out"
    submit(bucket, "hello", {**REPORT, "out-dir": str(out / "1"), "variable": "GREETING"}, environment_yaml=
           environment_yaml, variables={"GREETING": "hi"})
    assert result(bucket, "hello")["poltergust"]["node"] == "node-a"
    first = report(out / "1")
    assert first["value"] == "hi" and first["node"] == "node-a"
    assert is_zygote(first["ppid"]), "luigi is a child of the warm interpreter"
    assert first["sid"] == first["pid"], "in a session of its own"
    assert first["cwd"] == str(tmp_path / "node-a" / "work" / "hello")
    assert first["threads"] >= 1
    log = (bucket.read(bucket.log_name("hello", "node-a")) or b"").decode()
    assert FORKED in log and "luigi exited with code 0" in log

    # No filesystem socket a run could reach (or replace): the warm interpreter inherited its end of a socketpair.
    assert str(tmp_path) not in Path("/proc/net/unix").read_text()
    assert not list((tmp_path / "node-a").rglob("sock"))

    submit(bucket, "again", {**REPORT, "out-dir": str(out / "2")})
    result(bucket, "again")
    assert report(out / "2")["ppid"] == first["ppid"], "the same warm interpreter serves the next run"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        exposed = response.read().decode()
    assert 'poltergust_warm_starts_total{result="forked"} 2.0' in exposed
    assert "poltergust_warm_interpreters 1.0" in exposed
    node.check_alive()


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_each_run_has_its_own_variables_configuration_and_seed(
    start_node, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    node = start_node("node-a")
    out = tmp_path / "out"
    for name in ("red", "blue"):
        settings = tmp_path / f"{name}.cfg"
        settings.write_text(f"[Report]\nsetting = {name}-setting\n")
        submit(bucket, name, {**REPORT, "out-dir": str(out / name), "variable": "COLOUR"}, environment_yaml=
               environment_yaml, variables={"COLOUR": name, "TESTPIPES_AT_IMPORT": name,
                                            "LUIGI_CONFIG_PATH": str(settings)})
    submit(bucket, "cold", {**REPORT, "out-dir": str(out / "cold")}, warm=False)
    for name in ("red", "blue", "cold"):
        result(bucket, name)
    red, blue, cold = report(out / "red"), report(out / "blue"), report(out / "cold")
    for name, seen in (("red", red), ("blue", blue)):
        assert seen["value"] == name and seen["setting"] == f"{name}-setting"
        assert seen["at_import"] == name, "the pipeline's module is imported after the fork, with the run's variables"
        assert is_zygote(seen["ppid"])
    assert red["ppid"] == blue["ppid"], "variables that do not change how Python starts share a warm interpreter"
    assert red["random"] != blue["random"], "each child is seeded anew"
    assert cold["ppid"] == node.process.pid and cold["setting"] == "", "warm: false starts luigi afresh"
    assert FORKED not in run_log(tmp_path, "node-a", "cold")


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_preloading_imports_before_the_fork_and_a_thread_is_refused(
    start_node, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    start_node("node-a")
    out = tmp_path / "out"
    preloaded = environment_yaml + "preload: [poltergust_testpipes]\nvariables: {TESTPIPES_AT_IMPORT: from-env}\n"
    submit(bucket, "preloaded", {**REPORT, "out-dir": str(out / "p")}, preloaded, environment="preloaded",
           variables={"TESTPIPES_AT_IMPORT": "from-config"})
    threaded = environment_yaml + "preload: [poltergust_testpipes]\nvariables: {TESTPIPES_START_THREAD: '1'}\n"
    submit(bucket, "threaded", {**REPORT, "out-dir": str(out / "t")}, threaded, environment="threaded")
    result(bucket, "preloaded")
    result(bucket, "threaded")
    seen = report(out / "p")
    assert is_zygote(seen["ppid"])
    assert seen["at_import"] == "from-env", "a preloaded module was imported once, with the environment's variables"
    log = run_log(tmp_path, "node-a", "threaded")
    assert "warm start unavailable: the warm interpreter refused to serve: importing poltergust_testpipes left " \
           "1 thread(s) (testpipes-sleeper) running" in log
    assert FORKED not in log and not is_zygote(report(out / "t")["ppid"])


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_cancellation_and_timeout_stop_a_warm_run(start_node, bucket, environment_yaml: str, tmp_path: Path) -> None:
    start_node("node-a")
    out = tmp_path / "out"
    submit(bucket, "cancel", {**SLEEP, "out-dir": str(out / "c"), "seconds": 120}, environment_yaml=environment_yaml)
    luigi = started_sleep(out / "c")
    assert is_zygote(parent(luigi))
    bucket.delete("pipeline/cancel.config.yaml")
    wait_for(lambda: not running(luigi), 15, "the cancelled run's luigi to stop")
    wait_for(lambda: "run stopped on this node" in run_log(tmp_path, "node-a", "cancel"), 15, "the run to stop")

    submit(bucket, "slow", {**SLEEP, "out-dir": str(out / "s"), "seconds": 120}, timeout=3)
    luigi = started_sleep(out / "s")
    assert is_zygote(parent(luigi))
    assert result(bucket, "slow", "error")["poltergust"]["reason"] == "timed out after 3s (the config's timeout)"
    assert not running(luigi)
    assert not (out / "c" / "slept.txt").exists() and not (out / "s" / "slept.txt").exists()


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_no_warm_interpreter_or_run_outlives_its_node(
    start_node, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    for name, sig in (("node-a", signal.SIGTERM), ("node-b", signal.SIGKILL)):
        node = start_node(name)
        out = tmp_path / name
        submit(bucket, name, {**SLEEP, "out-dir": str(out), "seconds": 120}, environment_yaml=environment_yaml)
        luigi = started_sleep(out)
        zygote = parent(luigi)
        assert is_zygote(zygote)
        os.kill(node.process.pid, sig)  # the node process only: what it started must go by itself
        assert node.process.wait(30) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        wait_for(lambda: not running(luigi) and not running(zygote), 20, f"{name}'s luigi and warm interpreter to stop")
        assert bucket.exists(f"pipeline/{name}.config.yaml"), "an unfinished config stays for the next node"
        bucket.delete(f"pipeline/{name}.config.yaml")


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_a_warm_interpreter_killed_mid_run(start_node, bucket, environment_yaml: str, tmp_path: Path) -> None:
    """The run in flight still ends with luigi's own exit status; the next run falls back; the one after is warm."""
    start_node("node-a")
    out = tmp_path / "out"
    submit(bucket, "midway", {**SLEEP, "out-dir": str(out / "m"), "seconds": 3}, environment_yaml=environment_yaml)
    zygote = parent(started_sleep(out / "m"))
    assert is_zygote(zygote)
    os.kill(zygote, signal.SIGKILL)
    result(bucket, "midway")
    assert (out / "m" / "slept.txt").exists()
    log = run_log(tmp_path, "node-a", "midway")
    assert log.count("luigi attempt") == 1 and "warm start unavailable" not in log, "luigi reported its own exit"

    submit(bucket, "next", {**REPORT, "out-dir": str(out / "n")})
    result(bucket, "next")
    assert "warm start unavailable: the environment's warm interpreter died (killed by signal 9); it starts again " \
           "for the next run; starting luigi the usual way" in run_log(tmp_path, "node-a", "next")
    assert not is_zygote(report(out / "n")["ppid"])

    submit(bucket, "after", {**REPORT, "out-dir": str(out / "a")})
    result(bucket, "after")
    again = report(out / "a")["ppid"]
    assert is_zygote(again) and again != zygote


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_eviction_and_idleness_stop_the_warm_interpreter(
    start_node, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    node = start_node("node-a", "--env-dir", str(tmp_path / "envs"), "--env-cache-size", "1")
    out = tmp_path / "out"
    submit(bucket, "first", {**REPORT, "out-dir": str(out / "1")}, environment_yaml, environment="first")
    result(bucket, "first")
    zygote = report(out / "1")["ppid"]
    assert is_zygote(zygote)
    submit(bucket, "second", {**REPORT, "out-dir": str(out / "2")}, environment_yaml + "  - six\n",
           environment="second")
    result(bucket, "second")
    wait_for(lambda: not running(zygote), 20, "the evicted environment's warm interpreter to stop")
    assert "its environment was evicted" in node.output()
    node.stop()

    idle = start_node("node-b", "--warm-idle-seconds", "1", "--warm-prestart")
    submit(bucket, "idle", {**REPORT, "out-dir": str(out / "i")}, environment_yaml)
    result(bucket, "idle")
    zygote = report(out / "i")["ppid"]
    wait_for(lambda: not running(zygote), 20, "the idle warm interpreter to stop")
    assert "idle for 1s" in idle.output()


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_a_python_38_environment_runs_warm(start_node, bucket, wheelhouse: Path, tmp_path: Path) -> None:
    """The warm interpreter runs on the oldest Python an environment may ask for."""
    from poltergust.environments import interpreters

    try:
        interpreters.find("python3.8", os.environ)
    except interpreters.InterpreterNotFound:
        pytest.skip("no Python 3.8 on this machine")
    wheels = WHEELHOUSE / "py38"
    if not any(wheels.glob("luigi-*.whl")):
        pytest.skip(f"no wheels for Python 3.8 in {wheels} (see .ci/run)")
    start_node("node-a")
    environment = ("virtualenv: {python: python3.8}\ndependencies:\n  - --no-index\n"
                   f"  - --find-links {wheels}\n  - --find-links {wheelhouse}\n  - luigi\n  - poltergust-testpipes\n")
    submit(bucket, "old", {**REPORT, "out-dir": str(tmp_path / "o"), "variable": "V"}, environment,
           environment="py38", variables={"V": "3.8"})
    result(bucket, "old", timeout=300)
    seen = report(tmp_path / "o")
    assert seen["python"] == "3.8" and seen["value"] == "3.8" and is_zygote(seen["ppid"])


def test_zygote_uses_only_the_standard_library() -> None:
    """It runs inside pipeline environments, which have neither Poltergust nor its dependencies."""
    from poltergust.launch import zygote

    code = ("import sys; sys.argv = ['x']; import runpy; runpy.run_path(%r, run_name='not_main'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('poltergust', 'yaml', 'uvloop', 'google')))")
    found = subprocess.run([sys.executable, "-I", "-c", code % zygote.__file__], capture_output=True, text=True,
                           check=True).stdout
    assert found.strip() == "[]"


def test_warm_and_preload_keys_are_validated() -> None:
    from poltergust.config import ConfigError, parse_environment, parse_pipeline

    config = b"environment: env.yaml\ntask: {name: T, module: m}\n"
    assert parse_pipeline(config, "file:///b/p/x.config.yaml").warm is True
    assert parse_pipeline(config + b"warm: false\n", "file:///b/p/x.config.yaml").warm is False
    with pytest.raises(ConfigError, match=r"^file:///b/p/x.config.yaml: warm: must be true or false \(got 'no'\)$"):
        parse_pipeline(config + b"warm: 'no'\n", "file:///b/p/x.config.yaml")
    assert parse_environment(b"preload: [pandas, my.tasks]\n", "e.yaml").preload == ("pandas", "my.tasks")
    for bad in (b"preload: pandas\n", b"preload: ['os; rm -rf /']\n", b"preload: [1]\n"):
        with pytest.raises(ConfigError, match=r"^e.yaml: preload"):
            parse_environment(bad, "e.yaml")


def test_warm_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from poltergust.settings import build_parser

    def parse(*flags: str):
        return build_parser().parse_args(["--path", "/tmp/b/pipeline", *flags])

    assert (parse().warm, parse().warm_prestart, parse().warm_idle_seconds) == (True, False, 600.0)
    assert parse("--warm", "false").warm is False and parse("--warm-prestart").warm_prestart is True
    monkeypatch.setenv("POLTERGUST_WARM", "no")
    monkeypatch.setenv("POLTERGUST_WARM_IDLE_SECONDS", "5")
    assert (parse().warm, parse().warm_idle_seconds) == (False, 5.0)
