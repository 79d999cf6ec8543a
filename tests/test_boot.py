"""The VM boot path for real: build a release, boot both roles with deploy/node-init.sh, run what the units run.

Each boot runs node-init.sh (not a dry run) under a throwaway root (`--root`),
against a loopback metadata server (tests/deploy_fixtures/fake_metadata.py),
with the release's wheel and lock file in the GCS emulator and `systemctl`
replaced by a recorder. The script creates the venv, installs the wheel with
`pip --require-hashes` from a local wheelhouse (no package index), writes the
unit. The test then starts the unit's ExecStart with the unit's environment,
umask, state directory modes and capability bounding set, as systemd would
(only the listen addresses become loopback ports), and runs a pipeline through
the booted luigid (with the deploy's luigid configuration) and node: the node as
root with `--run-as poltergust-run --run-as-pool 4` (the users tests/run.sh
creates), the build and the pipeline as users of that pool. The scheduler's
dashboard answers on its port, listing that pipeline.
"""
from __future__ import annotations

import json
import os
import platform
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from deploy_fixtures.fake_metadata import FakeMetadata
from harness import (
    PROJECT,
    ROOT,
    TOPIC,
    WHEELHOUSE,
    Bucket,
    FakeGcs,
    PubSubEmulator,
    Server,
    free_port,
    resource_totals,
    wait_for,
)

pytestmark = pytest.mark.deploy

NODE_INIT = ROOT / "deploy" / "node-init.sh"
BUILD_RELEASE = ROOT / "deploy" / "build-release.sh"
UV = os.environ.get("UV") or next((str(p) for p in [Path(sys.executable).parent / "uv"] if p.exists()),
                                  shutil.which("uv") or "uv")
