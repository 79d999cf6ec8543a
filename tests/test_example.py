"""The Top Artists example (examples/top_artists), run for real.

The example is built into a wheel, installed with uv into a fresh virtualenv
from the local wheelhouse (no package index needed once the wheelhouse holds
luigi and psycopg2-binary), and run with luigi's local scheduler; the database
step runs against a PostgreSQL server started for the test.

Self-contained: uses no fixture of conftest.py (those start the GCS/Pub/Sub
stack). Needs the PostgreSQL server binaries (Debian package `postgresql`);
tests/setup/example-tools.sh installs them and fills the wheelhouse.
"""
from __future__ import annotations

import glob
import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from harness import free_port, wait_for
from uv import find_uv_bin

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "top_artists"
WHEELHOUSE = Path(os.environ.get("POLTERGUST_TEST_WHEELHOUSE") or ROOT / ".wheelhouse").resolve()
INTERVAL = "2012-06"
COMMAND_TIMEOUT = 120
EXPECTED_TOP10 = [  # June 2012, as generated from the dates alone: the same on every machine
    ("The_Midnight_Orchards", 11454),
    ("The_Hollow_Lanterns", 3720),
    ("The_Neon_Machines", 2618),
    ("The_Wild_Comets", 2201),
    ("The_Velvet_Machines", 1815),
    ("The_Broken_Machines", 1690),
    ("The_Silent_Machines", 1473),
    ("The_Paper_Lanterns", 1348),
    ("The_Golden_Machines", 1316),
    ("The_Broken_Lanterns", 1228),
]


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output if it fails."""
    command = [str(part) for part in command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=kwargs.pop("timeout", COMMAND_TIMEOUT),
                          **kwargs)
    if done.returncode != 0:
        pytest.fail(f"$ {shlex.join(command)}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def ensure_wheel(project: str, wheel_prefix: str) -> None:
    """Download `project` into the wheelhouse once (CI does it in tests/setup/example-tools.sh)."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if any(WHEELHOUSE.glob(f"{wheel_prefix}-*-{tag}-*.whl")) or any(WHEELHOUSE.glob(f"{wheel_prefix}-*-py3-*.whl")):
        return
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", WHEELHOUSE, project], timeout=600)


def installer_environ() -> dict:
    """The test's environment without settings that would point uv at another index or interpreter."""
    return {key: value for key, value in os.environ.items()
            if not key.startswith(("UV_", "PIP_")) and key not in ("VIRTUAL_ENV", "PYTHONPATH")}


