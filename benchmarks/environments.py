"""Benchmark environment builds: the original way against Poltergust's, warm reuse, races, shared archives.

    python benchmarks/environments.py            # luigi, numpy and pandas (their wheels are downloaded once)
    python benchmarks/environments.py --quick    # luigi only, from the tests' wheelhouse (.wheelhouse)

Every install reads a local wheelhouse (`--no-index --find-links`), so the
index's speed does not count; pip and uv settings of the calling shell are
left out. Not a test: it prints a Markdown table for benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from uv import find_uv_bin

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from poltergust.config import parse_environment  # noqa: E402
from poltergust.environments import Environments  # noqa: E402
from poltergust.run.log import RunLog  # noqa: E402

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_", "VIRTUAL_ENV"))}


def wheelhouse(quick: bool, cache: Path, packages: list[str]) -> Path:
    directory = ROOT / ".wheelhouse" if quick else cache / "wheelhouse"
    missing = [p for p in packages if not any(directory.glob(f"{p.replace('-', '_')}-*.whl"))]
    if missing:
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(directory), *packages],
                       check=True)
    return directory


def environment_file(wheels: Path, packages: list[str], prompt: str) -> bytes:
    lines = ["--no-index", f"--find-links {wheels}", *packages]
    return (f"virtualenv:\n  prompt: {prompt}\ndependencies:\n" + "".join(f"  - {line}\n" for line in lines)).encode()


def original_way(wheels: Path, packages: list[str], work: Path) -> float:
    """What the original tool did: a fresh virtualenv, then one `pip install` per dependency."""
    target = work / "original"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "virtualenv", "--quiet", str(target)], check=True, env=CLEAN_ENV)
    for package in packages:
        subprocess.run([str(target / "bin" / "pip"), "install", "--quiet", "--no-cache-dir",
                        "--disable-pip-version-check", "--no-index", "--find-links", str(wheels), package],
                       check=True, env=CLEAN_ENV)
    elapsed = time.perf_counter() - started
    shutil.rmtree(target)
    return elapsed


async def timed_get(envs: Environments, text: bytes, log: Path) -> tuple[float, Path]:
    spec = parse_environment(text, "file:///bucket/environment/bench.yaml")
    started = time.perf_counter()
    path = await asyncio.create_task(envs.get(spec, RunLog(log)))
    return time.perf_counter() - started, path


RACER = """
import asyncio, sys
from pathlib import Path
from poltergust.config import parse_environment
from poltergust.environments import Environments
from poltergust.run.log import RunLog
spec = parse_environment(sys.argv[2].encode(), "file:///bucket/environment/bench.yaml")
asyncio.run(Environments(Path(sys.argv[1])).get(spec, RunLog(Path(sys.argv[3]))))
"""


FIRST_REQUEST = """
import asyncio, sys, time
from pathlib import Path
from poltergust.config import parse_environment
from poltergust.environments import Environments
from poltergust.run.log import RunLog
spec = parse_environment(sys.argv[2].encode(), "file:///bucket/environment/bench.yaml")
envs = Environments(Path(sys.argv[1]))
async def first():
    started = time.perf_counter()
    await envs.get(spec, RunLog(Path(sys.argv[3])))
    return time.perf_counter() - started
print(asyncio.run(first()))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="luigi only, from .wheelhouse (for CI)")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "poltergust-benchmarks",
                        help="where the wheels are downloaded (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of the cold measurements; medians and ranges are shown (default: %(default)s)")
    args = parser.parse_args()
    packages = ["luigi"] if args.quick else ["luigi", "numpy", "pandas"]
    wheels = wheelhouse(args.quick, args.cache_dir, packages)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="poltergust-bench-") as scratch:
        rows = asyncio.run(measure(Path(scratch), wheels, packages, args.repeat))
    uv_version = subprocess.run([find_uv_bin(), "--version"], capture_output=True, text=True).stdout.strip()
    print(f"\n{', '.join(packages)} from a local wheelhouse; Python {platform.python_version()}, {uv_version}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f} at the start and {os.getloadavg()[0]:.1f} at the end\n")
    print("| measurement | result | notes |")
    print("| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def spread(values: list[float], unit: str = "s", scale: float = 1.0, digits: int = 1) -> str:
    """The median, and the range when there are several values."""
    shown = f"{statistics.median(values) * scale:.{digits}f} {unit}"
    if len(values) > 1:
        shown += f" ({min(values) * scale:.{digits}f}-{max(values) * scale:.{digits}f})"
    return shown


def race_processes(work: Path, environ: dict[str, str], text: bytes, logs: Path, tag: str) -> tuple[float, int]:
    """Eight node processes asking for one environment at once: wall time and builds performed."""
    started = time.perf_counter()
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(work / "race-envs"), text.decode(),
                                str(logs / f"{tag}-{i}.log")], env=environ) for i in range(8)]
    if any(process.wait() != 0 for process in racers):
        raise RuntimeError("a racing process failed")
    wall = time.perf_counter() - started
    return wall, sum((logs / f"{tag}-{i}.log").read_text().count("building environment") for i in range(8))


