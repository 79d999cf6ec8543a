"""Fixtures for the real stack: one set of servers per test session, one bucket per test."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from stack import ROOT, Bucket, FakeGcs, LocalBucket, Luigid, Node, PubSubEmulator

PROJECT = "poltergust-test"
TOPIC = "gcs-events"
WHEELHOUSE = Path(os.environ.get("POLTERGUST_TEST_WHEELHOUSE", ROOT / ".wheelhouse"))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def pubsub(workdir: Path) -> Iterator[PubSubEmulator]:
    server = PubSubEmulator(workdir, PROJECT)
    server.create_topic(TOPIC)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs(workdir: Path, pubsub: PubSubEmulator) -> Iterator[FakeGcs]:
    server = FakeGcs(workdir, pubsub, TOPIC)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def luigid(workdir: Path) -> Iterator[Luigid]:
    server = Luigid(workdir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def wheelhouse(workdir: Path) -> Path:
    """Wheels for test environments: luigi (prepared once, see tests/run.sh) plus the test pipelines."""
    if not any(WHEELHOUSE.glob("luigi-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(WHEELHOUSE), "luigi"],
                       check=True)
    local = workdir / "testpipes-wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(local), str(ROOT / "tests" / "testpipes")],
        check=True, cwd=workdir,
    )
    return local


@pytest.fixture(scope="session")
def env_dir(workdir: Path) -> Path:
    """Shared by all test nodes, as on a real machine: environments are built once per session."""
    return workdir / "environments"


@pytest.fixture(params=["gcs", "local"])
def backend(request: pytest.FixtureRequest) -> str:
    """Behavioural tests run on both backends: a bucket on the emulators, and a local directory."""
    return request.param


@pytest.fixture
def bucket(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Bucket | LocalBucket:
    if backend == "local":
        return LocalBucket(tmp_path / "bucket")
    return Bucket(request.getfixturevalue("gcs"), f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def environment_yaml(wheelhouse: Path) -> str:
    return (
        "dependencies:\n"
        "  - --no-index\n"
        f"  - --find-links {WHEELHOUSE}\n"
        f"  - --find-links {wheelhouse}\n"
        "  - luigi\n"
        "  - poltergust-testpipes\n"
    )


@pytest.fixture
def start_node(
    tmp_path: Path, request: pytest.FixtureRequest, luigid: Luigid, bucket: Bucket | LocalBucket, env_dir: Path,
) -> Iterator[Callable[..., Node]]:
    """Start nodes on the test's bucket; every node is stopped at the end of the test."""
    nodes: list[Node] = []
    suffix = uuid.uuid4().hex[:6]

    def start(name: str = "node-a", *extra: str, topic: str = TOPIC, wait: bool = True,
              env_overrides: dict[str, str] | None = None) -> Node:
        env = dict(os.environ)
        args = [
            "--path", bucket.url("pipeline"),
            "--scheduler-url", luigid.url,
            "--data-dir", str(tmp_path / name),
            "--env-dir", str(env_dir),
        ]
        if isinstance(bucket, Bucket):
            pubsub = request.getfixturevalue("pubsub")
            env.update(PUBSUB_EMULATOR_HOST=pubsub.host, STORAGE_EMULATOR_HOST=bucket.gcs.url)
            args += ["--project", PROJECT, "--topic", topic, "--subscription", f"sub-{name}-{suffix}"]
        args += extra
        env.update(env_overrides or {})
        node = Node(name, tmp_path, args, env)
        nodes.append(node)
        if wait:
            node.wait_ready()
        return node

    yield start
    for node in nodes:
        node.stop()
