"""Fixtures for the real stack: one set of servers per test session, one bucket per test; and the markers.

A test that uses the emulators or luigid, directly or through another fixture (`start_node`, a `bucket` on
the `gcs` backend), is marked `stack` here; one that drives chromium, `browser`. Modules that start servers
of their own say so with `pytestmark`. `pytest -m "not stack"` runs the rest, without Java or emulators.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
from harness import PROJECT, ROOT, TOPIC, WHEELHOUSE, Bucket, FakeGcs, LocalBucket, Luigid, Node, PubSubEmulator

# deploy/node-init.sh --dry-run checks metadata with this Python, which must import poltergust.
os.environ.setdefault("POLTERGUST_DRY_RUN_PYTHON", sys.executable)

STACK_FIXTURES = {"pubsub", "gcs", "luigid", "stack"}
"""The fixtures that start the emulators or luigid."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by the servers its fixtures start, so that `-m "not stack"` needs neither Java nor them."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        if fixtures & STACK_FIXTURES or (callspec is not None and callspec.params.get("backend") == "gcs"):
            item.add_marker(pytest.mark.stack)
        if "browser" in fixtures:
            item.add_marker(pytest.mark.browser)


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


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[PubSubEmulator, FakeGcs, Luigid]]:
    """A Pub/Sub emulator, fake-gcs-server and luigid of the test's own, for tests that stop and restart them."""
    pubsub = PubSubEmulator(tmp_path / "pubsub-work", PROJECT)
    pubsub.create_topic(TOPIC)
    gcs = FakeGcs(tmp_path / "gcs-work", pubsub, TOPIC)  # filesystem backend: data survives restarts
    luigid = Luigid(tmp_path / "luigid-work")
    yield pubsub, gcs, luigid
    for server in (luigid, gcs, pubsub):
        server.stop()


@pytest.fixture
def stack_node(stack: tuple[PubSubEmulator, FakeGcs, Luigid], tmp_path: Path, env_dir: Path) -> Callable[..., Node]:
    """Start a node on a bucket of the test's own `stack`, rescanning rarely so that only events bring uploads."""
    pubsub, gcs, luigid = stack

    def start(name: str, bucket: Bucket, *extra: str) -> Node:
        return Node.launch(name, tmp_path, "--rescan-interval", "300", *extra, path=bucket.url("pipeline"),
                           scheduler_url=luigid.url, env_dir=env_dir, data_dir=tmp_path / name,
                           pubsub_host=pubsub.host, storage_url=gcs.url, subscription=f"outage-{name}")
    return start


@pytest.fixture(scope="session")
def wheelhouse(workdir: Path) -> Path:
    """Wheels for test environments: luigi (prepared once, see tests/run.sh) plus the test pipelines."""
    if not any(WHEELHOUSE.glob("luigi-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(WHEELHOUSE), "luigi"],
                       check=True)
    # uv keeps a wheel it installed from a find-links directory by that directory and the wheel's name: a
    # directory named after the sources makes changed test pipelines a new wheel, also for a reused --basetemp.
    sources = ROOT / "tests" / "testpipes"
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sorted(sources.glob("*.py")))).hexdigest()[:12]
    local = workdir / f"testpipes-wheel-{digest}"
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
        gcs = isinstance(bucket, Bucket)
        node = Node.launch(
            name, tmp_path, *extra, path=bucket.url("pipeline"), scheduler_url=luigid.url, env_dir=env_dir,
            data_dir=tmp_path / name, pubsub_host=request.getfixturevalue("pubsub").host if gcs else None,
            storage_url=bucket.gcs.url if gcs else "", topic=topic, subscription=f"sub-{name}-{suffix}",
            env_overrides=env_overrides, wait=False,
        )
        nodes.append(node)
        if wait:
            node.wait_ready()
        return node

    yield start
    for node in nodes:
        node.stop()