SYSTEM_PREFIXES = ("/opt/poltergust", "/var/lib/poltergust", "/var/cache/poltergust", "/etc/poltergust")
SECRET = 'pa$$ "w\\ord" `x`'
RUN_AS = "poltergust-run"
POOL = [f"{RUN_AS}-{slot}" for slot in range(1, 5)]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A release built by deploy/build-release.sh from this checkout, from the local wheelhouse only."""
    subprocess.run(["bash", str(ROOT / "tests" / "setup" / "runtime-wheels.sh"), str(WHEELHOUSE)], check=True,
                   env={**os.environ, "PYTHON": sys.executable}, timeout=600)
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "UV": str(UV)}
    built = subprocess.run(["bash", str(BUILD_RELEASE), "--out-dir", str(out), "--wheelhouse", str(WHEELHOUSE),
                            "--python-version", platform.python_version()],
                           capture_output=True, text=True, env=env, timeout=300)
    assert built.returncode == 0, built.stderr
    manifest = json.loads((out / "release.json").read_text())
    manifest["dir"] = out / manifest["version"]
    assert built.stdout.strip() == manifest["version"]
    return manifest


@pytest.fixture
def dist(gcs: FakeGcs, release: dict) -> Iterator[tuple[Bucket, dict[str, str]]]:
    """The release uploaded as the deploy does, and the metadata attributes that point at it."""
    bucket = Bucket(gcs, f"boot-{uuid.uuid4().hex[:12]}")
    prefix = f"_poltergust/dist/{release['version']}/"
    for name in (release["wheel"], release["lock"]):
        bucket.upload(prefix + name, (release["dir"] / name).read_bytes())
    yield bucket, {
        "poltergust-wheel-url": bucket.url(prefix + release["wheel"]),
        "poltergust-wheel-sha256": release["wheel_sha256"],
        "poltergust-lock-url": bucket.url(prefix + release["lock"]),
        "poltergust-lock-sha256": release["lock_sha256"],
    }


class Boot:
    """One run of node-init.sh on a throwaway root."""

    def __init__(self, tmp_path: Path, name: str, metadata: FakeMetadata, gcs: FakeGcs,
                 wheelhouse: Path = WHEELHOUSE, root: Path | None = None) -> None:
        self.root = root or tmp_path / name
        bin_dir = tmp_path / f"{name}-bin"
        bin_dir.mkdir()
        self.calls = tmp_path / f"{name}-systemctl.log"
        (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$*" >>"{self.calls}"\n')
        (bin_dir / "systemctl").chmod(0o755)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("POLTERGUST_", "PIP_", "UV_"))}
        self.env.update(PATH=f"{bin_dir}{os.pathsep}{self.env['PATH']}", GCE_METADATA_HOST=metadata.host,
                        STORAGE_EMULATOR_HOST=gcs.url, POLTERGUST_SECRET_MANAGER_URL=metadata.url,
                        PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheelhouse))
        self.run()

    def run(self) -> None:
        """Run node-init.sh (again: a reboot)."""
        self.calls.unlink(missing_ok=True)
        self.result = subprocess.run(["bash", str(NODE_INIT), "--root", str(self.root)],
                                     capture_output=True, text=True, env=self.env, timeout=300)

    def systemctl(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def unit(self, name: str) -> str:
        return (self.root / "etc/systemd/system" / name).read_text()

    def here(self, path: str) -> str:
        """A system path as it lies under the throwaway root."""
        return f"{self.root}{path}" if path.startswith(SYSTEM_PREFIXES) else path

    def start(self, unit_name: str, log: Path, extra_env: dict[str, str], listen: dict[str, str]) -> Server:
        """Start the unit's ExecStart as systemd would: its Environment=, EnvironmentFile=, LoadCredential=
        (%d), WorkingDirectory=, UMask=, NoNewPrivileges=, CapabilityBoundingSet= (as root) and the modes of
        its state directories."""
        unit = self.unit(unit_name)
        env = {"PATH": os.environ["PATH"], **extra_env}
        for value in directives(unit, "Environment"):
            for assignment in shlex.split(value):
                key, _, val = assignment.partition("=")
                env[key] = self.here(val)
        for value in directives(unit, "EnvironmentFile"):
            path = Path(self.here(value.lstrip("-")))
            if path.exists() or not value.startswith("-"):
                env.update(parse_environment_file(path.read_text()))
        for kind, base in (("State", "/var/lib"), ("Cache", "/var/cache")):
            mode = int((directives(unit, f"{kind}DirectoryMode") or ["0755"])[0], 8)
            for name in " ".join(directives(unit, f"{kind}Directory")).split():
                Path(self.here(f"{base}/{name}")).mkdir(parents=True, exist_ok=True)
                os.chmod(self.here(f"{base}/{name}"), mode)
        credentials = Path(tempfile.mkdtemp(prefix="credentials-", dir=self.root))
        for value in directives(unit, "LoadCredential"):
            name, _, source = value.partition(":")
            shutil.copyfile(self.here(source), credentials / name)
            os.chmod(credentials / name, 0o400)
        specifiers = {"%": "%", "d": str(credentials)}
        words = [re.sub("%(.)", lambda m: specifiers[m[1]], w.replace("$$", "$"))
                 for w in shlex.split(directives(unit, "ExecStart")[0])]
        words = [self.here(w) for w in words]
        for flag, value in listen.items():
            words[words.index(flag) + 1] = value
        if os.geteuid() == 0:
            bounding = ["-all"] + ["+" + cap.lower().removeprefix("cap_")
                                   for cap in directives(unit, "CapabilityBoundingSet")[-1].split()]
            words = ["setpriv", f"--bounding-set={','.join(bounding)}",
                     *(["--no-new-privs"] if directives(unit, "NoNewPrivileges") == ["yes"] else []), "--", *words]
        words = ["sh", "-c", f'umask {directives(unit, "UMask")[0]} && exec "$@"', "sh", *words]
        cwd = Path(self.here(directives(unit, "WorkingDirectory")[0]))
        return Server(unit_name, words, log, env=env, cwd=cwd)


def directives(unit: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith(key + "=")]


def parse_environment_file(text: str) -> dict[str, str]:
    """KEY=VALUE and KEY="VALUE" lines as systemd reads them (double quotes: backslash escapes \\ \" ` $)."""
    env = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if not value.startswith('"'):
            env[key] = value
            continue
        out, chars = [], iter(value[1:])
        for char in chars:
            if char == '"':
                break
            if char == "\\":
                char = next(chars)
                out.append(char if char in '"\\`$' else "\\" + char)
            else:
                out.append(char)
        env[key] = "".join(out)
    return env


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return 0


def installed(boot: Boot, release_dir: Path) -> dict[str, str]:
    python = release_dir / "venv" / "bin" / "python"
    listing = subprocess.run([str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                             capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]})
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listing.stdout)
            if p["name"] not in ("pip", "setuptools")}


