"""The --run-as sandbox on the real stack, as root: a user per run and build, nothing outlives its run.

Each test is an attack from issue 24 written as a pipeline (tests/testpipes: `Intrude`) or as a dependency
with a build backend of its own, run by a node started as the deploy starts it (root, `--run-as` with a pool),
and what the sandbox promises in general: a run that leaves a daemon, opens every other run's working
directory, lists the environment locks and writes into the environment cache finds every door closed, and
the next run of the same environment on the same node is untouched.
"""
from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
import yaml
from harness import WHEELHOUSE, result, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("bwrap") is None,
                                reason="the sandbox needs root and bubblewrap (tests/run.sh installs it, as in CI)")

POOL = ["poltergust-run-1", "poltergust-run-2", "poltergust-run-3", "poltergust-run-4"]
SECRET = "sandbox-secret-value-5"
"""A node variable named by --secret-env: no run or build may find it anywhere."""
SHARE_KEY = "sandbox-share-key-0123456789"


@pytest.fixture
def sandbox(wheelhouse: Path) -> Iterator[SimpleNamespace]:
    """Directories the pool's users can read (pytest's own are root's alone): wheels, outputs, cache, data."""
    root = Path(tempfile.mkdtemp(prefix="poltergust-sandbox-"))
    try:
        os.chmod(root, 0o755)
        wheels = root / "wheels"
        shutil.copytree(wheelhouse, wheels)
        out = root / "out"
        out.mkdir(mode=0o777)
        os.chmod(out, 0o777)
        yield SimpleNamespace(root=root, wheels=wheels, out=out, envs=root / "environments", data=root / "data")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def environment(sandbox: SimpleNamespace, *extra: str) -> str:
    lines = ["--no-index", f"--find-links {WHEELHOUSE}", f"--find-links {sandbox.wheels}", "luigi",
             "poltergust-testpipes", *extra]
    return "virtualenv:\n  python: /usr/bin/python3\ndependencies:\n" + "".join(f"  - {line}\n" for line in lines)


def start_sandboxed(start_node, sandbox: SimpleNamespace, *flags: str):
    return start_node("node-a", "--run-as", "poltergust-run", "--run-as-pool", str(len(POOL)),
                      "--data-dir", str(sandbox.data), "--env-dir", str(sandbox.envs), "--secret-env", "SANDBOX_VALUE",
                      *flags, env_overrides={"SANDBOX_VALUE": SECRET, "SANDBOX_SHARE_KEY": SHARE_KEY})


def submit(bucket, name: str, environment_name: str, task: dict) -> None:
    config = {"environment": bucket.url(f"environment/{environment_name}.yaml"),
              "task": {"module": "poltergust_testpipes", **task}}
    bucket.upload(f"pipeline/{name}.config.yaml", yaml.safe_dump(config))


def lock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("backend", ["local"], indirect=True)
@pytest.mark.parametrize("warm", ["true", "false"])
def test_every_door_is_closed_to_a_run_and_the_next_run_is_untouched(
    start_node, bucket, sandbox: SimpleNamespace, warm: str,
) -> None:
    """Attacks 2, 7 and 9 of issue 24, and the general promise, warm (forked) and spawned."""
    start_sandboxed(start_node, sandbox, "--warm", warm)
    bucket.upload("environment/sys.yaml", environment(sandbox))
    victim, intruder, after = (sandbox.out / name for name in ("victim", "intruder", "after"))
    submit(bucket, "victim", "sys", {"name": "Sleep", "out-dir": str(victim), "seconds": 90})
    [started] = wait_for(lambda: list(victim.glob("started-*")), 180, "the victim run to start")
    submit(bucket, "intruder", "sys", {"name": "Intrude", "out-dir": str(intruder), "env-dir": str(sandbox.envs),
                                       "secret": SECRET})
    result(bucket, "intruder", "done")
    found = json.loads((intruder / "intrude.json").read_text())
    forked = "luigi forked from the environment's warm interpreter" in bucket.read(
        bucket.log_name("intruder", "node-a")).decode()
    assert forked == (warm == "true")
    uids = {pwd.getpwnam(user).pw_uid for user in POOL}
    assert found["uid"] in uids and started.stat().st_uid in uids, "both ran as users of the pool"
    assert found["uid"] != started.stat().st_uid, "never the same user for two runs at once"
    assert not [cwd for cwd in found["cwds"] if "victim" in cwd[1]], "no other run's working directory"
    assert not [cwd for cwd in found["cwds"] if not cwd[1].startswith(str(sandbox.data / "work" / "intruder."))]
    assert found["secret"] == [], "the node's secret is in no environment the run can read"
    assert found["locks"] is None and "Permission denied" in found["locks_error"], "envs/.locks is closed"
    assert found["wrote"] == [], "nothing written into the environment cache"
    wait_for(lambda: lock_is_free(intruder / "daemon.lock"), 30, "the run's daemon to end with its run")
    assert not (victim / "slept.txt").exists(), "the victim still runs, untouched"

    submit(bucket, "after", "sys", {"name": "Report", "out-dir": str(after), "variable": "INTRUDED"})
    result(bucket, "after", "done")
    assert json.loads((after / "report.json").read_text())["value"] is None, "no .pth of the intruder ran"
    assert (after / "report.json").stat().st_uid == found["uid"], "the intruder's user (warm: its interpreter) served"
    assert not list(sandbox.envs.rglob("intruder.pth")) and not (sandbox.envs / "planted.txt").exists()
    [built] = [path for path in sandbox.envs.iterdir() if not path.name.startswith(".")]
    assert all(path.lstat().st_uid == 0 and (path.is_symlink() or not path.lstat().st_mode & 0o022)
               for path in [built, *built.rglob("*")]), "built by a pool user, the environment is root's alone"
    bucket.delete("pipeline/victim.config.yaml")


