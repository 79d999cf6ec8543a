"""Google credentials for a run: a metadata endpoint of its own that serves the pipeline service account's tokens.

Runs cannot reach the metadata server (the deploy's firewall rule for the
run users), so the node's service account, which may read every secret and
rewrite every pipeline's files, stays the node's. With
`--pipeline-service-account EMAIL` each run gets a small metadata server on
loopback, named in its environment by `GCE_METADATA_HOST` (and
`GCE_METADATA_IP`, which google-auth pings), that answers what client
libraries ask the real one: a token, the account's email and scopes, the
project. The tokens are short-lived ones the node mints for that account by
impersonation (IAM Credentials `generateAccessToken`, with the node's own
token; the node's service account needs roles/iam.serviceAccountTokenCreator
on the pipeline account), and they are masked in the run's log.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import datetime
from typing import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from poltergust.errors import PoltergustError

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
LIFETIME_SECONDS = 900
RENEW_BEFORE_SECONDS = 300
"""A cached token is renewed this long before it expires, so a client never gets one about to lapse."""
FLAVOR = {"Metadata-Flavor": "Google"}
ACCOUNT = "/computeMetadata/v1/instance/service-accounts/"


class CredentialsError(PoltergustError):
    """The node could not mint a token for the pipeline service account."""


class Impersonation:
    """Mints (and caches) the pipeline service account's tokens with the node's own token."""

    def __init__(self, email: str, iam_url: str, node_metadata_host: str | None = None) -> None:
        self.email = email
        self.iam_url = iam_url.rstrip("/")
        self.metadata_host = node_metadata_host or os.environ.get("GCE_METADATA_HOST", "metadata.google.internal")
        self._token: tuple[str, float] | None = None

    async def token(self, session: aiohttp.ClientSession) -> tuple[str, int]:
        """A pipeline token and the seconds it has left."""
        now = time.time()
        if self._token is None or self._token[1] - now < RENEW_BEFORE_SECONDS:
            node_token = await self._node_token(session)
            url = f"{self.iam_url}/v1/projects/-/serviceAccounts/{self.email}:generateAccessToken"
            body = {"scope": SCOPES, "lifetime": f"{LIFETIME_SECONDS}s"}
            async with session.post(url, json=body, headers={"Authorization": f"Bearer {node_token}"}) as response:
                if response.status != 200:
                    raise CredentialsError(f"generateAccessToken for {self.email}: HTTP {response.status} (the "
                                           "node's service account needs roles/iam.serviceAccountTokenCreator "
                                           "on it)")
                answer = await response.json(content_type=None)
            expires = datetime.fromisoformat(answer["expireTime"].replace("Z", "+00:00")).timestamp()
            self._token = (answer["accessToken"], expires)
        return self._token[0], max(0, int(self._token[1] - now))

    async def _node_token(self, session: aiohttp.ClientSession) -> str:
        url = f"http://{self.metadata_host}{ACCOUNT}default/token"
        async with session.get(url, headers=FLAVOR) as response:
            if response.status != 200:
                raise CredentialsError(f"the metadata server has no token for the node (HTTP {response.status})")
            return str((await response.json(content_type=None))["access_token"])


@contextlib.asynccontextmanager
async def metadata_endpoint(minter: Impersonation, project: str,
                            on_token: Callable[[str], None]) -> AsyncIterator[str]:
    """Serve a run's metadata endpoint on loopback while the block runs; yields its `HOST:PORT`.

    `on_token` hears every token handed out (the run masks it in its log).
    Only what client libraries read is answered, and only with the
    `Metadata-Flavor: Google` header a browser cannot send cross-origin.
    """
    timeout = aiohttp.ClientTimeout(total=30)

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.path != "/" and request.headers.get("Metadata-Flavor") != "Google":
            raise web.HTTPForbidden(text="Metadata-Flavor: Google header required\n")
        path = request.path
        if path == "/":
            return web.Response(text="", headers=FLAVOR)
        if path == "/computeMetadata/v1/project/project-id":
            return web.Response(text=project, headers=FLAVOR)
        for alias in ("default", minter.email):
            if path == f"{ACCOUNT}{alias}/email":
                return web.Response(text=minter.email, headers=FLAVOR)
            if path == f"{ACCOUNT}{alias}/scopes":
                return web.Response(text="\n".join(SCOPES), headers=FLAVOR)
            if path in (f"{ACCOUNT}{alias}", f"{ACCOUNT}{alias}/"):
                info = {"aliases": ["default"], "email": minter.email, "scopes": SCOPES}
                return web.json_response(info, headers=FLAVOR)
            if path == f"{ACCOUNT}{alias}/token":
                try:
                    token, left = await minter.token(session)
                except (CredentialsError, aiohttp.ClientError, KeyError, ValueError) as exc:
                    raise web.HTTPServiceUnavailable(text=f"no token for {minter.email}: {exc}\n") from None
                on_token(token)
                return web.Response(text=json.dumps({"access_token": token, "expires_in": left,
                                                     "token_type": "Bearer"}),
                                    content_type="application/json", headers=FLAVOR)
        raise web.HTTPNotFound(text="not served here: runs get the pipeline service account's tokens only\n")

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            yield f"127.0.0.1:{port}"
        finally:
            await runner.cleanup()
