"""A token in a git dependency URL reaches git through its environment, never a command line, log or file.

A real git server on loopback (`git http-backend` behind Basic auth) serves a
bare repository holding a small installable package; a `git` shim first on
PATH records every git command line, and a thread reads every process's
command line throughout the fetch, as any local user could.
"""
from __future__ import annotations

import base64
import http.server
import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from harness import WHEELHOUSE, get_in_task, offline, pipe_task, result, run_log, run_logs, submit, wait_for

from poltergust.config import parse_environment
from poltergust.environments import EnvironmentBuildError, Environments, git_credentials
from poltergust.environments.interpreters import Interpreter
from poltergust.environments.plan import Plan
from poltergust.run.log import RunLog

TOKEN = f"tok-{os.urandom(8).hex()}"
WRONG = f"wrong-{os.urandom(8).hex()}"
USER = "x-access-token"


@pytest.fixture
def env_dir(tmp_path: Path) -> Path:
    """Overrides the session-wide cache of conftest: these tests look into the environments they build."""
    return tmp_path / "environments"


def basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class GitServer:
    """Smart HTTP: every request needs one of the accepted `Authorization` headers; `during_fetch` runs per fetch."""

    def __init__(self, root: Path, *accepted: str) -> None:
        self.root = root
        self.accepted = set(accepted)
        self.requests: list[tuple[str, str | None]] = []
        self.during_fetch = lambda: None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 -- the http.server interface
                self.serve()

            def do_POST(self) -> None:  # noqa: N802
                self.serve()

            def serve(self) -> None:
                authorization = self.headers.get("Authorization")
                server.requests.append((self.path, authorization))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if authorization not in server.accepted:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="git"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.command == "POST":
                    server.during_fetch()
                path, _, query = self.path.partition("?")
                cgi = {"PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": str(server.root), "GIT_HTTP_EXPORT_ALL": "1",
                       "REQUEST_METHOD": self.command, "PATH_INFO": path, "QUERY_STRING": query,
                       "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
                       "REMOTE_ADDR": "127.0.0.1", "REMOTE_USER": "git"}
                cgi |= {"HTTP_" + name.upper().replace("-", "_"): value for name, value in self.headers.items()}
                output = subprocess.run(["git", "http-backend"], input=body, env=cgi, capture_output=True).stdout
                head, _, payload = output.partition(b"\r\n\r\n")
                fields = [line.partition(":")[::2] for line in head.decode().split("\r\n") if line]
                status = next((int(v.split()[0]) for k, v in fields if k.lower() == "status"), 200)
                self.send_response(status)
                for name, value in fields:
                    if name.lower() != "status":
                        self.send_header(name, value.strip())
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