def locked(lock: str) -> dict[str, str]:
    pins = [line.split()[0] for line in lock.splitlines() if "==" in line and not line.startswith(" ")]
    return {name.lower().replace("_", "-"): version for name, version in (p.split("==") for p in pins)}


def test_a_fleet_boots_from_the_bucket_and_runs_a_pipeline(
    tmp_path: Path, gcs: FakeGcs, pubsub: PubSubEmulator, dist, release: dict, environment_yaml: str,
    wheelhouse: Path,
) -> None:
    bucket, release_attributes = dist
    if os.geteuid() != 0:
        pytest.skip("the booted node runs as root to start pipelines as poltergust-run (tests/run.sh runs as root)")
    pool_uids = {pwd.getpwnam(user).pw_uid for user in POOL}  # made by tests/run.sh
    servers: list[Server] = []
    # The node's root must be traversable by the pipelines' user, as / is on a VM.
    node_root = Path(tempfile.mkdtemp(prefix="poltergust-boot-"))
    os.chmod(node_root, 0o755)
    metadata = FakeMetadata({"poltergust-role": "scheduler", **release_attributes,
                             "poltergust-path": bucket.url("pipeline"),
                             "poltergust-luigid-config": "[resources]\nwarehouse = 2\n"}, PROJECT)
    try:
        # The scheduler VM: luigid and the dashboard.
        scheduler = Boot(tmp_path, "scheduler", metadata, gcs)
        assert scheduler.result.returncode == 0, scheduler.result.stderr
        assert scheduler.systemctl() == ["daemon-reload", "enable poltergust-luigid.service",
                                         "restart poltergust-luigid.service", "daemon-reload",
                                         "enable poltergust-dashboard.service", "restart poltergust-dashboard.service"]
        luigid_port = free_port()
        luigid = scheduler.start("poltergust-luigid.service", tmp_path / "luigid.log", {},
                                 {"--port": str(luigid_port), "--address": "127.0.0.1"})
        servers.append(luigid)
        luigid_url = f"http://127.0.0.1:{luigid_port}"
        wait_for(lambda: luigid.check_alive() or http_status(f"{luigid_url}/api/task_list?data=%7B%7D") == 200,
                 60, "the booted luigid to answer")
        # The deploy's luigid configuration, merged with the fleet's settings, is what the booted luigid holds.
        assert resource_totals(luigid_url) == {"warehouse": 2}
        luigi_cfg = scheduler.root / "etc/poltergust/luigi.cfg"
        assert "[resources]\nwarehouse = 2\n" in luigi_cfg.read_text()
        assert "worker_disconnect_delay = 30\n" in luigi_cfg.read_text()
        # A reboot with a key luigid must not take stops before anything is rewritten, naming attribute and key.
        metadata.attributes["poltergust-luigid-config"] = "[scheduler]\nstate_path = /tmp/elsewhere\n"
        written = luigi_cfg.read_text()
        scheduler.run()
        assert scheduler.result.returncode == 2, scheduler.result.stderr
        assert ("error: metadata attribute poltergust-luigid-config: [scheduler] state_path: Poltergust sets "
                "luigid's state file itself") in scheduler.result.stderr
        assert scheduler.systemctl() == [] and luigi_cfg.read_text() == written
        dashboard_port = free_port()
        dashboard = scheduler.start("poltergust-dashboard.service", tmp_path / "dashboard.log",
                                    {"STORAGE_EMULATOR_HOST": gcs.url},
                                    {"--port": str(dashboard_port), "--scheduler-url": luigid_url})
        servers.append(dashboard)
        dashboard_url = f"http://127.0.0.1:{dashboard_port}/"

        # A node VM, pointed at that luigid, with a secret for its pipelines.
        metadata.attributes = {
            "poltergust-role": "node", **release_attributes, "poltergust-path": bucket.url("pipeline"),
            "poltergust-scheduler-url": luigid_url, "poltergust-topic": TOPIC,
            "poltergust-secrets": "BOOT_SECRET=boot-secret",
        }
        metadata.secrets = {f"projects/{PROJECT}/secrets/boot-secret/versions/latest": SECRET}
        node = Boot(tmp_path, "node", metadata, gcs, root=node_root)
        assert node.result.returncode == 0, node.result.stderr
        assert node.systemctl() == ["daemon-reload", "enable poltergust-node.service",
                                    "restart poltergust-node.service"]
        assert directives(node.unit("poltergust-node.service"), "ExecStart")[0].endswith(
            f" --run-as {RUN_AS} --run-as-pool 4")
        assert f"--root: not creating the system user {RUN_AS}" in node.result.stderr
        assert metadata.refused == [], "every request carried Metadata-Flavor: Google (and the token)"
        assert SECRET not in node.result.stderr

        # Exactly the release: the verified wheel and the locked dependencies, nothing else.
        release_dirs = list((node.root / "opt/poltergust/releases").iterdir())
        assert len(release_dirs) == 1 and (release_dirs[0] / ".installed").exists()
        assert installed(node, release_dirs[0]) == {**locked((release["dir"] / "requirements.lock").read_text()),
                                                    "poltergust": release["wheel"].split("-")[1]}
        secrets_file = node.root / "etc/poltergust/node.secrets"
        assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
        assert secrets_file.read_text() == f"BOOT_SECRET={SECRET}\n"

        health_port = free_port()
        service = node.start("poltergust-node.service", tmp_path / "node.log",
                             {"PUBSUB_EMULATOR_HOST": pubsub.host, "STORAGE_EMULATOR_HOST": gcs.url,
                              "POLTERGUST_NODE_NAME": f"boot-{uuid.uuid4().hex[:6]}"},
                             {"--http-host": "127.0.0.1", "--http-port": str(health_port)})
        servers.append(service)
        wait_for(lambda: service.check_alive() or http_status(f"http://127.0.0.1:{health_port}/healthz") == 200,
                 90, "the booted node's /healthz to answer 200")
        assert SECRET.encode() not in Path(f"/proc/{service.process.pid}/environ").read_bytes(), \
            "the node read its secrets from the credential file: none is in its initial environment"

        # What the pipeline may write: a directory open to all (its outputs normally go to the bucket).
        out = node_root / "out"
        out.mkdir(mode=0o777)
        os.chmod(out, 0o777)
        # The build runs as a user of the pool too: it reads the test's wheels from where that user may.
        shutil.copytree(wheelhouse, node_root / "wheels")
        bucket.upload("environment/test.yaml", "virtualenv:\n  python: /usr/bin/python3\n"
                      + environment_yaml.replace(str(wheelhouse), str(node_root / "wheels")))
        bucket.upload("pipeline/booted.config.yaml", yaml.safe_dump({
            "environment": bucket.url("environment/test.yaml"),
            "task": {"name": "Touch", "module": "poltergust_testpipes", "out-dir": str(out),
                     "variable": "BOOT_SECRET"}}))
        done = wait_for(lambda: service.check_alive() or bucket.read("pipeline/booted.done.yaml"), 120,
                        "booted.done.yaml")
        assert yaml.safe_load(done)["poltergust"]["outcome"] == "done"
        assert (out / "touch.txt").read_text().splitlines()[1:] in ([], [""]), \
            "the node's secrets are for {{NAME}} in dependencies: pipelines never see them"
        # Luigi ran as the pipelines' user, from the environment the node (root) built, in a private
        # directory that is gone; the node's logs and HOME stay closed to that user.
        assert (out / "touch.txt").stat().st_uid in pool_uids
        state = node.root / "var/lib/poltergust"
        assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in (state, state / "data", state / "environments",
                                                                          state / "data" / "logs")} \
            == {"poltergust": 0o711, "data": 0o711, "environments": 0o711, "logs": 0o700}
        assert stat.S_IMODE((node.root / "var/cache/poltergust").stat().st_mode) == 0o700
        wait_for(lambda: not any((state / "data" / "work").iterdir()), 30, "the run's private directory to go")

        # The dashboard lists the pipeline, read from the bucket.
        wait_for(lambda: dashboard.check_alive() or http_status(dashboard_url) == 200, 60,
                 "the booted dashboard to answer 200")
        wait_for(lambda: "booted" in urllib.request.urlopen(dashboard_url, timeout=10).read().decode(), 30,
                 "the dashboard to list the pipeline")
        assert luigid.check_alive() is None and json.loads(urllib.request.urlopen(
            f"{luigid_url}/api/task_list?data=%7B%22status%22%3A%22DONE%22%7D", timeout=5).read())["response"]

        # A reboot finds the release installed and changes nothing.
        unit = node.unit("poltergust-node.service")
        node.run()
        assert node.result.returncode == 0, node.result.stderr
        assert "is installed already" in node.result.stderr and "installing release" not in node.result.stderr
        assert node.unit("poltergust-node.service") == unit
        assert node.systemctl()[-1] == "restart poltergust-node.service"
    finally:
        for server in servers:
            server.stop()
        metadata.stop()
        shutil.rmtree(node_root, ignore_errors=True)


