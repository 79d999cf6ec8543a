"""The two systems under test, and the directory they share.

- `Workspace`: the pipeline directory both systems watch (a local "bucket"),
  the environment file and the no-op luigi module every pipeline runs.
- `Ours`: Poltergust nodes (`python -m poltergust.async_worker`).
- `Original`: luigi-poltergust 0.0.5, installed at run time from the package
  index into a virtualenv of its own, started through a small adapter module.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from _procs import Proc, descendants, kill_all, register
from harness import Node, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
ORIGINAL_REQUIREMENT = "luigi-poltergust==0.0.5"
ORIGINAL_EXTRA_REQUIREMENTS = ["setuptools<81"]
"""0.0.5 imports pieshell, which imports pkg_resources: newer setuptools no longer ship it."""
ORIGINAL_ENVIRONMENTS = Path("/tmp/environments")
"""Where 0.0.5 builds every environment, whatever the configuration says."""

NOOP_MODULE = '''\
"""The benchmark's no-op luigi task: records when its process and its run() started."""
import json
import os
import time

import luigi


def _process_start():
    """Wall-clock time this process started (resolution: one clock tick, 10 ms)."""
    with open("/proc/self/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    started_since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started_since_boot)


class Noop(luigi.Task):
    out = luigi.Parameter()
    seconds = luigi.FloatParameter(default=0.0)

    def output(self):
        return luigi.LocalTarget(self.out)

    def run(self):
        run_start = time.time()
        if self.seconds:
            time.sleep(self.seconds)
        with self.output().open("w") as handle:
            json.dump({"process_start": _process_start(), "run_start": run_start}, handle)
'''

FORK_FLOOR = '''\
"""The floor of warm starts: a process with luigi imported forks, and the child runs luigi (no node, no setup).

Usage: python fork_floor.py OUT_DIR SCHEDULER_URL COUNT; prints each run's output file and CPU seconds.
"""
import os
import sys

import luigi.cmdline

out_dir, scheduler_url, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
for index in range(count):
    out = os.path.join(out_dir, "fork-floor-%d-%d.json" % (os.getpid(), index))
    pid = os.fork()
    if pid == 0:
        os.setsid()
        code = 0
        try:
            luigi.cmdline.luigi_run(["--module", "bench_noop", "Noop", "--out", out, "--scheduler-url", scheduler_url,
                                     "--no-lock"])
        except SystemExit as exc:
            code = exc.code or 0
        sys.stdout.flush()
        os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    if status:
        sys.exit("fork floor: luigi exited with status %d" % status)
    print(out, usage.ru_utime + usage.ru_stime, flush=True)
'''

ADAPTER_MODULE = '''\
"""Lets luigi-poltergust 0.0.5 watch a local directory.

Its RunTasks lists `PATH/*.config.yaml` with the target file system's
list_wildcard, which luigi's LocalFileSystem does not have: this adds a
glob-based one (returning plain paths, which the rest of 0.0.5 handles), and
counts the listings in the file named by BENCH_LISTINGS_FILE.
"""
import glob
import os

import luigi.local_target

_COUNTER = os.environ.get("BENCH_LISTINGS_FILE")


def _list_wildcard(self, pattern):
    if _COUNTER:
        with open(_COUNTER, "a") as handle:
            handle.write(".")
    if pattern.startswith("file://"):
        pattern = pattern[len("file://"):]
    return sorted(glob.glob(pattern))


luigi.local_target.LocalFileSystem.list_wildcard = _list_wildcard

from poltergust import *  # noqa: E402,F401,F403 -- registers RunTasks, RunTask and MakeEnvironment
'''

_names = itertools.count(1)


def clean_environ(**extra: str) -> dict[str, str]:
    """The benchmark's environment without what would leak our virtualenv into children."""
    dropped = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(extra)
    return env


def node_default(setting: str) -> float:
    """A node's default for a numeric flag, such as `rescan_interval` or `heartbeat_interval` (seconds)."""
    from poltergust.settings import build_parser

    return float(getattr(build_parser().parse_args(["--path", "/tmp"]), setting))


@dataclass
class Trial:
    """Seconds from writing (or uploading) a config to each milestone of its run."""

    process_start: float
    run_start: float
    output: float
    result: float


class Workspace:
    def __init__(self, root: Path, wheelhouse: Path, scheduler_url: str) -> None:
        self.root = root
        self.scheduler_url = scheduler_url
        self.bucket = root / "bucket"
        self.pipeline = self.bucket / "pipeline"
        self.staging = self.bucket / ".staging"
        self.env_file = self.bucket / "environment" / "env.yaml"
        self.modules = root / "modules"
        self.out = root / "out"
        self.logs = root / "logs"
        for directory in (self.pipeline, self.staging, self.env_file.parent, self.modules, self.out, self.logs):
            directory.mkdir(parents=True, exist_ok=True)
        (self.modules / "bench_noop.py").write_text(NOOP_MODULE)
        self.fork_floor = root / "fork_floor.py"
        self.fork_floor.write_text(FORK_FLOOR)
        requirements = root / "requirements.txt"
        requirements.write_text(f"--no-index\n--find-links {wheelhouse}\nluigi\n")
        # One environment file for both systems. 0.0.5 passes each dependency string to pip as one
        # argument, so options must be attached to their value: `--requirement=FILE` works for both.
        self.environment_yaml = f"dependencies:\n  - --requirement={requirements}\n"
        self.env_file.write_text(self.environment_yaml)

    def name(self, label: str) -> str:
        return f"{label}-{next(_names):04d}"

    def output(self, name: str) -> Path:
        return self.out / f"{name}.json"

    def config_text(self, name: str, environment: str | None = None, seconds: float = 0.0) -> str:
        task = f"  name: Noop\n  module: bench_noop\n  out: {self.output(name)}\n"
        if seconds:
            task += f"  seconds: {seconds}\n"
        return (f"environment: {environment or self.env_file}\ntask:\n{task}"
                f"variables:\n  PYTHONPATH: {self.modules}\n")

    def submit(self, name: str, seconds: float = 0.0) -> float:
        """Write NAME.config.yaml atomically; returns the time just before it appeared."""
        staged = self.staging / name
        staged.write_text(self.config_text(name, seconds=seconds))
        now = time.time()
        os.replace(staged, self.pipeline / f"{name}.config.yaml")
        return now

    def result(self, name: str) -> str | None:
        for outcome in ("done", "error"):
            if (self.pipeline / f"{name}.{outcome}.yaml").exists():
                return outcome
        return None

    def finished(self, names: set[str]) -> tuple[int, int]:
        """How many of `names` have a result file, and how many of those are errors."""
        done = errors = 0
        for entry in os.listdir(self.pipeline):
            if entry.endswith(".done.yaml") and entry[:-len(".done.yaml")] in names:
                done += 1
            elif entry.endswith(".error.yaml") and entry[:-len(".error.yaml")] in names:
                errors += 1
        return done + errors, errors

    def milestones(self, name: str, submitted: float) -> tuple[float, float]:
        record = json.loads(self.output(name).read_text())
        return record["process_start"] - submitted, record["run_start"] - submitted

    def clear_configs(self) -> int:
        """Remove configs left over (after a timeout or an interrupted measure)."""
        left = list(self.pipeline.glob("*.config.yaml"))
        for path in left:
            path.unlink(missing_ok=True)
        return len(left)


def wait_trial(ws: Workspace, name: str, submitted: float, node_output: callable, timeout: float = 120.0) -> Trial:
    """Poll (every 5 ms) for the task output and the result file of one pipeline."""
    output_at = result_at = None
    output = ws.output(name)
    deadline = time.monotonic() + timeout
    while result_at is None:
        now = time.time()
        if output_at is None and output.exists():
            output_at = now
        outcome = ws.result(name)
        if outcome == "error":
            raise RuntimeError(f"{name} ended in error: {(ws.pipeline / f'{name}.error.yaml').read_text()[-2000:]}\n"
                               f"node output:\n{node_output()[-3000:]}")
        if outcome == "done":
            result_at = now
            if output_at is None:
                output_at = now if output.exists() else float("nan")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: no result after {timeout:.0f}s; node output:\n{node_output()[-3000:]}")
        time.sleep(0.005)
    process_start, run_start = ws.milestones(name, submitted)
    return Trial(process_start, run_start, output_at - submitted, result_at - submitted)


# -- Poltergust ---------------------------------------------------------------

class OurNode(Node):
    """The harness's node with a health port: ready once /healthz answers; stopped by `stop_all()` if not before,
    together with every process it started (a forked luigi runs in a session of its own)."""

    def __init__(self, name: str, workdir: Path, args: Sequence[str], env: Mapping[str, str],
                 entry: Sequence[str] = ("poltergust.async_worker",)) -> None:
        self.http_port = free_port()
        super().__init__(name, workdir, ["--http-port", str(self.http_port), *args], env, entry)
        register(self.stop)

    def ready(self) -> bool:
        self.check_alive()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 15.0) -> int | None:
        if self._log.closed:  # stopped already: stop_all() comes after Ours.stop()
            return self.process.returncode
        family = descendants(self.pid) if self.process.poll() is None else []
        code = super().stop(timeout)
        kill_all(family)
        return code


@dataclass
class Ours:
    ws: Workspace
    env_dir: Path
    label: str = "Poltergust"
    extra: tuple[str, ...] = ()
    """Flags every node of this system gets (`--warm false` for the spawn path)."""
    nodes: list[OurNode] = field(default_factory=list)

    def start(self, count: int, *extra: str, path: str | None = None, env: Mapping[str, str] | None = None,
              tag: str = "ours") -> list[OurNode]:
        started = []
        for _ in range(count):
            name = self.ws.name(tag)
            started.append(OurNode.launch(
                name, self.ws.logs, *self.extra, *extra, path=path or str(self.ws.pipeline),
                scheduler_url=self.ws.scheduler_url, env_dir=self.env_dir, data_dir=self.ws.root / "nodes" / name,
                env=env or clean_environ(), wait=False))
        for node in started:
            wait_for(node.ready, 90, f"{node.name} to be ready")
        self.nodes += started
        return started

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []

    def environment_python(self) -> Path:
        """The interpreter of the (one) environment our nodes built for the benchmark."""
        built = [p for p in self.env_dir.iterdir() if (p / "pyvenv.cfg").exists() and not p.name.startswith(".")]
        if len(built) != 1:
            raise RuntimeError(f"expected one built environment in {self.env_dir}, found {len(built)}")
        return built[0] / "bin" / "python"


# -- luigi-poltergust 0.0.5 -------------------------------------------------------

class OriginalNode(Proc):
    def __init__(self, name: str, command: list[str], log_path: Path, env: Mapping[str, str], cwd: Path,
                 listings: Path) -> None:
        self.node_name = name
        self.listings_file = listings
        # Its worker's stdout must be a pipe, not a file.
        super().__init__(f"original {name}", command, log_path, env=env, cwd=cwd, pipe=True)

    def listings(self) -> int:
        try:
            return self.listings_file.stat().st_size
        except FileNotFoundError:
            return 0

    def ready(self) -> bool:
        self.check_alive()
        return self.listings() > 0


@dataclass
class Original:
    ws: Workspace
    label: str = "luigi-poltergust 0.0.5"
    nodes: list[OriginalNode] = field(default_factory=list)
    home: Path = field(init=False)
    install_seconds: float = 0.0
    luigi_version: str = ""

    def __post_init__(self) -> None:
        self.home = self.ws.root / "original"
        self.venv = self.home / "venv"
        self.adapter_dir = self.home / "adapter"

    def install(self) -> None:
        """A fresh virtualenv with 0.0.5 from the package index, and the adapter module beside it."""
        from uv import find_uv_bin

        uv = find_uv_bin()
        env = clean_environ()
        for pip_name, uv_name in (("PIP_INDEX_URL", "UV_INDEX_URL"), ("PIP_EXTRA_INDEX_URL", "UV_EXTRA_INDEX_URL")):
            if pip_name in env and uv_name not in env:
                env[uv_name] = env[pip_name]
        started = time.monotonic()
        log = self.ws.logs / "original-install.log"
        with log.open("ab") as handle:
            for command in (
                [uv, "venv", "--quiet", "--python", sys.executable, str(self.venv)],
                [uv, "pip", "install", "--python", str(self.venv / "bin" / "python"), ORIGINAL_REQUIREMENT,
                 *ORIGINAL_EXTRA_REQUIREMENTS],
            ):
                code = subprocess.run(command, check=False, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
                if code:
                    raise RuntimeError(f"installing {ORIGINAL_REQUIREMENT} failed; see {log}:\n"
                                       f"{log.read_text()[-2000:]}")
        self.install_seconds = time.monotonic() - started
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        (self.adapter_dir / "bench_original_adapter.py").write_text(ADAPTER_MODULE)
        self.luigi_version = subprocess.run(
            [str(self.venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('luigi'))"],
            capture_output=True, text=True, check=True).stdout.strip()

    def environment_dir(self) -> Path:
        """Where 0.0.5 builds the benchmark's environment: /tmp/environments/<path of the env file>."""
        return ORIGINAL_ENVIRONMENTS / str(self.ws.env_file).lstrip("/")

    def remove_environment(self) -> None:
        """Delete what 0.0.5 built under /tmp/environments for this workspace (and parents left empty)."""
        ours = ORIGINAL_ENVIRONMENTS / str(self.ws.root).lstrip("/")
        shutil.rmtree(ours, ignore_errors=True)
        for directory in ours.parents:
            if directory == ORIGINAL_ENVIRONMENTS.parent:
                break
            try:
                directory.rmdir()
            except OSError:
                break

    def start(self, count: int, tag: str = "orig") -> list[OriginalNode]:
        started = []
        for _ in range(count):
            # A new host name at every start: luigid still holds the RunTasks of a stopped node
            # for worker_disconnect_delay, and a task id includes the host name.
            name = self.ws.name(tag)
            home = self.home / "nodes" / name
            home.mkdir(parents=True)
            # Nodes on one machine stand for nodes on different machines: luigi's per-host process
            # lock (same command line = already running) gets a directory per node.
            config = home / "luigi.cfg"
            config.write_text(f"[core]\nlock_pid_dir = {home / 'locks'}\n")
            env = clean_environ(
                PATH=f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(self.venv),
                PYTHONPATH=str(self.adapter_dir), LUIGI_CONFIG_PATH=str(config),
                BENCH_LISTINGS_FILE=str(home / "listings"),
            )
            command = [str(self.venv / "bin" / "luigi"), "RunTasks", "--module", "bench_original_adapter",
                       "--path", str(self.ws.pipeline), "--hostname", name,
                       "--scheduler-url", self.ws.scheduler_url]
            started.append(OriginalNode(name, command, self.ws.logs / f"{name}.log", env, home, home / "listings"))
        for node in started:
            wait_for(node.ready, 120, f"{node.name} to list the pipeline directory")
        self.nodes += started
        return started

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []
