"""What an operator sees: JSON logs, /metrics, completion notifications."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from harness import PROJECT, TOPIC, Bucket, Node, PubSubEmulator, free_port, result, scrape, submit, wait_for

TOUCH = {"name": "Touch", "module": "poltergust_testpipes"}


class Recorder(BaseHTTPRequestHandler):
    requests: list[tuple[str, str, bytes]] = []
    status = 200

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        type(self).requests.append((self.command, self.path, self.rfile.read(length)))
        self.send_response(type(self).status)
        self.end_headers()

    do_GET = do_POST = _record

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[tuple[str, type[Recorder]]]:
    handler = type("Handler", (Recorder,), {"requests": [], "status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler
    server.shutdown()


def test_metrics_move_during_and_after_a_run(start_node, bucket, environment_yaml, tmp_path) -> None:
    port = free_port()
    start_node("node-a", "--http-port", str(port))
    before = scrape(port)
    assert before["poltergust_runs_started_total"] == 0 and before["poltergust_runs_active"] == 0
    assert before["process_open_fds"] > 0 and before["poltergust_asyncio_tasks"] > 0
    out = tmp_path / "m"
    submit(bucket, "metered", {"name": "Sleep", "module": "poltergust_testpipes", "out-dir": str(out),
                               "seconds": 2}, environment_yaml)
    wait_for(lambda: list(out.glob("started-*")), 60, "the task to start")
    assert scrape(port)["poltergust_runs_active"] == 1
    result(bucket, "metered", "done")
    after = wait_for(lambda: (m := scrape(port))["poltergust_runs_active"] == 0 and m, 10, "the run to end")
    assert after["poltergust_runs_started_total"] == 1
    assert after['poltergust_runs_finished_total{outcome="done"}'] == 1
    assert after['poltergust_runs_claimed_total{outcome="done"}'] == 1
    assert after["poltergust_pickup_seconds_count"] == 1
    assert after.get('poltergust_environment_builds_total{result="built"}', 0) + after[
        "poltergust_environment_cache_hits_total"] == 1
    assert 0 < after["poltergust_pickup_seconds_sum"] < 60


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_the_claiming_node_notifies_and_a_failing_endpoint_changes_nothing(
    start_node, bucket, environment_yaml, tmp_path, endpoint,
) -> None:
    url, handler = endpoint
    port = free_port()
    start_node("node-a", "--notify-url", url, "--http-port", str(port))
    submit(bucket, "told", {**TOUCH, "out-dir": str(tmp_path / "t")}, environment_yaml)
    result(bucket, "told", "done")
    method, path, body = wait_for(lambda: handler.requests, 30, "the notification")[0]
    assert (method, path) == ("POST", "/hook")
    payload = json.loads(body)
    assert payload["pipeline_url"] == bucket.url("pipeline/told.config.yaml")
    assert payload["outcome"] == "done" and payload["node"] == "node-a" and payload["reason"] == ""
    assert payload["started"] <= payload["finished"]

    handler.status = 500
    submit(bucket, "untold", {**TOUCH, "out-dir": str(tmp_path / "u")}, environment_yaml)
    assert result(bucket, "untold", "done")["poltergust"]["outcome"] == "done"
    wait_for(lambda: scrape(port)["poltergust_notify_errors_total"] == 1, 60, "the notification to give up")
    assert len(handler.requests) == 1 + 5, "retried, then given up"


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_db_url_gets_the_original_get_request(start_node, bucket, environment_yaml, tmp_path, endpoint,
                                              monkeypatch) -> None:
    url, handler = endpoint
    monkeypatch.setenv("DB_URL", url)
    start_node("node-a")
    submit(bucket, "legacy", {**TOUCH, "out-dir": str(tmp_path / "l")}, environment_yaml)
    result(bucket, "legacy", "done")
    method, path, _ = wait_for(lambda: handler.requests, 30, "the notification")[0]
    assert method == "GET"
    query = urllib.parse.parse_qs(urllib.parse.urlparse(path).query)
    assert query == {"pipeline_url": [bucket.url("pipeline/legacy.config.yaml")]}


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_node_log_lines_are_json_with_run_fields(start_node, bucket, environment_yaml, tmp_path: Path) -> None:
    node = start_node("node-a")
    submit(bucket, "logged", {**TOUCH, "out-dir": str(tmp_path / "j")}, environment_yaml)
    result(bucket, "logged", "done")
    wait_for(lambda: "(claimed by this node)" in node.output(), 10, "the claim to be logged")
    entries = [json.loads(line) for line in node.output().splitlines() if line.strip()]
    assert all({"severity", "message", "node", "time"} <= set(entry) for entry in entries)
    assert all(entry["node"] == "node-a" for entry in entries)
    claimed = next(e for e in entries if "(claimed by this node)" in e["message"])
    assert claimed["severity"] == "INFO"
    assert claimed["pipeline"] == bucket.url("pipeline/logged.config.yaml")
    assert int(claimed["generation"]) > 0
    assert not any("Informed scheduler" in e["message"] for e in entries), "luigi's output stays in the run log"


def test_healthz_is_not_ready_until_the_subscription_is_attached(tmp_path, gcs, luigid, env_dir) -> None:
    """A node started before Pub/Sub can be reached waits for it, and says so on /healthz."""
    pubsub_port, http_port = free_port(), free_port()
    bucket = Bucket(gcs, "unattached")
    node = Node.launch("node-a", tmp_path, "--http-port", str(http_port), path=bucket.url("pipeline"),
                       scheduler_url=luigid.url, env_dir=env_dir, data_dir=tmp_path / "data",
                       pubsub_host=f"127.0.0.1:{pubsub_port}", storage_url=gcs.url, wait=False)
    pubsub = None
    try:
        def status() -> int | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=2) as response:
                    return response.status
            except urllib.error.HTTPError as error:
                return error.code
            except OSError:
                return None

        assert wait_for(lambda: node.check_alive() or status(), 30, "the health server") == 503
        pubsub = PubSubEmulator(tmp_path / "late-pubsub", PROJECT, port=pubsub_port)
        pubsub.create_topic(TOPIC)
        wait_for(lambda: node.check_alive() or status() == 200, 120, "the node to attach and report ready")
    finally:
        node.stop()
        if pubsub is not None:
            pubsub.stop()