def test_a_bake_boot_installs_the_release_and_environments_and_then_powers_off(
    tmp_path: Path, gcs: FakeGcs, dist, release: dict, environment_yaml: str,
) -> None:
    bucket, release_attributes = dist
    bucket.upload("environment/baked.yaml", environment_yaml)
    metadata = FakeMetadata({"poltergust-role": "bake", **release_attributes,
                             "poltergust-bake-environments": bucket.url("environment/baked.yaml")}, PROJECT)
    try:
        boot = Boot(tmp_path, "bake", metadata, gcs)
    finally:
        metadata.stop()
    assert boot.result.returncode == 0, boot.result.stderr
    assert "poltergust-init: bake done" in boot.result.stderr
    assert boot.systemctl() == ["poweroff"], "no unit is enabled or started: the image starts nothing by itself"
    assert not (boot.root / "etc/systemd/system").exists() and not (boot.root / "etc/poltergust").exists()
    release_dirs = list((boot.root / "opt/poltergust/releases").iterdir())
    assert len(release_dirs) == 1 and (release_dirs[0] / ".installed").exists()
    # The environment lies in the node's cache, ready: luigi imports in it.
    cache = boot.root / "var/lib/poltergust/environments"
    cached = [path for path in cache.iterdir() if not path.name.startswith(".")]
    assert len(cached) == 1
    subprocess.run([str(cached[0] / "bin" / "python"), "-c", "import luigi, poltergust_testpipes"], check=True)