BACKEND = '''
import glob, hashlib, os
WANTED = {WANTED!r}
found = []
for path in glob.glob("/proc/[0-9]*/environ") + ["/proc/self/environ"]:
    try:
        entries = open(path, "rb").read().split(b"\\0")
    except OSError:
        continue
    for entry in entries:
        value = entry.partition(b"=")[2]
        if hashlib.sha256(value).hexdigest() in WANTED:
            found.append(path)
for site in glob.glob({ENVS!r} + "/*/lib/*/site-packages"):
    try:
        with open(os.path.join(site, "backdoor.pth"), "w") as handle:
            handle.write("import os\\n")
        found.append(site)
    except OSError:
        pass
print("poltergust-attack: the backend ran as uid", os.getuid(), "and reached", found or "nothing", flush=True)

def get_requires_for_build_wheel(config_settings=None):
    return []

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    raise RuntimeError("poltergust-attack: done")
'''


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_a_build_backend_reaches_no_secret_and_no_other_environment(
    start_node, bucket, sandbox: SimpleNamespace,
) -> None:
    """Attack 1 of issue 24: a dependency's PEP 517 backend runs at build time, with the node's secrets in reach."""
    start_sandboxed(start_node, sandbox, "--share-environments", "--share-environments-key-env", "SANDBOX_SHARE_KEY")
    bucket.upload("environment/victim.yaml", environment(sandbox))
    submit(bucket, "victim", "victim", {"name": "Touch", "out-dir": str(sandbox.out / "victim")})
    result(bucket, "victim", "done")
    package = sandbox.root / "hostile"
    package.mkdir()
    wanted = [__import__("hashlib").sha256(value.encode()).hexdigest() for value in (SECRET, SHARE_KEY)]
    (package / "hostile_backend.py").write_text(BACKEND.replace("{WANTED!r}", repr(wanted))
                                                .replace("{ENVS!r}", repr(str(sandbox.envs))))
    (package / "pyproject.toml").write_text('[project]\nname = "hostile"\nversion = "1"\n[build-system]\n'
                                            'requires = []\nbuild-backend = "hostile_backend"\nbackend-path = ["."]\n')
    for path in (package, *package.iterdir()):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    bucket.upload("environment/hostile.yaml", environment(sandbox, str(package)))
    submit(bucket, "hostile", "hostile", {"name": "Touch", "out-dir": str(sandbox.out / "hostile")})
    result(bucket, "hostile", "error")
    log = bucket.read(bucket.log_name("hostile", "node-a")).decode()
    uids = {pwd.getpwnam(user).pw_uid for user in POOL}
    ran = re.findall(r"poltergust-attack: the backend ran as uid (\d+) and reached (.*)", log)
    assert ran, log[-3000:]
    assert all(reached.startswith("nothing") for _, reached in ran), ran
    assert {int(uid) for uid, _ in ran} <= uids, "the build ran as a user of the pool"
    assert not list(sandbox.envs.rglob("backdoor.pth"))
    submit(bucket, "again", "victim", {"name": "Report", "out-dir": str(sandbox.out / "again")})
    result(bucket, "again", "done")


