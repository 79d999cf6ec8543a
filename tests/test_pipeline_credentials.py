"""`--pipeline-service-account`: a run's Google credentials are the pipeline account's, minted for it, never the node's.

A fake metadata server (the node's own token) and a fake IAM Credentials
endpoint run on loopback; the pipeline asks the metadata server named in its
environment for a token, as client libraries do.
"""
from __future__ import annotations

import http.server
import json
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest
from harness import result, submit

NODE_TOKEN = "node-token-never-for-runs"
PIPELINE_ACCOUNT = "pipelines@my-project.iam.gserviceaccount.com"


class FakeGoogle:
    """The node's metadata server and IAM Credentials' generateAccessToken, in one loopback server."""

    def __init__(self) -> None:
        self.minted: list[dict] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                if (self.path == "/computeMetadata/v1/instance/service-accounts/default/token"
                        and self.headers.get("Metadata-Flavor") == "Google"):
                    self.reply(200, {"access_token": NODE_TOKEN, "expires_in": 3000, "token_type": "Bearer"})
                else:
                    self.reply(404, {})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                wanted = f"/v1/projects/-/serviceAccounts/{PIPELINE_ACCOUNT}:generateAccessToken"
                if self.path != wanted or self.headers.get("Authorization") != f"Bearer {NODE_TOKEN}":
                    self.reply(403, {"error": "denied"})
                    return
                fake.minted.append(body)
                expires = datetime.now(timezone.utc) + timedelta(seconds=900)
                self.reply(200, {"accessToken": f"pipeline-token-{len(fake.minted)}",
                                 "expireTime": expires.strftime("%Y-%m-%dT%H:%M:%SZ")})

            def reply(self, status: int, document: dict) -> None:
                data = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def google() -> Iterator[FakeGoogle]:
    fake = FakeGoogle()
    yield fake
    fake.server.shutdown()


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_a_run_gets_the_pipeline_accounts_token_from_its_own_endpoint(
    start_node, bucket, environment_yaml: str, tmp_path: Path, google: FakeGoogle,
) -> None:
    start_node("node-a", "--pipeline-service-account", PIPELINE_ACCOUNT, "--project", "my-project",
               "--iam-credentials-url", f"http://{google.host}", env_overrides={"GCE_METADATA_HOST": google.host})
    out = tmp_path / "out"
    submit(bucket, "creds", {"name": "Token", "module": "poltergust_testpipes", "out-dir": str(out)},
           environment_yaml)
    assert result(bucket, "creds", "done")["poltergust"]["outcome"] == "done"
    seen = json.loads((out / "token.json").read_text())
    assert seen["host"] != google.host and seen["host"].startswith("127.0.0.1:") and seen["ip"] == seen["host"]
    assert json.loads(seen["token"])["access_token"] == "pipeline-token-1"
    assert seen["email"] == PIPELINE_ACCOUNT and seen["project"] == "my-project"
    assert google.minted == [{"scope": ["https://www.googleapis.com/auth/cloud-platform"], "lifetime": "900s"}]
    log = bucket.read(bucket.log_name("creds", "node-a")).decode()
    assert "got token ****" in log and "pipeline-token-1" not in log and NODE_TOKEN not in log


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_without_the_setting_a_run_has_no_metadata_endpoint_of_its_own(
    start_node, bucket, environment_yaml: str, tmp_path: Path, google: FakeGoogle,
) -> None:
    start_node("node-a")
    submit(bucket, "plain", {"name": "Report", "module": "poltergust_testpipes", "out-dir": str(tmp_path / "o"),
                             "variable": "GCE_METADATA_IP"}, environment_yaml)
    result(bucket, "plain", "done")
    assert json.loads((tmp_path / "o" / "report.json").read_text())["value"] is None and google.minted == []