def test_a_bake_boot_refuses_an_environment_outside_gcs(tmp_path: Path, gcs: FakeGcs, dist) -> None:
    _, release_attributes = dist
    metadata = FakeMetadata({"poltergust-role": "bake", **release_attributes,
                             "poltergust-bake-environments": "/etc/passwd"}, PROJECT)
    try:
        boot = Boot(tmp_path, "bake-bad", metadata, gcs)
    finally:
        metadata.stop()
    assert boot.result.returncode == 2
    assert "metadata attribute poltergust-bake-environments: '/etc/passwd' is not a gs://" in boot.result.stderr
    assert boot.systemctl() == []


def test_the_metadata_server_fake_refuses_requests_without_the_flavor_header() -> None:
    metadata = FakeMetadata({"poltergust-role": "node"}, PROJECT)
    try:
        url = f"{metadata.url}/computeMetadata/v1/instance/attributes/poltergust-role"
        assert http_status(url) == 403
        request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
        assert urllib.request.urlopen(request, timeout=5).read() == b"node"
    finally:
        metadata.stop()


def test_a_tampered_wheel_in_the_bucket_is_refused(tmp_path: Path, gcs: FakeGcs, dist, release: dict) -> None:
    bucket, attributes = dist
    wheel = (release["dir"] / release["wheel"]).read_bytes()
    bucket.upload(attributes["poltergust-wheel-url"].split("/", 3)[3], wheel + b"\0planted")
    metadata = FakeMetadata({"poltergust-role": "node", **attributes, "poltergust-path": bucket.url("pipeline"),
                             "poltergust-scheduler-url": "http://127.0.0.1:1"}, PROJECT)
    try:
        boot = Boot(tmp_path, "tampered", metadata, gcs)
    finally:
        metadata.stop()
    assert boot.result.returncode == 1
    assert f"but the metadata says {release['wheel_sha256']}" in boot.result.stderr
    assert "nothing was installed" in boot.result.stderr
    assert boot.systemctl() == []
    assert not (boot.root / "etc/systemd/system/poltergust-node.service").exists()
    assert not list((boot.root / "opt/poltergust/releases").glob("*/.installed"))