class Venv:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.python = path / "bin" / "python"

    def luigi_command(self, task: str, *arguments: str) -> list[str]:
        return [str(self.python), "-m", "luigi", "--module", "top_artists", task, "--date-interval", INTERVAL,
                "--no-lock", *arguments]

    def luigi(self, task: str, data: Path, *arguments: str, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run `task` with luigi's local scheduler, its files under `data`."""
        environ = {**installer_environ(), "TOP_ARTISTS_DATA": str(data), **(env or {})}
        return run(self.luigi_command(task, "--local-scheduler", *arguments), env=environ, cwd=data.parent)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A virtualenv with the example installed as Poltergust would: its environment.yaml dependencies, via uv."""
    if not any(WHEELHOUSE.glob("luigi-*.whl")):
        WHEELHOUSE.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", WHEELHOUSE, "luigi"], timeout=600)
    ensure_wheel("psycopg2-binary", "psycopg2_binary")
    root = tmp_path_factory.mktemp("top-artists")
    # Build from a copy, so no build/ or egg-info lands in the source tree.
    source = root / "source"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "data"))
    built = root / "built"
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", built, source], cwd=root)
    dependencies = yaml.safe_load((EXAMPLE / "environment.yaml").read_text())["dependencies"]
    arguments = [argument for dependency in dependencies for argument in shlex.split(dependency)]
    uv = find_uv_bin()
    env = installer_environ()
    run([uv, "venv", "--quiet", "--python", sys.executable, root / "venv"], env=env, cwd=root)
    run([uv, "pip", "install", "--quiet", "--python", root / "venv" / "bin" / "python",
         "--no-index", "--find-links", WHEELHOUSE, "--find-links", built, *arguments,
         "poltergust-example-top-artists[postgres]"],
        env=env, cwd=root, timeout=300)
    return Venv(root / "venv")


def read_rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_top10_with_local_scheduler(venv: Venv, tmp_path: Path) -> None:
    data = tmp_path / "data"
    venv.luigi("Top10Artists", data)

    days = sorted(data.glob("streams_*.tsv"))
    assert [day.name for day in days] == [f"streams_2012-06-{d:02d}.tsv" for d in range(1, 31)]
    top = read_rows(data / f"top_artists_{INTERVAL}.tsv")
    assert len(top) == 10
    assert all(row[:2] == ["2012-06-01", "2012-07-01"] for row in top)
    streams = [int(row[3]) for row in top]
    assert streams == sorted(streams, reverse=True)
    assert len({row[2] for row in top}) == 10

    # The top 10 is the real top 10 of the generated streams.
    counts: Counter = Counter()
    for day in days:
        for line in day.read_text().splitlines():
            timestamp, artist, track = line.split(" ")
            assert timestamp.startswith(day.name[len("streams_"):-len(".tsv")] + "T")
            counts[artist] += 1
    expected = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:10]
    assert [(row[2], int(row[3])) for row in top] == expected == EXPECTED_TOP10
    aggregate = dict((artist, int(n)) for artist, n in read_rows(data / f"artist_streams_{INTERVAL}.tsv"))
    assert aggregate == dict(counts)

    # Deterministic: another run, elsewhere and with parallel workers, writes the same bytes.
    again = tmp_path / "again" / "data"
    again.parent.mkdir()
    venv.luigi("Top10Artists", again, "--workers", "3")
    for path in data.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in data.iterdir())


def test_example_yaml_follows_the_contract() -> None:
    from poltergust.config import parse_environment, parse_pipeline

    source = "file:///srv/bucket/pipeline/top_artists.config.yaml"
    config = parse_pipeline((EXAMPLE / "top_artists.config.yaml").read_bytes(), source)
    assert config.environment == "file:///srv/bucket/environment/top_artists.yaml"
    assert (config.task.name, config.task.module) == ("Top10Artists", "top_artists")
    assert config.task.arguments == {"date-interval": INTERVAL}
    assert "TOP_ARTISTS_DATA" in config.variables
    environment = parse_environment((EXAMPLE / "environment.yaml").read_bytes(), config.environment)
    assert environment.dependencies == ("luigi", "poltergust-example-top-artists")


# --- A central scheduler and two worker processes, as on a Poltergust fleet ---

def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.stack  # luigid
def test_days_spread_over_workers_sharing_one_luigid(venv: Venv, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "luigid.log", "wb") as log:
        luigid = subprocess.Popen(
            [venv.python, "-c", "from luigi.cmdline import luigid; luigid()", "--address", "127.0.0.1",
             "--port", str(port), "--state-path", str(tmp_path / "luigid.state"), "--logdir", str(tmp_path)],
            stdout=log, stderr=subprocess.STDOUT, env=installer_environ(), cwd=tmp_path,
        )
    workers: list[subprocess.Popen] = []
    try:
        wait_for(lambda: luigid.poll() is not None or http_ok(f"{url}/api/task_list?data=%7B%7D"), 30,
                 "luigid to answer")
        assert luigid.poll() is None, (tmp_path / "luigid.log").read_text()
        data = tmp_path / "shared"
        environ = {**installer_environ(), "TOP_ARTISTS_DATA": str(data)}
        command = venv.luigi_command("Top10Artists", "--scheduler-url", url, "--Streams-work-seconds", "0.2")
        for name in ("a", "b"):
            with open(tmp_path / f"worker-{name}.log", "wb") as log:
                workers.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environ,
                                                cwd=tmp_path))
        for worker in workers:
            assert worker.wait(timeout=COMMAND_TIMEOUT) == 0
        logs = [(tmp_path / f"worker-{name}.log").read_text() for name in ("a", "b")]
        days = [set(re.findall(r"done\s+Streams\(date=(\S+?)\)", log)) for log in logs]
        assert all(days), f"each worker ran some of the days: {days}"
        assert not days[0] & days[1], "no day ran twice"
        assert days[0] | days[1] == {f"2012-06-{d:02d}" for d in range(1, 31)}
        top = read_rows(data / f"top_artists_{INTERVAL}.tsv")
        assert [(row[2], int(row[3])) for row in top] == EXPECTED_TOP10
    finally:
        for process in [*workers, luigid]:
            stop_process(process)


# --- PostgreSQL ------------------------------------------------------------

def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    initdb = found[-1] if found else shutil.which("initdb")
    if not initdb or not (Path(initdb).parent / "pg_ctl").exists():
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin "
                    "nor on PATH: install the Debian package `postgresql` (apt-get install postgresql), "
                    "as tests/setup/example-tools.sh does")
    return Path(initdb).parent


class Postgres:
    """A throwaway PostgreSQL server on 127.0.0.1 with trust authentication."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        # The server refuses to run as root: run it as an unprivileged user.
        self.as_user: list[str] = []
        owner = None
        if os.geteuid() == 0:
            name = "postgres" if _user_exists("postgres") else "nobody"
            runuser = shutil.which("runuser")
            if not runuser:
                pytest.fail("running as root needs `runuser` (util-linux) to start PostgreSQL as an unprivileged user")
            self.as_user = [runuser, "-u", name, "--"]
            owner = pwd.getpwnam(name)
        # Not under pytest's tmp_path: its parents are private to the current user.
        self.base = Path(tempfile.mkdtemp(prefix="top-artists-pg-"))
        if owner:
            os.chown(self.base, owner.pw_uid, owner.pw_gid)
        self.data = self.base / "data"
        self.logfile = self.base / "server.log"
        self.port = 0
        self.started = False

    def initdb(self) -> None:
        run([*self.as_user, self.bin / "initdb", "--pgdata", self.data, "--username", "postgres",
             "--auth", "trust", "--encoding", "UTF8", "--locale", "C", "--no-sync"], cwd=self.base)

    def start(self) -> None:
        for _attempt in range(3):  # the free port may be taken in between: try another
            self.port = free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            # -w: pg_ctl itself waits until the server accepts connections (or the timeout).
            done = subprocess.run(
                [*self.as_user, str(self.bin / "pg_ctl"), "--pgdata", str(self.data), "--log", str(self.logfile),
                 "--options", options, "--wait", "--timeout", "60", "start"],
                capture_output=True, text=True, cwd=self.base, timeout=90,
            )
            if done.returncode == 0:
                self.started = True
                return
        log = self.logfile.read_text() if self.logfile.exists() else ""
        pytest.fail(f"PostgreSQL did not start: {done.stdout}{done.stderr}\n{log[-3000:]}")

    def stop(self) -> None:
        try:
            if self.started or (self.data / "postmaster.pid").exists():
                subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "--pgdata", str(self.data),
                                "--mode", "immediate", "--wait", "--timeout", "60", "stop"],
                               capture_output=True, cwd=self.base, timeout=90)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def createdb(self, name: str) -> None:
        run([self.bin / "createdb", "--host", "127.0.0.1", "--port", self.port, "--username", "postgres", name])


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    server = Postgres()
    try:
        server.initdb()
        server.start()
        yield server
    finally:
        server.stop()