async def measure(work: Path, wheels: Path, packages: list[str], repeat: int) -> list[tuple[str, str, str]]:
    """Measurements that compare with each other are interleaved, so that load from elsewhere hits all alike."""
    rows = []
    environ = dict(CLEAN_ENV)
    logs = work / "logs"

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    # An archive to download: built and shared by a node whose uv cache holds the wheels.
    say("building and sharing an archive...")
    environ["UV_CACHE_DIR"] = str(work / "uv-cache")
    bucket = work / "bucket"
    (bucket / "environment").mkdir(parents=True)
    shared = parse_environment(environment_file(wheels, packages, "shared"), f"file://{bucket}/environment/bench.yaml")
    share_key = os.urandom(32)  # the fleet's signing key
    builder = Environments(work / "node-a", environ, share=True, share_key=share_key)
    await asyncio.create_task(builder.get(shared, RunLog(logs / "node-a.log")))
    started = time.perf_counter()
    await builder.wait_background()
    upload = time.perf_counter() - started
    size = sum(p.stat().st_size for p in (bucket / "environment").rglob("*.tar.gz"))

    originals, colds, downloads, races, baselines, builds = [], [], [], [], [], []
    for attempt in range(repeat):
        say(f"round {attempt + 1}/{repeat}: cold build, original way...")
        originals.append(original_way(wheels, packages, work))
        say(f"round {attempt + 1}/{repeat}: cold build, Poltergust, empty uv cache...")
        cold_env = {**environ, "UV_CACHE_DIR": str(work / f"uv-cache-cold-{attempt}")}
        envs = Environments(work / f"cold-{attempt}", cold_env)
        seconds, _ = await timed_get(envs, environment_file(wheels, packages, "cold"), logs / f"cold-{attempt}.log")
        colds.append(seconds)
        say(f"round {attempt + 1}/{repeat}: download of the shared archive, empty uv cache...")
        newcomer = Environments(work / f"node-b-{attempt}", cold_env, share=True, share_key=share_key)
        started = time.perf_counter()
        await asyncio.create_task(newcomer.get(shared, RunLog(logs / f"node-b-{attempt}.log")))
        downloads.append(time.perf_counter() - started)
        if "downloaded from" not in (logs / f"node-b-{attempt}.log").read_text():
            raise RuntimeError("the second node built instead of downloading")
        for directory in (f"cold-{attempt}", f"node-b-{attempt}", f"uv-cache-cold-{attempt}"):
            shutil.rmtree(work / directory)
        say(f"round {attempt + 1}/{repeat}: eight node processes racing on one environment directory...")
        text = environment_file(wheels, packages, f"race-processes-{attempt}")
        wall, built = race_processes(work, environ, text, logs, f"race-{attempt}")
        races.append(wall)
        builds.append(built)
        baselines.append(race_processes(work, environ, text, logs, f"again-{attempt}")[0])

    original, cold, download = (statistics.median(v) for v in (originals, colds, downloads))
    rows.append(("cold build, original way: virtualenv, then one `pip install` per dependency "
                 f"({len(packages)} dependencies)", spread(originals), ""))
    rows.append(("cold build, Poltergust: `uv venv` + one `uv pip install`, empty uv cache", spread(colds),
                 f"{original / cold:.1f}x faster than the original way"))

    say("build with a warm uv cache...")
    envs = Environments(work / "envs", environ)
    warm_builds = [(await timed_get(envs, environment_file(wheels, packages, f"warm-uv-{i}"),
                                    logs / "warm-uv.log"))[0] for i in range(3)]
    rows.append(("build of a new environment, uv cache already holding the wheels", spread(warm_builds, digits=2),
                 "uv links the files from its cache"))

    say("warm reuse...")
    text = environment_file(wheels, packages, "warm-uv-0")
    firsts = [float(subprocess.run([sys.executable, "-c", FIRST_REQUEST, str(work / "envs"), text.decode(),
                                    str(logs / "reuse.log")], env=environ, check=True, capture_output=True,
                                   text=True).stdout) for _ in range(5)]
    times = [(await timed_get(envs, text, logs / "reuse.log"))[0] for _ in range(200)]
    rows.append(("warm reuse (cache hit), first request of a new node process", spread(firsts, "ms", 1000, 2),
                 "5 processes; no subprocess: the node's own interpreter is described in-process"))
    rows.append(("warm reuse (cache hit), steady state", f"{statistics.median(times) * 1000:.2f} ms median",
                 f"p95 {sorted(times)[int(len(times) * 0.95)] * 1000:.2f} ms, over {len(times)} requests"))

    say("eight runs racing in one node...")
    race = parse_environment(environment_file(wheels, packages, "race"), "file:///bucket/environment/bench.yaml")
    racer = Environments(work / "race-envs", environ)
    started = time.perf_counter()
    await asyncio.gather(*(asyncio.create_task(racer.get(race, RunLog(logs / f"race-{i}.log"))) for i in range(8)))
    wall = time.perf_counter() - started
    built = sum((logs / f"race-{i}.log").read_text().count("building environment") for i in range(8))
    rows.append(("8 runs in one node racing for one new environment", f"{built} build(s), {wall:.2f} s wall",
                 "the other 7 wait for the one build"))
    rows.append(("8 node processes sharing one `--env-dir`, racing for one new environment",
                 f"{'/'.join(map(str, builds))} build(s), {spread(races, digits=2)} wall",
                 f"the same 8 processes finding it built: {spread(baselines, digits=2)} (starting Python, "
                 "importing Poltergust)"))
    rows.append(("shared archive: pack and upload after a build (in the background)", f"{upload:.1f} s",
                 f"{size / 1e6:.1f} MB gzipped, into a local-directory bucket"))
    rows.append(("shared archive: download, check and unpack on a new node (empty uv cache)", spread(downloads),
                 f"{cold / download:.1f}x its cold build, {original / download:.1f}x the original way"))
    return rows


if __name__ == "__main__":
    main()