def test_a_tampered_dependency_is_refused_by_pip(tmp_path: Path, gcs: FakeGcs, dist, release: dict) -> None:
    _, attributes = dist
    wheelhouse = tmp_path / "wheelhouse"
    shutil.copytree(WHEELHOUSE, wheelhouse)
    pins = locked((release["dir"] / "requirements.lock").read_text())
    victim = min((wheel for wheel in wheelhouse.glob("*.whl")
                  if pins.get(wheel.name.split("-")[0].lower().replace("_", "-")) == wheel.name.split("-")[1]),
                 key=lambda wheel: wheel.stat().st_size)
    with victim.open("ab") as handle:
        handle.write(b"planted")
    name = victim.name.split("-")[0]
    metadata = FakeMetadata({"poltergust-role": "scheduler", **attributes}, PROJECT)
    try:
        boot = Boot(tmp_path, "tampered-dep", metadata, gcs, wheelhouse=wheelhouse)
    finally:
        metadata.stop()
    assert boot.result.returncode == 1
    assert "DO NOT MATCH THE HASHES" in boot.result.stderr
    assert {name, name.replace("_", "-")} & set(re.findall(r"[\w.-]+", boot.result.stderr))
    assert "nothing was started" in boot.result.stderr
    assert boot.systemctl() == []
    assert not list((boot.root / "opt/poltergust/releases").glob("*/.installed"))


# ---------------------------------------------------------------------------
# What autohealing sees when a node's disk fills up


def test_disk_shortage_names_the_directory_below_the_limit(tmp_path: Path) -> None:
    from poltergust.node.health import disk_shortage

    missing = tmp_path / "not" / "made" / "yet"
    assert disk_shortage([tmp_path, missing], None) is None
    assert disk_shortage([tmp_path, missing], 1) is None
    free = shutil.disk_usage(tmp_path).free
    reason = disk_shortage([missing], free * 2)
    assert reason is not None and reason.startswith("disk nearly full") and str(missing) in reason


@pytest.mark.parametrize("backend", ["local"])
def test_healthz_fails_while_the_disk_is_nearly_full(start_node) -> None:
    full_port, roomy_port = free_port(), free_port()
    start_node("node-full", "--http-port", str(full_port), "--min-free-disk", "1000000T")
    start_node("node-roomy", "--http-port", str(roomy_port), "--min-free-disk", "1M")
    assert http_status(f"http://127.0.0.1:{roomy_port}/healthz") == 200
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{full_port}/healthz", timeout=5)
        raise AssertionError("a node without disk space must fail its health check")
    except urllib.error.HTTPError as error:
        assert error.code == 503 and error.read().decode().startswith("disk nearly full")
