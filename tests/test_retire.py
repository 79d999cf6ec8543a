"""Scale-in without busy nodes: poltergust.node.retire removes an idle node from its group, never a busy one.

The loop runs as on a VM, against the loopback metadata server
(tests/deploy_fixtures/fake_metadata.py), which also answers the Compute
Engine calls for the group, and a stand-in for the node's /metrics whose
poltergust_runs_active the test sets.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from deploy_fixtures.fake_metadata import FakeMetadata
from harness import ROOT, wait_for

from poltergust.node import metrics

GROUP = "projects/my-proj/regions/europe-west4/instanceGroupManagers/poltergust-nodes"
CREATED_BY = "projects/123456789/regions/europe-west4/instanceGroupManagers/poltergust-nodes"
INSTANCE = {"instance/name": "poltergust-node-x1", "instance/zone": "projects/123456789/zones/europe-west4-b"}


class Metrics:
    """A node's /metrics with a settable poltergust_runs_active (None: the node does not answer)."""

    def __init__(self) -> None:
        self.active: int | None = 1
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                if fake.active is None:
                    self.send_error(503)
                    return
                data = f"# TYPE poltergust_runs_active gauge\npoltergust_runs_active {fake.active}.0\n".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def node_metrics() -> Iterator[Metrics]:
    served = Metrics()
    yield served
    served.stop()


def start_retire(fake: FakeMetadata, metrics_url: str, tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "retire.log"
    env = {**os.environ, "GCE_METADATA_HOST": fake.host, "POLTERGUST_COMPUTE_URL": fake.url}
    process = subprocess.Popen([sys.executable, "-m", "poltergust.node.retire", "--metrics-url", metrics_url,
                                "--interval", "0.1", *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                               env=env, cwd=ROOT)
    return process, log


def checks(log: Path, word: str) -> int:
    return log.read_text().count(word)


@pytest.fixture
def group() -> Iterator[FakeMetadata]:
    fake = FakeMetadata({"created-by": CREATED_BY}, "my-proj", instance=INSTANCE, groups={GROUP: 3})
    yield fake
    fake.stop()


def test_the_metric_it_reads_is_the_nodes() -> None:
    assert metrics.RUNS_ACTIVE._name == "poltergust_runs_active"


def test_a_busy_node_stays_and_an_idle_one_leaves_its_group(
    group: FakeMetadata, node_metrics: Metrics, tmp_path: Path,
) -> None:
    process, log = start_retire(group, node_metrics.url, tmp_path, "--after", "0.5", "--min-nodes", "1")
    try:
        # Twenty checks (two seconds, four times --after) with a run active, then with the node not answering.
        wait_for(lambda: checks(log, "busy: 1 run(s)") >= 20, 60, "twenty busy checks")
        node_metrics.active = None
        wait_for(lambda: checks(log, "busy: unknown") >= 10, 60, "ten checks of a silent node")
        assert group.deleted == [], "a busy or silent node retired"
        node_metrics.active = 0
        assert process.wait(60) == 0
    finally:
        process.kill()
    assert group.deleted == [(GROUP, {"instances": ["zones/europe-west4-b/instances/poltergust-node-x1"],
                                      "skipInstancesOnValidationError": True})]
    assert group.groups[GROUP] == 2


def test_a_group_at_its_minimum_keeps_its_idle_node(group: FakeMetadata, node_metrics: Metrics,
                                                    tmp_path: Path) -> None:
    node_metrics.active = 0
    process, log = start_retire(group, node_metrics.url, tmp_path, "--after", "0.2", "--min-nodes", "3")
    try:
        wait_for(lambda: checks(log, "staying") >= 3, 60, "three decisions to stay")
        assert group.deleted == []
    finally:
        process.kill()
    # Broken on purpose: one node fewer as the minimum, and the same idle node leaves.
    process, log = start_retire(group, node_metrics.url, tmp_path, "--after", "0.2", "--min-nodes", "2")
    try:
        assert process.wait(60) == 0
    finally:
        process.kill()
    assert len(group.deleted) == 1


def test_a_vm_outside_a_managed_group_never_retires(node_metrics: Metrics, tmp_path: Path) -> None:
    fake = FakeMetadata({}, "my-proj", instance=INSTANCE)
    try:
        process, log = start_retire(fake, node_metrics.url, tmp_path, "--after", "0")
        assert process.wait(60) == 0
        assert "never retiring" in log.read_text()
    finally:
        fake.stop()