def test_a_warm_interpreter_answers_a_malformed_request_and_serves_on(tmp_path: Path) -> None:
    """Attack 9 of issue 24: one request the zygote could not decode ended it (and every later warm run)."""
    from poltergust.launch import zygote

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = subprocess.Popen([sys.executable, zygote.__file__, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    theirs.close()
    try:
        assert process.stdout.readline().startswith(zygote.READY)
        ours.settimeout(30)

        def ask(request: bytes) -> dict:
            connection, peer = socket.socketpair()
            report, child = socket.socketpair()
            read_end, write_end = os.pipe()
            ours.sendmsg([b"run"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     struct.pack("3i", peer.fileno(), child.fileno(), write_end))])
            for held in (peer, child):
                held.close()
            os.close(write_end)
            connection.settimeout(30)
            connection.sendall(struct.pack(">I", len(request)) + request)
            answers = connection.makefile()
            answer = json.loads(answers.readline())
            if "pid" in answer:
                assert "status" in json.loads(answers.readline())
            os.close(read_end)
            return answer

        for bad in (b"{not json", b"[1, 2]", b'{"argv": "x", "env": {}, "cwd": "/"}',
                    b'{"argv": [], "env": {"A": 1}, "cwd": "/"}', b'{"argv": [], "env": {}, "cwd": "relative"}',
                    "\udcff".encode("utf-8", "surrogatepass")):
            assert "request refused" in ask(bad)["error"]
        ours.sendmsg([b"something else"])  # not the node's message: ignored
        good = json.dumps({"argv": ["--help"], "env": {"PATH": os.environ["PATH"]}, "cwd": str(tmp_path)})
        assert "pid" in ask(good.encode()), "the interpreter still serves"
        assert process.poll() is None
    finally:
        process.stdin.close()
        process.wait(30)


def test_the_pool_never_gives_one_user_to_two_runs_at_once() -> None:
    """Leases: the first free user, a wait while all are taken, a user back even from a cancelled run."""
    import asyncio

    from poltergust.launch.sandbox import RunAs, RunAsError
    from poltergust.launch.users import UserPool, pool_users

    assert pool_users("p", 1) == ["p"] and pool_users("p", 3) == ["p-1", "p-2", "p-3"]
    with pytest.raises(RunAsError, match="--run-as-pool"):
        pool_users("p", 0)
    with pytest.raises(RunAsError, match="distinct uids"):
        UserPool([RunAs("a", 1000, 1000), RunAs("b", 1000, 1001)])
    assert [u.user for u in UserPool.lookup("poltergust-run", 4).users] == POOL
    from poltergust.settings import parse_settings

    flags = ["--path", "/tmp/bucket/pipeline", "--run-as", "poltergust-run"]
    assert [u.user for u in parse_settings([*flags, "--run-as-pool", "4"]).run_as.users] == POOL
    assert [u.user for u in parse_settings(flags).run_as.users] == ["poltergust-run"], "a pool of one, as before"
    with pytest.raises(SystemExit):
        parse_settings(["--path", "/tmp/bucket/pipeline", "--run-as-pool", "4"])

    async def scenario() -> None:
        pool = UserPool([RunAs("a", 1002, 1002), RunAs("b", 1001, 1001)])
        held: list[str] = []
        waited: list[str] = []

        async def run(name: str, release: asyncio.Event) -> None:
            async with pool.lease(lambda: waited.append(name)) as user:
                assert user.user not in held
                held.append(user.user)
                try:
                    await release.wait()
                finally:
                    held.remove(user.user)

        first, second, third = asyncio.Event(), asyncio.Event(), asyncio.Event()
        one = asyncio.ensure_future(run("one", first))
        two = asyncio.ensure_future(run("two", second))
        await asyncio.sleep(0)
        assert held == ["a", "b"], "the first free user in the pool's order"
        three = asyncio.ensure_future(run("three", third))
        await asyncio.sleep(0)
        assert waited == ["three"] and held == ["a", "b"]
        one.cancel()  # a cancelled run gives its user back
        await asyncio.wait_for(asyncio.gather(one, return_exceptions=True), 5)
        await asyncio.sleep(0)
        assert held == ["b", "a"], "the waiting run got the freed user"
        for event in (second, third):
            event.set()
        await asyncio.wait_for(asyncio.gather(two, three), 5)
        async with pool.lease() as user:
            assert user.user == "a"

    asyncio.run(scenario())
