"""A loopback stand-in for the GCE metadata server, and for Secret Manager's access call.

It answers what deploy/node-init.sh reads: `computeMetadata/v1/instance/attributes/*`,
`project/project-id` and the service account's token, and refuses (403) any
metadata request without `Metadata-Flavor: Google`, as the real server does.
`GET /v1/projects/P/secrets/S/versions/V:access` answers like Secret Manager,
and `/compute/v1/GROUP` (get) and `/compute/v1/GROUP/deleteInstances` (POST)
like Compute Engine for the managed instance groups in `groups`, but only with
the token it handed out. Every request is recorded.
"""
from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "fake-token-for-the-vm-service-account"
METADATA = "/computeMetadata/v1/"


class FakeMetadata:
    def __init__(self, attributes: dict[str, str], project: str, secrets: dict[str, str] | None = None,
                 instance: dict[str, str] | None = None, groups: dict[str, int] | None = None) -> None:
        self.attributes = attributes
        self.project = project
        self.secrets = secrets or {}
        """Secret versions by full name (projects/P/secrets/S/versions/V) -> value."""
        self.instance = instance or {}
        """instance/name, instance/zone ... -> value."""
        self.groups = groups or {}
        """Managed instance groups (projects/P/regions/R/instanceGroupManagers/M) -> target size."""
        self.deleted: list[tuple[str, dict]] = []
        """(group, deleteInstances body) of every deleteInstances call."""
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.refused: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                fake.requests.append((self.path, dict(self.headers)))
                status, body = fake.answer(self.path, self.headers)
                if status in (401, 403):
                    fake.refused.append(self.path)
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 (the http.server API)
                fake.requests.append((self.path, dict(self.headers)))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, answer = fake.post(self.path, self.headers, body)
                data = answer.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def answer(self, path: str, headers) -> tuple[int, str]:
        if path.startswith(METADATA):
            if headers.get("Metadata-Flavor") != "Google":
                return 403, "Missing Metadata-Flavor:Google header.\n"
            key = path[len(METADATA):]
            if key.startswith("instance/attributes/"):
                value = self.attributes.get(key[len("instance/attributes/"):])
                return (200, value) if value is not None else (404, "not found\n")
            if key == "project/project-id":
                return 200, self.project
            if key in self.instance:
                return 200, self.instance[key]
            if key == "instance/service-accounts/default/token":
                return 200, json.dumps({"access_token": TOKEN, "expires_in": 3599, "token_type": "Bearer"})
            return 404, "not found\n"
        if path.startswith("/v1/projects/") and path.endswith(":access"):
            if headers.get("Authorization") != f"Bearer {TOKEN}":
                return 401, "missing or wrong token\n"
            name = path[len("/v1/"):-len(":access")]
            if name not in self.secrets:
                return 404, "no such secret version\n"
            data = base64.b64encode(self.secrets[name].encode()).decode()
            return 200, json.dumps({"name": name, "payload": {"data": data}})
        if path.startswith("/compute/v1/"):
            if headers.get("Authorization") != f"Bearer {TOKEN}":
                return 401, "missing or wrong token\n"
            group = path[len("/compute/v1/"):]
            if group not in self.groups:
                return 404, "no such group\n"
            return 200, json.dumps({"name": group.rsplit("/", 1)[-1], "targetSize": self.groups[group]})
        return 404, "not found\n"

    def post(self, path: str, headers, body: bytes) -> tuple[int, str]:
        if not path.startswith("/compute/v1/") or not path.endswith("/deleteInstances"):
            return 404, "not found\n"
        if headers.get("Authorization") != f"Bearer {TOKEN}":
            return 401, "missing or wrong token\n"
        group = path[len("/compute/v1/"):-len("/deleteInstances")]
        if group not in self.groups:
            return 404, "no such group\n"
        request = json.loads(body)
        self.deleted.append((group, request))
        self.groups[group] -= len(request.get("instances", []))
        return 200, json.dumps({"kind": "compute#operation", "status": "DONE"})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
