"""Environments: uv builds, the cache and its eviction, archives shared between nodes, secrets, interpreters.

Tests that need no servers call `Environments` directly; the others run real
nodes on the stack. Every test starts with an empty environment cache of its own.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import gzip
import hashlib
import http.server
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from harness import WHEELHOUSE, GatedProxy, get_in_task, offline, pipe_task, result, run_log, run_logs, submit, wait_for

from poltergust.config import parse_environment
from poltergust.environments import Environments, interpreters, parse_size, plan
from poltergust.environments import archive as env_archive
from poltergust.environments.plan import installer_settings
from poltergust.run.log import RunLog
from poltergust.storage.local import LocalStore

VERSION = "import sys; print('%d.%d' % sys.version_info[:2])"
KEY_LENGTH = 32


@pytest.fixture
def env_dir(tmp_path: Path) -> Path:
    """Overrides the session-wide cache of conftest: these tests need to see builds happen."""
    return tmp_path / "environments"


def built_keys(env_dir: Path) -> list[str]:
    return sorted(p.name for p in env_dir.iterdir() if len(p.name) == KEY_LENGTH and (p / ".poltergust.json").exists())


def other_python(*versions: str) -> str:
    """The first of `versions` this machine has (pyenv's, say) that the tests' Python is not; else skip."""
    own = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for version in versions:
        if version == own:
            continue
        try:
            interpreters.find(f"python{version}", os.environ)
            return version
        except interpreters.InterpreterNotFound:
            continue
    pytest.skip(f"no Python {' or '.join(versions)} on this machine besides the tests' own")


def spec(text: str, source: str):
    return parse_environment(text.encode(), source)


def key_of(environment) -> str:
    """The cache key a node on this machine gives `environment`."""
    return plan.key(environment, plan.find_interpreter(environment, os.environ))


# -- on real nodes ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_second_run_is_a_cache_hit_and_an_edited_file_builds_anew(
    start_node, bucket, wheelhouse: Path, env_dir: Path, tmp_path: Path,
) -> None:
    start_node("node-a")
    submit(bucket, "first", pipe_task("Touch", tmp_path / "out" / "first"),
           offline(wheelhouse, "luigi", "poltergust-testpipes"))
    result(bucket, "first", "done")
    assert "building environment" in run_log(tmp_path, "node-a", "first")
    [key] = built_keys(env_dir)

    submit(bucket, "second", pipe_task("Touch", tmp_path / "out" / "second"))
    result(bucket, "second", "done")
    second = run_log(tmp_path, "node-a", "second")
    assert f"environment {key} is ready (cached)" in second
    assert "building environment" not in second and "$ uv" not in second

    # Same packages, different file: a new environment; the old one stays cached.
    submit(bucket, "third", pipe_task("Touch", tmp_path / "out" / "third"),
           offline(wheelhouse, "luigi", "poltergust-testpipes", "six"))
    result(bucket, "third", "done")
    assert "building environment" in run_log(tmp_path, "node-a", "third")
    assert key in built_keys(env_dir) and len(built_keys(env_dir)) == 2


@pytest.mark.parametrize("backend", ["gcs"], indirect=True)
def test_runs_racing_for_a_new_environment_build_it_once(
    start_node, bucket, wheelhouse: Path, env_dir: Path, tmp_path: Path,
) -> None:
    """Two node processes sharing one cache, three pipelines at once: six runs need the environment."""
    start_node("node-a")
    start_node("node-b")
    bucket.upload("environment/race.yaml", offline(wheelhouse, "luigi", "poltergust-testpipes"))
    names = ["race-1", "race-2", "race-3"]
    for name in names:
        submit(bucket, name, pipe_task("Touch", tmp_path / "out" / name), nodes="all", environment="race")
    for name in names:
        result(bucket, name, "done")
    wait_for(lambda: all(run_log(tmp_path, node, name) for node in ("node-a", "node-b") for name in names), 30,
             "every node to have run every pipeline")
    logs = run_logs(tmp_path, "node-a", "node-b")
    assert logs.count("building environment") == 1, logs
    assert logs.count("$ uv pip install") == 1
    assert "waiting for environment" in logs
    assert len(built_keys(env_dir)) == 1


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_failed_build_is_reported_with_the_installer_output_and_retried(
    start_node, bucket, wheelhouse: Path, env_dir: Path, tmp_path: Path,
) -> None:
    start_node("node-a")
    submit(bucket, "broken", pipe_task("Touch", tmp_path / "out" / "broken"),
           offline(wheelhouse, "luigi", "no-such-package"), environment="bad")
    error = result(bucket, "broken", "error")["poltergust"]
    assert "\n" not in error["reason"]
    assert "installing the dependencies failed (uv exit 1)" in error["reason"]
    assert "no-such-package was not found" in error["reason"]
    assert "No solution found when resolving dependencies" in error["log_tail"]
    assert built_keys(env_dir) == []
    assert not [p for p in env_dir.iterdir() if p.name.startswith(".build-")], "a failed build leaves nothing"

    submit(bucket, "fixed", pipe_task("Touch", tmp_path / "out" / "fixed"),
           offline(wheelhouse, "luigi", "poltergust-testpipes"), environment="bad")
    result(bucket, "fixed", "done")
    assert "building environment" in run_log(tmp_path, "node-a", "fixed")
    assert len(built_keys(env_dir)) == 1


SHARE_KEY = "test-share-key-" + os.urandom(16).hex()
"""The key the test nodes sign shared environments with."""


@pytest.fixture
def own_env_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TEST_SHARE_KEY", SHARE_KEY)

    def make(name: str) -> list[str]:
        return ["--env-dir", str(tmp_path / f"envs-{name}"), "--share-environments",
                "--share-environments-key-env", "TEST_SHARE_KEY"]
    return make


def test_a_node_unpacks_the_archive_another_node_built(
    start_node, bucket, wheelhouse: Path, tmp_path: Path, own_env_dirs,
) -> None:
    node_a = start_node("node-a", *own_env_dirs("a"))
    submit(bucket, "one", pipe_task("Touch", tmp_path / "out" / "one"),
           offline(wheelhouse, "luigi", "poltergust-testpipes"), environment="shared")
    result(bucket, "one", "done")
    [key] = built_keys(tmp_path / "envs-a")
    archive = f"environment/shared.env/{key}.tar.gz"
    wait_for(lambda: bucket.exists(archive) and "shared environment" in node_a.output(), 60, "the archive upload")
    node_a.stop()

    start_node("node-b", *own_env_dirs("b"))
    submit(bucket, "two", pipe_task("Touch", tmp_path / "out" / "two"), environment="shared")
    result(bucket, "two", "done")
    log = run_log(tmp_path, "node-b", "two")
    assert f"environment {key} downloaded from {bucket.url(archive)}" in log
    assert "building environment" not in log and "$ uv" not in log
    assert built_keys(tmp_path / "envs-b") == [key]


@pytest.mark.parametrize("backend", ["gcs"], indirect=True)
def test_a_stopping_node_finishes_its_archive_uploads_first(
    start_node, bucket, gcs, wheelhouse: Path, tmp_path: Path, own_env_dirs,
) -> None:
    """SIGTERM while an archive upload is on its way: the node waits for it (bounded) before exiting."""
    proxy = GatedProxy(gcs.url, lambda method, path, body: method == "POST" and b"application/gzip" in body)
    try:
        node = start_node("node-a", *own_env_dirs("a"), env_overrides={"STORAGE_EMULATOR_HOST": proxy.url})
        submit(bucket, "one", pipe_task("Touch", tmp_path / "out" / "one"),
               offline(wheelhouse, "luigi", "poltergust-testpipes"), environment="shared")
        result(bucket, "one", "done")
        [key] = built_keys(tmp_path / "envs-a")
        archive = f"environment/shared.env/{key}.tar.gz"
        wait_for(proxy.held.is_set, 60, "the archive upload to reach the bucket")
        node.signal(signal.SIGTERM)
        wait_for(lambda: f"waiting up to 60s for 1 environment archive upload(s): {bucket.url(archive)}"
                 in node.output(), 30, "the node to say what it waits for")
        assert node.process.poll() is None, "the node waits for the upload"
        assert not bucket.exists(archive)
        proxy.release()
        assert node.process.wait(60) == 0
    finally:
        proxy.close()
    assert proxy.dropped == 0
    assert bucket.exists(archive), "the upload was completed, not dropped"


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_secrets_never_reach_logs_error_files_or_command_lines(
    start_node, bucket, wheelhouse: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = f"tok-{os.urandom(8).hex()}"
    requested: list[str] = []
    slow_started = threading.Event()

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 -- the http.server interface
            requested.append(self.path)
            if self.path.endswith("/slow/"):
                slow_started.set()
                time.sleep(4)
                body = b"<html><body></body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    index = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("TEST_INDEX_TOKEN", secret)
    try:
        node = start_node("node-a")
        submit(bucket, "slow", pipe_task("Touch", tmp_path / "out" / "slow"),
               offline(wheelhouse, f"--find-links {index}/{{{{TEST_INDEX_TOKEN}}}}/slow/", "luigi",
                       "poltergust-testpipes"), environment="slow")
        assert slow_started.wait(60), "the installer never asked the index"
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                assert secret.encode() not in cmdline.read_bytes(), f"the secret is on a command line: {cmdline}"
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
        result(bucket, "slow", "done")

        submit(bucket, "leaky", pipe_task("Touch", tmp_path / "out" / "leaky"),
               offline(wheelhouse, f"--find-links {index}/{{{{TEST_INDEX_TOKEN}}}}/missing/", "luigi"),
               environment="leaky")
        error = result(bucket, "leaky", "error")
    finally:
        server.shutdown()
    assert f"/{secret}/slow/" in requested and f"/{secret}/missing/" in requested, "substituted at install time"
    assert "/****/missing/" in error["poltergust"]["reason"], "the installer's error names the URL, masked"
    assert "$ uv pip install" in run_log(tmp_path, "node-a", "slow")
    assert "/****/slow/" in run_log(tmp_path, "node-a", "slow")
    everything = [run_logs(tmp_path, "node-a"), node.output(), yaml.safe_dump(error),
                  bucket.read("pipeline/slow.done.yaml").decode(),
                  bucket.read(bucket.log_name("slow", "node-a")).decode(),
                  bucket.read(bucket.log_name("leaky", "node-a")).decode()]
    for text in everything:
        assert secret not in text


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_environment_file_chooses_the_python_version(
    start_node, bucket, wheelhouse: Path, env_dir: Path, tmp_path: Path,
) -> None:
    """`python: python3.12` on a node running another version (here a pyenv shim on PATH that is not selected).

    The tests' wheelhouse serves luigi's dependencies for CPython 3.11 and later (abi3 wheels).
    """
    version = other_python("3.12", "3.13", "3.11")
    start_node("node-a")
    submit(bucket, "other", pipe_task("Touch", tmp_path / "out" / "other"),
           offline(wheelhouse, "luigi", "poltergust-testpipes", options=f"virtualenv:\n  python: python{version}\n"),
           environment="other")
    result(bucket, "other", "done")
    assert f"with CPython {version}." in run_log(tmp_path, "node-a", "other")
    [key] = built_keys(env_dir)
    found = subprocess.run([env_dir / key / "bin" / "python", "-c", VERSION], capture_output=True, text=True,
                           check=True).stdout
    assert found.strip() == version


# -- Environments on its own ----------------------------------------------------


async def test_interpreter_of_another_version_is_found_and_used(tmp_path: Path) -> None:
    version = other_python("3.8", "3.9", "3.10", "3.12", "3.13")
    envs = Environments(tmp_path / "envs")
    runlog = RunLog(tmp_path / "run.log")
    by_name = spec(f"virtualenv: {{python: python{version}}}\n"
                   f"dependencies: [--no-index, --find-links {WHEELHOUSE}, six]\n", "file:///b/environment/e.yaml")
    path = await get_in_task(envs, by_name, runlog)
    found = subprocess.run([path / "bin" / "python", "-c", "import six; " + VERSION], capture_output=True,
                           text=True, check=True).stdout
    assert found.strip() == version
    by_version = spec(f"virtualenv: {{python: '{version}'}}\n"
                      f"dependencies: [--no-index, '--find-links   {WHEELHOUSE}', six]\n",
                      "file:///b/environment/o.yaml")
    assert key_of(by_version) == key_of(by_name), "same interpreter, same normalised content: one key"
    assert key_of(spec("dependencies: [six]\n", "x.yaml")) != key_of(spec(
        f"virtualenv: {{python: python{version}}}\ndependencies: [six]\n", "x.yaml")), "the interpreter is in the key"
    with pytest.raises(Exception, match=r"virtualenv.python: no interpreter 'python3.99' on this node"):
        await envs.get(spec("virtualenv: {python: python3.99}\n", "file:///b/environment/e.yaml"), runlog)


def test_the_nodes_own_interpreter_is_probed_right_by_many_threads_at_once(monkeypatch) -> None:
    """Pipelines starting together probe the node's interpreter in several threads; each must read its own answer."""

    class Forgets(dict):
        def __setitem__(self, key, value) -> None:
            """Remember nothing, so that every call probes."""

    monkeypatch.setattr(interpreters, "_probed", Forgets())
    own = interpreters.own_interpreter()
    start = threading.Barrier(8)

    def probe_many() -> list[str]:
        start.wait()
        return [interpreters.probe(own).version for _ in range(200)]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        versions = [v for found in pool.map(lambda _: probe_many(), range(8)) for v in found]
    assert set(versions) == {platform.python_version()}


def test_pip_settings_reach_uv_in_its_own_formats() -> None:
    env, flags = installer_settings({"PIP_FIND_LINKS": "/a  /b", "PIP_NO_INDEX": "true", "PIP_INDEX_URL": "http://i",
                                     "PIP_EXTRA_INDEX_URL": "http://x http://y", "VIRTUAL_ENV": "/v"})
    assert env["UV_FIND_LINKS"] == "/a,/b"  # uv separates them with commas, pip with spaces
    assert env["UV_INDEX_URL"] == "http://i" and env["UV_EXTRA_INDEX_URL"] == "http://x http://y"
    assert flags == ["--no-index"]  # uv reads no variable for it
    assert "VIRTUAL_ENV" not in env
    assert installer_settings({"PIP_NO_INDEX": "0"})[1] == []
    assert parse_size("10G") == 10 * 1024 ** 3 and parse_size("1.5M") == 1572864 and parse_size("0") is None


async def test_pip_settings_and_the_virtualenv_fallback_give_a_usable_environment(
    tmp_path: Path, wheelhouse: Path,
) -> None:
    """An option uv lacks (`copies`): virtualenv and pip build it in a staging dir; it works once moved."""
    pytest.importorskip("virtualenv")
    node = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": f"{WHEELHOUSE} {wheelhouse}"}
    envs = Environments(tmp_path / "envs", node)
    runlog = RunLog(tmp_path / "run.log")
    packages = "dependencies: [luigi, poltergust-testpipes]\n"
    path = await get_in_task(envs, spec(packages, "file:///b/environment/uv.yaml"), runlog)
    subprocess.run([path / "bin" / "python", "-c", "import luigi, poltergust_testpipes"], check=True)

    path = await get_in_task(envs, spec("virtualenv: {copies: true}\n" + packages, "file:///b/environment/v.yaml"),
                             runlog)
    log = (tmp_path / "run.log").read_text()
    assert "uv has no equivalent of the virtualenv option copies: True; building with virtualenv and pip" in log
    assert "$ pip install" in log
    assert not (path / "bin" / "python").is_symlink(), "the option was honoured"
    assert f"{path}/bin/python" in "".join((path / "bin" / "luigi").read_text().splitlines()[:3]), "its shebang"
    assert f"VIRTUAL_ENV={path}\n" in (path / "bin" / "activate").read_text()
    staging = f"{envs.root}/.build-".encode()
    assert not [p for p in (path / "bin").iterdir() if p.is_file() and staging in p.read_bytes()]
    subprocess.run([path / "bin" / "luigi", "--help"], check=True, capture_output=True)
    subprocess.run([path / "bin" / "python", "-c", "import luigi, poltergust_testpipes"], check=True)


async def test_eviction_removes_the_least_recently_used_environments_not_in_use(tmp_path: Path) -> None:
    root = tmp_path / "envs"
    envs = Environments(root)
    runlog = RunLog(tmp_path / "run.log")
    specs = {name: spec(f"virtualenv: {{prompt: {name}}}\n", f"file:///b/environment/{name}.yaml")
             for name in "ABCDEF"}
    keys = {name: key_of(s) for name, s in specs.items()}
    for name in "ABC":
        await get_in_task(envs, specs[name], runlog)

    def age(ages: dict[str, int]) -> None:
        """Pretend sizes of 10 MB and uses `seconds` ago, so the test decides the order."""
        for name, seconds in ages.items():
            manifest = root / keys[name] / ".poltergust.json"
            manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "size": 10_000_000}))
            os.utime(manifest, (time.time() - seconds,) * 2)

    stale = root / f".build-{keys['F']}-crashed"
    stale.mkdir()
    os.utime(stale, (time.time() - 3600,) * 2)

    # A is the least recently used but in use by a running pipeline; B is next.
    age({"A": 300, "B": 200, "C": 100})
    in_use = asyncio.Event()
    done = asyncio.Event()

    async def running_pipeline() -> None:
        await envs.get(specs["A"], runlog)
        in_use.set()
        await done.wait()

    pipeline = asyncio.create_task(running_pipeline())
    await in_use.wait()
    age({"A": 300})  # the use just now must not count: it is the oldest
    envs.cache_size = 25_000_000  # three pretend environments of 10 MB and a real small one: one must go
    await get_in_task(envs, specs["D"], runlog)
    assert built_keys(root) == sorted([keys["A"], keys["C"], keys["D"]])
    assert f"evicted environment {keys['B']}" in (tmp_path / "run.log").read_text()
    assert not stale.exists(), "a crashed build's staging directory is cleaned up"
    done.set()
    await pipeline

    # Another node process sharing the directory uses C (it holds the shared lock); A is free again.
    age({"C": 500, "A": 400, "D": 50})
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_SH); print('held', flush=True); time.sleep(60)",
         str(root / ".locks" / f"{keys['C']}.use")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        await get_in_task(envs, specs["E"], runlog)
    finally:
        holder.kill()
        holder.wait()
    assert built_keys(root) == sorted([keys["C"], keys["D"], keys["E"]])


