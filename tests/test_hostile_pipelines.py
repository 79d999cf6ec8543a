"""Pipelines that attack the node, on the real stack: secrets, hostile configs, look-alike prefixes."""
from __future__ import annotations

import os
import pwd
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml
from harness import free_port, offline, pipe_task, result, submit, wait_for

TOKEN = "ghp_SuperSecret/Token+42"
NAMED = "named-secret-value-7"
REFERENCED = "referenced-secret-value-9"


def test_a_pipeline_sees_no_secret_and_what_it_prints_is_masked(
    start_node, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    leak = tmp_path / "fetched-secret.txt"
    leak.write_text(TOKEN)
    (tmp_path / REFERENCED).mkdir()  # an empty --find-links directory whose name is the secret
    start_node("node-a", "--secret-env", "COMPANY_VALUE", env_overrides={
        "GITHUB_TOKEN": TOKEN, "COMPANY_VALUE": NAMED, "PLAIN_SETTING": "visible", "INDEX_PATH_PART": REFERENCED})
    referencing = environment_yaml + f"  - --find-links {tmp_path}/{{{{INDEX_PATH_PART}}}}\n"
    submit(bucket, "dump", {"name": "Dump", "module": "poltergust_testpipes", "out-dir": str(tmp_path / "d"),
                            "leak": str(leak)}, referencing)
    error = result(bucket, "dump", "error")
    log = bucket.read(bucket.log_name("dump", "node-a")).decode()
    assert "env PLAIN_SETTING=visible" in log and "initial env PLAIN_SETTING=visible" in log, \
        "ordinary node variables reach the pipeline"
    for name in ("GITHUB_TOKEN", "COMPANY_VALUE", "INDEX_PATH_PART"):
        assert f"env {name}=" not in log, f"secrets do not, not even in the environment it started with: {name}"
    assert "leaked **** and ****" in log, "a secret the pipeline prints anyway is masked, URL-encoded too"
    document = yaml.safe_dump(error)
    for text in (log, document):
        for value in (TOKEN, quote(TOKEN, safe=""), NAMED, REFERENCED):
            assert value not in text


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_installers_and_build_scripts_see_no_secret(start_node, bucket, wheelhouse: Path, tmp_path: Path) -> None:
    """A dependency's build script runs during the install: it sees what a pipeline sees, plus pip's settings."""
    seen = tmp_path / "seen-by-setup.txt"
    project = tmp_path / "spy"
    project.mkdir()
    (project / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\n'
                                            'build-backend = "setuptools.build_meta"\n')
    (project / "setup.py").write_text(
        "import os, setuptools\n"
        f"open({str(seen)!r}, 'a').write(''.join(f'{{k}}={{v}}\\n' for k, v in sorted(os.environ.items())))\n"
        "setuptools.setup(name='spy', version='1', py_modules=[])\n")
    start_node("node-a", "--secret-env", "COMPANY_VALUE", env_overrides={
        "GITHUB_TOKEN": TOKEN, "COMPANY_VALUE": NAMED, "PLAIN_SETTING": "visible",
        "UV_INDEX_PRIVATE_PASSWORD": "installer-setting"})
    submit(bucket, "spied", pipe_task("Touch", tmp_path / "out" / "spied"),
               offline(wheelhouse, "luigi", "poltergust-testpipes", str(project)), environment="spied")
    result(bucket, "spied", "done")
    environ = seen.read_text()
    assert "PLAIN_SETTING=visible\n" in environ, "the build script ran with the node's ordinary variables"
    assert "UV_INDEX_PRIVATE_PASSWORD=installer-setting\n" in environ, "installers keep their own settings"
    for name, value in (("GITHUB_TOKEN", TOKEN), ("COMPANY_VALUE", NAMED)):
        assert f"{name}=" not in environ and value not in environ


def test_nested_and_oversized_configs_end_as_errors_once(start_node, bucket, tmp_path: Path) -> None:
    node = start_node("node-a", "--rescan-interval", "1")
    bucket.upload("pipeline/nested.config.yaml", "environment: e.yaml\ntask: " + "[" * 10_000)
    bucket.upload("pipeline/huge.config.yaml", "environment: e.yaml\n# " + "x" * (300 * 1024) + "\n")
    nested = result(bucket, "nested", "error")["poltergust"]["reason"]
    assert "nested.config.yaml: nested too deeply" in nested
    huge = result(bucket, "huge", "error")["poltergust"]["reason"]
    assert "huge.config.yaml" in huge and "at most 262144 bytes" in huge
    wait_for(lambda: not bucket.exists("pipeline/nested.config.yaml")
             and not bucket.exists("pipeline/huge.config.yaml"),
             30, "both configs to be moved to their results")
    scans = node.output().count("scanned:")
    wait_for(lambda: node.output().count("scanned:") >= scans + 2, 30, "two more rescans")
    assert "unexpected error" not in node.output()
    assert node.output().count("(claimed by this node)") == 2, "each ended once, and was never tried again"


def test_an_environment_prefix_look_alike_is_refused(start_node, bucket, environment_yaml: str, tmp_path) -> None:
    allowed = bucket.url("envs")
    start_node("node-a", "--allowed-environment-prefix", allowed)
    bucket.upload("envs-evil/env.yaml", environment_yaml)
    bucket.upload("pipeline/evil.config.yaml", yaml.safe_dump(
        {"environment": bucket.url("envs-evil/env.yaml"), "task": {"name": "Touch", "module": "poltergust_testpipes",
                                                                   "out-dir": str(tmp_path / "evil")}}))
    reason = result(bucket, "evil", "error")["poltergust"]["reason"]
    assert "outside the allowed environment prefixes" in reason
    assert not (tmp_path / "evil").exists()


def test_credentials_in_the_notify_url_never_reach_the_log(start_node, bucket, environment_yaml, tmp_path) -> None:
    closed = free_port()
    node = start_node("node-a", "--notify-url", f"http://alice:pa55word-xyz@127.0.0.1:{closed}/hook?key=k3y-value")
    submit(bucket, "told", {"name": "Touch", "module": "poltergust_testpipes", "out-dir": str(tmp_path / "t")},
           environment_yaml)
    result(bucket, "told", "done")
    wait_for(lambda: "could not notify" in node.output(), 120, "the notification to give up")
    assert "pa55word-xyz" not in node.output() and "k3y-value" not in node.output()
    assert "http://****@127.0.0.1" in node.output()


RUN_AS = "poltergust-run"


def zygote_of(process: Path, envs: Path) -> bool:
    """Is `process` (/proc/PID) a warm interpreter of an environment in `envs`?"""
    try:
        command = (process / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return len(command) > 1 and command[0].startswith(bytes(envs)) and command[1].endswith(b"zygote.py")


@pytest.mark.parametrize("backend", ["local"], indirect=True)
@pytest.mark.parametrize("warm", ["true", "false"])
def test_run_as_keeps_pipelines_out_of_the_cache_and_the_node(
    start_node, bucket, environment_yaml: str, tmp_path: Path, warm: str, wheelhouse: Path,
) -> None:
    """tests/run.sh creates the user; pipelines use the system python, which that user may run.

    The environment is built as that user too, from wheels it may read.

    Warm, the warm interpreter runs as that user too, and no run (same user) may trace it.
    """
    if os.geteuid() != 0:
        pytest.skip("--run-as needs the tests to run as root (as tests/run.sh does in CI)")
    user = pwd.getpwnam(RUN_AS)
    root = Path(tempfile.mkdtemp(prefix="poltergust-run-as-"))
    try:
        os.chmod(root, 0o755)
        out = root / "out"
        out.mkdir(mode=0o777)
        os.chmod(out, 0o777)
        envs, data = root / "environments", root / "data"
        start_node("node-a", "--run-as", RUN_AS, "--data-dir", str(data), "--env-dir", str(envs),
                   "--warm", warm)
        shutil.copytree(wheelhouse, root / "wheels")
        bucket.upload("environment/sys.yaml", "virtualenv:\n  python: /usr/bin/python3\n"
                      + environment_yaml.replace(str(wheelhouse), str(root / "wheels")))
        env = bucket.url("environment/sys.yaml")
        task = {"module": "poltergust_testpipes", "out-dir": str(out)}
        for name, target in (("cache", envs / "planted.txt"), ("node", data / "logs" / "planted.txt"),
                             ("fine", out / "planted.txt")):
            bucket.upload(f"pipeline/{name}.config.yaml", yaml.safe_dump(
                {"environment": env, "task": {**task, "name": "Plant", "target": str(target)}}))
        assert result(bucket, "fine", "done")
        assert (out / "planted.txt").stat().st_uid == user.pw_uid, "luigi ran as the unprivileged user"
        forked = "luigi forked from the environment's warm interpreter" in bucket.read(
            bucket.log_name("fine", "node-a")).decode()
        assert forked == (warm == "true")
        if forked:
            # The warm interpreter, in its sandbox: a child of bubblewrap's, started by the node.
            pid = next(p.name for p in Path("/proc").iterdir() if p.name.isdigit() and zygote_of(p, envs))
            uids = re.search(r"^Uid:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1)
            assert int(uids) == user.pw_uid, "the warm interpreter runs as the pipelines' user"
            assert Path(f"/proc/{pid}/mem").stat().st_uid == 0, "and is not dumpable: its runs cannot trace it"
        for name in ("cache", "node"):
            assert "Permission denied" in result(bucket, name, "error")["poltergust"]["log_tail"]
        assert not (envs / "planted.txt").exists() and not (data / "logs" / "planted.txt").exists()
        wait_for(lambda: not any((data / "work").iterdir()), 30, "the runs' private directories to be removed")
    finally:
        shutil.rmtree(root, ignore_errors=True)
