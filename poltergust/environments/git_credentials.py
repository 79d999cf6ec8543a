"""Credentials in git dependency URLs, moved out of the URL and into git's environment.

Given `git+https://TOKEN@host/org/repo.git@ref`, an installer runs
`git fetch https://TOKEN@host/org/repo.git`: the token would be on a command
line, readable by every local user (`ps`, /proc/PID/cmdline) for the length of
the fetch. The plan installs the URL without its `user:password@` instead, and
hands git the header it would have sent for them (`Authorization: Basic
base64(user:password)`) as `http.<repository URL>.extraHeader`, in the
`GIT_CONFIG_COUNT` variables of the installer's environment only (git 2.31 or
later): scoped to that repository, on no command line, in no file, and so in
no URL the installer records (its cache keys, `direct_url.json`).
`git+ssh://` URLs and URLs without credentials are left as written.
"""
from __future__ import annotations

import asyncio
import base64
import re
import shutil
from dataclasses import dataclass
from typing import Iterable, Mapping
from urllib.parse import unquote

MINIMUM_GIT = (2, 31)
"""The first git that reads configuration from GIT_CONFIG_COUNT/KEY_n/VALUE_n."""

_URL = re.compile(r"(?P<prefix>git\+(?P<scheme>https?)://)(?P<userinfo>[^/?#\s]*)@(?P<host>[^/?#@\s]+)"
                  r"(?P<path>[^?#@\s]*)", re.IGNORECASE)
"""A git URL with `userinfo@`: the userinfo runs to the last `@` before the path; `@ref` ends the path."""
_REFUSED = re.compile(r"could not read (?:Username|Password) for '(?P<origin>[^']+)'|"
                      r"Authentication failed for '(?P<url>[^']+)'")


@dataclass(frozen=True)
class GitCredential:
    """The `Authorization` header git gets for one repository."""

    repository: str
    """The URL the header is scoped to: scheme, host and repository path, no credentials."""
    encoded: str
    """base64(user:password), as git would send it for the URL's userinfo."""

    @property
    def header(self) -> str:
        return f"Authorization: Basic {self.encoded}"


def strip(token: str) -> tuple[str, list[GitCredential]]:
    """`token` with the credentials of its git URLs removed, and the credentials for git's environment."""
    credentials: list[GitCredential] = []

    def rewrite(match: re.Match[str]) -> str:
        user, _, password = match["userinfo"].partition(":")
        encoded = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
        repository = f"{match['scheme'].lower()}://{match['host']}{match['path']}"
        credentials.append(GitCredential(repository, encoded))
        return f"{match['prefix']}{match['host']}{match['path']}"

    return _URL.sub(rewrite, token), credentials


def environment(credentials: Iterable[GitCredential], environ: Mapping[str, str]) -> dict[str, str]:
    """The variables that give git `credentials`, after any configuration `environ` already passes this way."""
    variables: dict[str, str] = {"GIT_TERMINAL_PROMPT": "0"}  # a refused credential fails, never waits for a prompt
    count = int(environ.get("GIT_CONFIG_COUNT") or 0)
    for credential in credentials:
        variables[f"GIT_CONFIG_KEY_{count}"] = f"http.{credential.repository}.extraHeader"
        variables[f"GIT_CONFIG_VALUE_{count}"] = credential.header
        count += 1
    variables["GIT_CONFIG_COUNT"] = str(count)
    return variables


def refused(output: Iterable[str], credentials: Iterable[GitCredential]) -> list[str]:
    """The repositories, among those given credentials, whose server refused them (as git's output says)."""
    mentioned = [(match["origin"] or match["url"]).rstrip("/") for line in output for match in _REFUSED.finditer(line)]
    return [credential.repository for credential in credentials
            if any(credential.repository == url or credential.repository.startswith(url + "/") for url in mentioned)]


_version: tuple[int, ...] | None = None


async def git_version() -> tuple[int, ...] | None:
    """This node's git version (probed once per process); None when git is not installed."""
    global _version
    if _version is None:
        git = shutil.which("git")
        if git is None:
            return None
        process = await asyncio.create_subprocess_exec(git, "--version", stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.DEVNULL)
        output, _ = await process.communicate()
        found = re.search(rb"(\d+)\.(\d+)", output)
        _version = tuple(int(part) for part in found.groups()) if found else (0, 0)
    return _version