class CommandLines:
    """Reads every process's /proc/PID/cmdline, over and over, in a thread: what `ps` shows any local user."""

    def __init__(self, secret: bytes, fetch: bytes) -> None:
        self.secret, self.fetch = secret, fetch
        self.sweeps = 0
        self.fetches_seen = 0
        """Command lines of git processes fetching the repository (proof the sampling covered the fetch)."""
        self.leaks: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    line = path.read_bytes()
                except OSError:
                    continue
                if self.secret in line:
                    self.leaks.append(line)
                if self.fetch in line:
                    self.fetches_seen += 1
            self.sweeps += 1

    def two_more_sweeps(self) -> None:
        """Wait until two whole sweeps of /proc ran from now (the server calls it while git waits for it)."""
        target = self.sweeps + 2
        wait_for(lambda: self.sweeps >= target, 30, "two sweeps of /proc")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A bare repository of `privpkg` (a setuptools project), tagged v1, under the returned project root."""
    work = tmp_path / "privpkg-src"
    (work / "privpkg").mkdir(parents=True)
    (work / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\n'
                                         'build-backend = "setuptools.build_meta"\n'
                                         '[project]\nname = "privpkg"\nversion = "1.0"\n')
    (work / "privpkg" / "__init__.py").write_text("VALUE = 42\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-C", str(work)]
    for command in (["init", "-q"], ["add", "."], ["commit", "-qm", "privpkg 1.0"], ["tag", "v1"]):
        subprocess.run([*git, *command], check=True)
    root = tmp_path / "git-root"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(root / "private.git")], check=True)
    return root


@pytest.fixture
def git_shim(tmp_path: Path) -> tuple[str, Path]:
    """A PATH whose `git` records its argv and the names of its GIT_* variables, then runs the real git."""
    real = shutil.which("git")
    assert real, "the tests need git"
    directory, record = tmp_path / "shim", tmp_path / "git-calls.txt"
    directory.mkdir()
    shim = directory / "git"
    shim.write_text(f"#!/bin/sh\n{{ printf 'argv:'; printf ' %s' \"$@\"; printf '\\nenv:';"
                    f" env | cut -d= -f1 | grep '^GIT_' | tr '\\n' ' '; echo; }} >> '{record}'\n"
                    f"exec '{real}' \"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    return f"{directory}:{os.environ['PATH']}", record


def calls(record: Path) -> list[tuple[str, str]]:
    lines = record.read_text().splitlines()
    return list(zip(lines[0::2], lines[1::2]))


def files_holding(roots: list[Path], *needles: str) -> list[Path]:
    return [path for root in roots for path in root.rglob("*") if path.is_file() and not path.is_symlink()
            and any(needle.encode() in path.read_bytes() for needle in needles)]


# -- the plan ------------------------------------------------------------------

def plan_of(dependencies: str, environ: dict[str, str], source: str = "file:///b/environment/e.yaml") -> Plan:
    interpreter = Interpreter("/usr/bin/python3", "cpython", "3.11.7", "linux", "glibc", "", 64)
    return Plan(parse_environment(f"dependencies:\n{dependencies}".encode(), source), interpreter, environ)


def test_the_plan_moves_credentials_out_of_git_urls_only() -> None:
    environ = {"T": "tok.1", "P": "pa:ss"}
    built = plan_of("  - git+https://{{T}}@git.example.invalid/org/repo.git@v1#egg=repo\n"
                    "  - other@git+https://me:{{P}}@git.example.invalid:8443/org/other.git\n"
                    "  - git+ssh://git@git.example.invalid/org/ssh.git\n"
                    "  - git+https://git.example.invalid/org/public.git@main\n"
                    "  - --find-links https://{{T}}@wheels.example.invalid/\n"
                    "  - git+https://literal@git.example.invalid/org/literal.git\n", environ)
    assert built.private == ["git+https://git.example.invalid/org/repo.git@v1#egg=repo",
                             "other@git+https://git.example.invalid:8443/org/other.git",
                             "--find-links https://tok.1@wheels.example.invalid/"], "only git URLs lose credentials"
    assert built.public == ["git+ssh://git@git.example.invalid/org/ssh.git",
                            "git+https://git.example.invalid/org/public.git@main",
                            "git+https://git.example.invalid/org/literal.git"]
    assert "--find-links https://****@wheels.example.invalid/" in " ".join(built.display)
    assert [(c.repository, base64.b64decode(c.encoded).decode()) for c in built.git_credentials] == [
        ("https://git.example.invalid/org/repo.git", "tok.1:"),
        ("https://git.example.invalid:8443/org/other.git", "me:pa:ss"),
        ("https://git.example.invalid/org/literal.git", "literal:")]
    variables = git_credentials.environment(built.git_credentials, {"GIT_CONFIG_COUNT": "1"})
    assert variables["GIT_CONFIG_COUNT"] == "4", "after the configuration the node already passes"
    assert variables["GIT_CONFIG_KEY_1"] == "http.https://git.example.invalid/org/repo.git.extraHeader"
    assert variables["GIT_CONFIG_VALUE_1"] == "Authorization: Basic " + base64.b64encode(b"tok.1:").decode()
    assert "GIT_CONFIG_KEY_0" not in variables and variables["GIT_TERMINAL_PROMPT"] == "0"


def test_a_secret_git_would_see_on_its_command_line_is_refused() -> None:
    with pytest.raises(EnvironmentBuildError, match=r"e\.yaml: dependencies\[0\]: a secret in a git URL must be"):
        plan_of("  - git+https://git.example.invalid/{{T}}/repo.git\n", {"T": "tok-1"})
    with pytest.raises(EnvironmentBuildError, match=r"dependencies\[1\]: https://h.invalid/r.git is given other"):
        plan_of("  - git+https://{{T}}@h.invalid/r.git@v1\n  - git+https://{{U}}@h.invalid/r.git@v2\n",
                {"T": "tok-1", "U": "tok-2"})


# -- on a real node --------------------------------------------------------------

@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_a_git_token_reaches_git_only_through_its_environment(
    start_node, bucket, wheelhouse: Path, env_dir: Path, tmp_path: Path, repository: Path, git_shim,
) -> None:
    path, record = git_shim
    server = GitServer(repository, basic(USER, TOKEN))
    processes = CommandLines(TOKEN.encode(), f"{server.url}/private.git".encode())
    server.during_fetch = processes.two_more_sweeps
    uv_cache = tmp_path / "uv-cache"
    git_url = f"http://{server.url}/private.git"
    try:
        node = start_node("node-a", env_overrides={
            "PATH": path, "UV_CACHE_DIR": str(uv_cache), "GIT_TEST_TOKEN": TOKEN, "GIT_WRONG_TOKEN": WRONG})
        submit(bucket, "private", pipe_task("Touch", tmp_path / "out" / "private"), offline(
            wheelhouse, "luigi", "poltergust-testpipes",
            f"git+http://{USER}:{{{{GIT_TEST_TOKEN}}}}@{server.url}/private.git@v1"), environment="private")
        result(bucket, "private", "done")
        submit(bucket, "wrong", pipe_task("Touch", tmp_path / "out" / "wrong"),
               offline(wheelhouse, f"git+http://{USER}:{{{{GIT_WRONG_TOKEN}}}}@{server.url}/private.git@v1"),
               environment="wrong")
        reason = result(bucket, "wrong", "error")["poltergust"]["reason"]
    finally:
        processes.stop()
        server.close()

    assert processes.fetches_seen, "git's fetch was alive during whole sweeps of /proc"
    assert not processes.leaks, f"the token is on a command line: {processes.leaks[0]!r}"
    fetches = [(argv, env) for argv, env in calls(record) if "fetch" in argv and git_url in argv]
    assert fetches, "uv fetched the repository with the URL written without credentials"
    assert all("GIT_CONFIG_COUNT" in env for _, env in fetches), "... and gave git the credentials in its environment"
    assert not [argv for argv, _ in calls(record) if TOKEN in argv or WRONG in argv]
    assert ("/private.git/git-upload-pack", basic(USER, TOKEN)) in server.requests
    assert all(authorization for _, authorization in server.requests), "sent from the first request, unasked"

    environment = next(env_dir.glob("*/lib/python*/site-packages/privpkg-1.0.dist-info")).parents[3]
    imported = subprocess.run([environment / "bin" / "python", "-c", "import privpkg; print(privpkg.VALUE)"],
                              capture_output=True, text=True, check=True)
    assert imported.stdout == "42\n"
    direct_url = next(environment.glob("lib/python*/site-packages/privpkg-1.0.dist-info/direct_url.json"))
    assert git_url in direct_url.read_text()
    encoded = basic(USER, TOKEN).split()[1]
    assert not files_holding([env_dir, uv_cache], TOKEN, encoded), "no environment file (direct_url.json, RECORD...)"

    assert "wrong.yaml: installing the dependencies failed" in reason
    assert f"the git server refused the credentials for {git_url}" in reason
    log = run_log(tmp_path, "node-a", "private")
    assert f"credentials for {git_url} go to git in its environment, not in the URL" in log
    assert f"git+{git_url}@v1" in log
    texts = [run_logs(tmp_path, "node-a"), node.output(), reason, bucket.read("pipeline/private.done.yaml").decode(),
             bucket.read(bucket.log_name("private", "node-a")).decode(),
             bucket.read(bucket.log_name("wrong", "node-a")).decode()]
    for text in texts:
        for secret in (TOKEN, WRONG, encoded, basic(USER, WRONG).split()[1]):
            assert secret not in text


async def test_the_virtualenv_fallback_gives_pip_the_token_the_same_way(
    tmp_path: Path, repository: Path, git_shim,
) -> None:
    """pip clones with git too: a token alone (no password), as `TOKEN@host`, is sent as git sends it."""
    pytest.importorskip("virtualenv")
    path, record = git_shim
    server = GitServer(repository, basic(TOKEN))
    node = {**os.environ, "PATH": path, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(WHEELHOUSE), "GIT_TEST_TOKEN": TOKEN}
    runlog = RunLog(tmp_path / "run.log")
    text = ("virtualenv: {copies: true}\n"
            f"dependencies: ['git+http://{{{{GIT_TEST_TOKEN}}}}@{server.url}/private.git@v1']\n")
    try:
        environment = await get_in_task(Environments(tmp_path / "envs", node),
                                        parse_environment(text.encode(), "file:///b/environment/pip.yaml"), runlog)
    finally:
        server.close()
    assert "$ pip install" in (tmp_path / "run.log").read_text()
    subprocess.run([environment / "bin" / "python", "-c", "import privpkg"], check=True)
    clones = [(argv, env) for argv, env in calls(record) if f"http://{server.url}/private.git" in argv]
    assert clones and all("GIT_CONFIG_COUNT" in env for _, env in clones)
    assert not [argv for argv, _ in calls(record) if TOKEN in argv]
    assert not files_holding([tmp_path / "envs"], TOKEN, basic(TOKEN).split()[1])
    assert TOKEN not in (tmp_path / "run.log").read_text()