async def test_eviction_calls_the_hook_with_each_evicted_key(tmp_path: Path) -> None:
    evicted: list[str] = []
    envs = Environments(tmp_path / "envs", cache_size=1, on_evict=evicted.append)
    runlog = RunLog(tmp_path / "run.log")
    first, second = (spec(f"virtualenv: {{prompt: {name}}}\n", f"file:///b/environment/{name}.yaml") for name in "AB")
    await get_in_task(envs, first, runlog)
    assert evicted == [], "an environment in use is never evicted"
    await get_in_task(envs, second, runlog)
    assert evicted == [key_of(first)]
    assert built_keys(envs.root) == [key_of(second)]


async def test_foreign_tampered_or_corrupt_archives_are_refused_and_rebuilt(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    (bucket / "environment").mkdir(parents=True)
    source = f"file://{bucket}/environment/e.yaml"
    environment = spec(f"dependencies: [--no-index, --find-links {WHEELHOUSE}, six]\n", source)
    nodes = iter("ABCDEFG")

    async def node() -> tuple[Environments, RunLog, Path]:
        name = next(nodes)
        envs = Environments(tmp_path / f"envs-{name}", share=True, share_key=SHARE_KEY.encode())
        return envs, RunLog(tmp_path / f"{name}.log"), tmp_path / f"{name}.log"

    builder, runlog, _ = await node()
    await get_in_task(builder, environment, runlog)
    await builder.wait_background()
    key = key_of(environment)
    name = f"environment/e.env/{key}.tar.gz"
    store = LocalStore(bucket)
    good = await store.read(name)
    assert good.info.metadata[env_archive.META_KEY] == key

    def repack(data: bytes, **manifest_changes) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as source_tar, \
                tarfile.open(fileobj=out, mode="w:gz") as target:
            for member in source_tar.getmembers():
                content = source_tar.extractfile(member).read() if member.isreg() else None
                if member.name == ".poltergust.json":
                    manifest = json.loads(content)
                    manifest["identity"] = {**manifest["identity"], **manifest_changes}
                    content = json.dumps(manifest).encode()
                    member.size = len(content)
                target.addfile(member, io.BytesIO(content) if content is not None else None)
        return out.getvalue()

    async def upload(data: bytes, identity: dict) -> None:
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                members = tar.getmembers()
        except tarfile.TarError:
            members = []
        packed = env_archive.Packed(data, hashlib.sha256(data).hexdigest(), len(members),
                                    sum(member.size for member in members if member.isreg()))
        metadata = env_archive.metadata_for(packed, key, identity, "test", SHARE_KEY.encode())
        await store.write(name, data, metadata=metadata)

    async def expect_refusal(why: str) -> None:
        envs, runlog, log_path = await node()
        path = await get_in_task(envs, environment, runlog)
        log = log_path.read_text()
        assert f"not using the shared archive {source[:-len('e.yaml')]}e.env/{key}.tar.gz: {why}" in log, log
        assert "building environment" in log
        subprocess.run([path / "bin" / "python", "-c", "import six"], check=True)
        await envs.wait_background()  # its own good archive replaces the bad one

    ours = json.loads((tmp_path / "envs-A" / key / ".poltergust.json").read_text())["identity"]
    foreign = {**ours, "platform": "macosx-14.0-arm64", "libc": ""}
    # Built elsewhere, uploaded honestly under this key: its metadata says where it was built.
    await upload(repack(good.data, platform="macosx-14.0-arm64", libc=""), foreign)
    await expect_refusal("it was built for another interpreter or platform")
    # Metadata claiming this platform over a foreign manifest.
    await upload(repack(good.data, platform="macosx-14.0-arm64", libc=""), ours)
    await expect_refusal("its manifest describes another environment")
    # A truncated upload keeping the metadata of the complete one.
    good = await store.read(name)
    await store.write(name, good.data[: len(good.data) // 2], metadata=good.info.metadata)
    await expect_refusal("it is corrupt")
    # Not gzip at all, with a checksum that matches.
    await upload(gzip.compress(b"not a tar file"), ours)
    await expect_refusal("it cannot be unpacked")

    envs, runlog, log_path = await node()
    await get_in_task(envs, environment, runlog)
    assert f"environment {key} downloaded from" in log_path.read_text(), "the rebuilt archive is good"