QUERY = """
import json, os, psycopg2
connection = psycopg2.connect(host="127.0.0.1", port=int(os.environ["PORT"]), dbname="toplists", user="postgres")
with connection, connection.cursor() as cursor:
    cursor.execute("SELECT date_from, date_to, artist, streams FROM top10 ORDER BY streams DESC, artist")
    rows = [[str(a), str(b), c, d] for a, b, c, d in cursor.fetchall()]
    cursor.execute("SELECT count(*) FROM table_updates WHERE target_table = 'top10'")
    markers = cursor.fetchone()[0]
print(json.dumps({"rows": rows, "markers": markers}))
"""


@pytest.mark.stack  # PostgreSQL
def test_toplist_to_postgres(venv: Venv, postgres: Postgres, tmp_path: Path) -> None:
    postgres.createdb("toplists")
    data = tmp_path / "data"
    env = {
        "TOP_ARTISTS_DB_HOST": "127.0.0.1",
        "TOP_ARTISTS_DB_PORT": str(postgres.port),
        "TOP_ARTISTS_DB_NAME": "toplists",
        "TOP_ARTISTS_DB_USER": "postgres",
        "TOP_ARTISTS_DB_PASSWORD": "",
    }
    venv.luigi("ArtistToplistToDatabase", data, "--workers", "2", env=env)

    def query() -> dict:
        done = run([venv.python, "-c", QUERY], env={**installer_environ(), "PORT": str(postgres.port)})
        return json.loads(done.stdout)

    table = query()
    top = [[a, b, c, int(d)] for a, b, c, d in read_rows(data / f"top_artists_{INTERVAL}.tsv")]
    assert len(table["rows"]) == 10
    assert table["rows"] == top
    assert table["markers"] == 1

    # Done is done: a second run finds the marker and inserts nothing.
    done = venv.luigi("ArtistToplistToDatabase", data, env=env)
    assert "complete" in (done.stdout + done.stderr).lower()
    assert query() == table
