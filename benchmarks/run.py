#!/usr/bin/env python3
"""Poltergust against the original (luigi-poltergust 0.0.5) and against the floor (a plain luigi run).

    python benchmarks/run.py                                # full run; writes the tables into benchmarks/README.md
    python benchmarks/run.py --quick --markdown /tmp/b.md   # a couple of minutes, tiny sizes

Everything runs on this machine in one run: one luigid, one local pipeline
directory that both systems watch (never at the same time), one no-op luigi
task, one environment built once before measuring. Each comparison alternates
between the two systems, round by round. The original is installed at run
time from the package index into a virtualenv of its own. Poltergust alone is
also measured on the real emulator stack (fake-gcs-server publishing bucket
notifications into Google's Pub/Sub emulator).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _procs import command_line, machine_cpu, register, stop_all, tree_cpu, tree_rss
from _proxy import CountingProxy
from _report import fmt, machine, table, write_section
from _systems import ROOT, Original, Ours, Trial, Workspace, clean_environ, rescan_interval, wait_trial

README = HERE / "README.md"
SECTION = "## Pipelines: Poltergust against the original and against the floor"
PROJECT = "poltergust-bench"
TOPIC = "bench-events"
MB = 1024 * 1024


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- statistics ----------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def p50(values: Sequence[float]) -> float:
    return percentile(values, 0.5)


def p95(values: Sequence[float]) -> float:
    return percentile(values, 0.95)


# -- results -------------------------------------------------------------------

@dataclass
class Row:
    measure: str
    label: str
    ours: list[float] | None
    orig: list[float] | None = None
    note: str = ""
    digits: int | None = None
    compare: bool = True
    """In the comparison table (both systems) rather than the Poltergust-alone table."""

    def cells(self) -> list[str]:
        if not self.compare:
            values = self.ours or []
            return [self.measure, self.label, str(len(values)), fmt(p50(values), self.digits),
                    fmt(p95(values), self.digits) if len(values) > 1 else "—", self.note]
        ours, orig = self.ours or [], self.orig or []
        ratio = p50(ours) / p50(orig) if ours and orig and p50(orig) else float("nan")
        return [self.measure, self.label, f"{len(ours)} / {len(orig)}",
                fmt(p50(ours), self.digits), fmt(p95(ours), self.digits) if len(ours) > 1 else "—",
                fmt(p50(orig), self.digits), fmt(p95(orig), self.digits) if len(orig) > 1 else "—",
                fmt(ratio, 3), self.note]


@dataclass
class Target:
    name: str
    required: str
    measured: str
    met: bool | None
    why: str = ""


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, *args: object, **kwargs: object) -> Row:
        row = Row(*args, **kwargs)  # type: ignore[arg-type]
        self.rows.append(row)
        return row


# -- the benchmark ---------------------------------------------------------------

@dataclass
class Makespan:
    seconds: float
    cpu: float
    own_cpu: float
    errors: int
    finished: int
    timed_out: bool
    other_cpu: float
    """CPU-s the rest of the machine used meanwhile (other processes, the benchmark itself)."""


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.rng = random.Random(args.seed)
        self.cores = len(os.sched_getaffinity(0))
        sys.path.insert(0, str(ROOT / "tests"))
        import stack  # the test suite's starters of luigid and the emulators

        self.stack = stack
        log(f"workspace {root}")
        (root / "luigid").mkdir(parents=True, exist_ok=True)
        self.luigid = stack.Luigid(root / "luigid")
        register(self.luigid.stop)
        self.ws = Workspace(root, args.wheelhouse, self.luigid.url)
        self.ours = Ours(self.ws, root / "environments")
        self.original = Original(self.ws)
        register(self.original.remove_environment)
        self.results = Results()
        # Raw samples, by measure.
        self.latency: dict[str, list[Trial]] = {"ours": [], "orig": []}
        self.plain: list[dict[str, float]] = []
        self.makespans: dict[tuple[str, int, int], list[Makespan]] = {}
        self.skipped: dict[tuple[int, int], str] = {}
        self.plain_emulator: list[dict[str, float]] = []
        """Plain luigi runs interleaved with measure 4: the floor at that time."""
        self.load = [os.getloadavg()[0]]

    # -- setup -----------------------------------------------------------------

    def setup(self) -> None:
        log(f"installing {self.original.label} into {self.original.venv}")
        self.original.install()
        log(f"installed in {self.original.install_seconds:.1f}s (its luigi: {self.original.luigi_version})")
        for system, tag in ((self.ours, "warm-ours"), (self.original, "warm-orig")):
            log(f"{system.label}: building the environment (once, not measured)")
            node = system.start(1)[0]
            name = self.ws.name(tag)
            wait_trial(self.ws, name, self.ws.submit(name), node.output, timeout=600)
            system.stop()
        self.python = self.ours.environment_python()
        self.env_luigi = subprocess.run(
            [str(self.python), "-c", "import importlib.metadata as m; print(m.version('luigi'))"],
            capture_output=True, text=True, check=True).stdout.strip()

    # -- measure 1 (and 5): warm pickup, alternating, with plain luigi runs in between ------------------

    def latency_round(self, system: Ours | Original, key: str, trials: int) -> None:
        node = system.start(1)[0]
        name = self.ws.name(f"lat-{key}")
        wait_trial(self.ws, name, self.ws.submit(name), node.output)  # first run after a start: not counted
        for _ in range(trials):
            time.sleep(self.rng.uniform(0.3, 1.3))  # spreads the submissions over the original's 1 s poll
            name = self.ws.name(f"lat-{key}")
            self.latency[key].append(wait_trial(self.ws, name, self.ws.submit(name), node.output))
        system.stop()

    def plain_run(self) -> dict[str, float]:
        """One plain `luigi --module bench_noop Noop --scheduler-url ...` in the pipelines' environment."""
        name = self.ws.name("plain")
        command = [str(self.python), "-m", "luigi", "--module", "bench_noop", "Noop", "--out", str(self.ws.output(name)),
                   "--scheduler-url", self.ws.scheduler_url, "--no-lock"]
        with (self.ws.logs / "plain-luigi.log").open("ab") as handle:
            started = time.time()
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                       env=clean_environ(PYTHONPATH=str(self.ws.modules)), cwd=self.ws.root)
            try:
                _, status, usage = os.wait4(process.pid, 0)
            except BaseException:  # interrupted: do not leave it behind
                process.kill()
                process.wait()
                raise
            ended = time.time()
            process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise RuntimeError(f"plain luigi run failed ({process.returncode}); see {self.ws.logs / 'plain-luigi.log'}")
        process_start, run_start = self.ws.milestones(name, started)
        output = self.ws.output(name).stat().st_mtime_ns / 1e9 - started
        return {"wall": ended - started, "process_start": process_start, "run_start": run_start, "output": output,
                "cpu": usage.ru_utime + usage.ru_stime, "maxrss": usage.ru_maxrss * 1024}

    def measure_latency(self) -> None:
        rounds, trials, floor_runs = self.args.rounds, self.args.latency_trials, self.args.floor_runs
        for index in range(rounds):
            per_round = trials // rounds + (1 if index < trials % rounds else 0)
            order = [("ours", self.ours), ("orig", self.original)]
            if index % 2:
                order.reverse()
            for key, system in order:
                log(f"measure 1, round {index + 1}/{rounds}: {system.label}, {per_round} pickups")
                self.latency_round(system, key, per_round)
            runs = floor_runs // rounds + (1 if index < floor_runs % rounds else 0)
            log(f"measure 5, round {index + 1}/{rounds}: {runs} plain luigi runs")
            self.plain += [self.plain_run() for _ in range(runs)]

    # -- measure 2: makespans ----------------------------------------------------------

    def makespan(self, system: Ours | Original, k: int, n: int) -> Makespan:
        nodes = system.start(n)
        cpu_before = sum(tree_cpu(node.pid) for node in nodes)
        own_before = sum(_own_cpu(node.pid) for node in nodes)
        machine_before = machine_cpu()
        names = [self.ws.name(f"mk{k}x{n}") for _ in range(k)]
        wanted = set(names)
        started = time.time()
        for name in names:
            self.ws.submit(name)
        deadline = time.monotonic() + self.args.makespan_timeout
        timed_out = False
        while True:
            finished, errors = self.ws.finished(wanted)
            if finished == k:
                ended = time.time()
                break
            if time.monotonic() > deadline:
                ended, timed_out = time.time(), True
                break
            for node in nodes:
                node.check_alive()
            time.sleep(0.02)
        cpu = sum(tree_cpu(node.pid) for node in nodes) - cpu_before
        own = sum(_own_cpu(node.pid) for node in nodes) - own_before
        other = machine_cpu() - machine_before - cpu
        system.stop()
        self.ws.clear_configs()
        return Makespan(ended - started, cpu, own, errors, finished, timed_out, max(other, 0.0))

    def measure_makespans(self) -> None:
        for k in self.args.sizes:
            for n in self.args.nodes:
                reps = (self.args.reps if n == 1 else max(1, self.args.reps - 1)) if k <= 20 else 1
                for rep in range(reps):
                    order = [("ours", self.ours), ("orig", self.original)]
                    if rep % 2:
                        order.reverse()
                    for key, system in order:
                        if key == "orig" and (k, n) in self.args.original_skip:
                            self.skipped[(k, n)] = self._skip_reason(k, n)
                            continue
                        log(f"measure 2: {system.label}, K={k} pipelines on N={n} node(s), repetition {rep + 1}/{reps}")
                        result = self.makespan(system, k, n)
                        log(f"  {result.seconds:.1f}s, {result.finished}/{k} finished, {result.errors} error(s), "
                            f"{result.cpu:.1f} CPU-s" + (" (TIMED OUT)" if result.timed_out else ""))
                        self.makespans.setdefault((key, k, n), []).append(result)

    def _skip_reason(self, k: int, n: int) -> str:
        smaller = [(kk, m) for (key, kk, nn), m in self.makespans.items() if key == "orig" and nn == n and kk < k]
        if smaller:
            kk, runs = max(smaller, key=lambda item: item[0])
            estimate = p50([r.seconds for r in runs]) * k / kk
            return f"not run: ≈ {estimate:.0f} s expected ({k}/{kk} × its K={kk} makespan)"
        return "not run (too slow for this run)"

    # -- measure 3 and 6: idle nodes, then 20 runs in flight ------------------------------------------

    def start_emulators(self) -> None:
        log("starting the Pub/Sub emulator and fake-gcs-server (publishing bucket notifications)")
        workdir = self.root / "emulators"
        self.pubsub = self.stack.PubSubEmulator(workdir, PROJECT)
        register(self.pubsub.stop)
        self.pubsub.create_topic(TOPIC)
        os.environ.pop("PUBSUB_EMULATOR_HOST", None)  # set by create_topic; children get it explicitly
        self.gcs = self.stack.FakeGcs(workdir, self.pubsub, TOPIC)
        register(self.gcs.stop)
        self.bucket = self.stack.Bucket(self.gcs, "bench")
        self.bucket.upload("environment/env.yaml", self.ws.environment_yaml)

    def start_gcs_node(self, storage_url: str, *extra: str) -> list:
        env = clean_environ(PUBSUB_EMULATOR_HOST=self.pubsub.host, STORAGE_EMULATOR_HOST=storage_url)
        name = self.ws.name("sub")
        return self.ours.start(1, "--project", PROJECT, "--topic", TOPIC, "--subscription", name, *extra,
                               path=self.bucket.url("pipeline"), env=env, tag="ours-gcs")

    def measure_idle(self) -> None:
        window = self.args.idle_seconds
        proxy = CountingProxy(self.gcs.url)
        register(proxy.close)
        ours_local = self.ours.start(1)[0]
        started = proxy.total()
        ours_gcs = self.start_gcs_node(proxy.url)[0]
        startup_requests = proxy.total() - started
        original = self.original.start(1)[0]
        time.sleep(2)  # let start-up settle
        nodes = {"ours": ours_local, "ours_gcs": ours_gcs, "orig": original}
        log(f"measure 3: {window:.0f} s idle, Poltergust (local and GCS) and the original side by side")
        cpu0 = {key: tree_cpu(node.pid) for key, node in nodes.items()}
        requests0, counts0, listings0 = proxy.total(), proxy.counts(), original.listings()
        time.sleep(window)
        cpu = {key: tree_cpu(node.pid) - cpu0[key] for key, node in nodes.items()}
        requests, listings = proxy.total() - requests0, original.listings() - listings0
        kinds = {k: v - counts0.get(k, 0) for k, v in proxy.counts().items() if v - counts0.get(k, 0)}
        memory = {key: tree_rss(node.pid)[1] for key, node in nodes.items()}
        self.ours.stop()
        self.original.stop()

        rescan = rescan_interval()
        hour = 3600 / window
        ours_hour = requests * hour + (startup_requests * 3600 / rescan if window < rescan else 0)
        orig_hour = listings * hour
        label = f"idle CPU per node over {window:.0f} s, local directory (CPU-s)"
        self.results.add("3", label, [cpu["ours"]], [cpu["orig"]], digits=3)
        self.results.add(
            "3", f"idle storage operations per node in {window:.0f} s", [requests], [listings], digits=0,
            note="ours: requests to the GCS emulator, counted by a proxy"
                 + (f" ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))})" if kinds else "")
                 + "; original: listings of the directory (counted in the adapter)")
        self.results.add(
            "3", "idle storage operations per node-hour", [ours_hour], [orig_hour], digits=1,
            note=f"from the {window:.0f} s window; ours adds its rescan ({startup_requests} request(s), "
                 f"measured at start-up, every {rescan:.0f} s)")
        self.results.add("3", f"idle CPU per node over {window:.0f} s, on the GCS + Pub/Sub emulators (CPU-s)",
                         [cpu["ours_gcs"]], compare=False, digits=3,
                         note="the Pub/Sub streaming pull keeps a gRPC stream open")
        self.results.add("6", "RSS of an idle node (MB)", [memory["ours"] / MB], [memory["orig"] / MB], digits=0,
                         note="the node process and its children, local directory")
        self.results.add("6", "RSS of an idle node on the GCS + Pub/Sub emulators (MB)", [memory["ours_gcs"] / MB],
                         compare=False, digits=0)
        self.idle = {"requests": requests, "listings": listings, "ours_hour": ours_hour, "orig_hour": orig_hour,
                     "window": window, "startup_requests": startup_requests, "rescan": rescan}

    def in_flight(self, system: Ours | Original, key: str) -> dict[str, float]:
        count, seconds = self.args.in_flight, self.args.in_flight_seconds
        extra = ("--max-concurrent", str(count)) if key == "ours" else ()
        node = system.start(1, *extra)[0]
        names = [self.ws.name(f"mem-{key}") for _ in range(count)]
        for name in names:
            self.ws.submit(name, seconds=seconds)
        own = tree = luigis = 0
        deadline = time.monotonic() + seconds + 8
        while time.monotonic() < deadline:
            node_rss, total, members = tree_rss(node.pid)
            running = sum(1 for pid in members if "bench_noop" in command_line(pid) and "luigi" in command_line(pid))
            own, tree, luigis = max(own, node_rss), max(tree, total), max(luigis, running)
            if self.ws.finished(set(names))[0] == count:
                break
            time.sleep(0.2)
        system.stop()
        self.ws.clear_configs()
        return {"own": own / MB, "tree": tree / MB, "luigis": luigis}

    def measure_memory(self) -> None:
        count = self.args.in_flight
        samples = {}
        for key, system in (("ours", self.ours), ("orig", self.original)):
            log(f"measure 6: {system.label}, {count} runs submitted at once (each task sleeps "
                f"{self.args.in_flight_seconds:.0f} s)")
            samples[key] = self.in_flight(system, key)
        self.results.add("6", f"RSS of the node process, {count} runs in flight (MB, peak)",
                         [samples["ours"]["own"]], [samples["orig"]["own"]], digits=0,
                         note=f"ours with --max-concurrent {count}")
        self.results.add("6", f"RSS of the node and its luigi processes, {count} runs in flight (MB, peak)",
                         [samples["ours"]["tree"]], [samples["orig"]["tree"]], digits=0)
        self.results.add("6", "luigi task processes running at once (peak)",
                         [samples["ours"]["luigis"]], [samples["orig"]["luigis"]], digits=0,
                         note="the original runs its configs one after another")

    # -- measure 4: the emulator stack ----------------------------------------------------------

    def measure_emulator(self) -> None:
        trials = self.args.emulator_trials
        node = self.start_gcs_node(self.gcs.url)[0]
        environment = self.bucket.url("environment/env.yaml")
        samples: list[Trial] = []
        log(f"measure 4: Poltergust on the GCS + Pub/Sub emulators, {trials} pickups")
        for index in range(trials + 1):
            time.sleep(self.rng.uniform(0.3, 1.3))
            name = self.ws.name("gcs")
            text = self.ws.config_text(name, environment=environment)
            submitted = time.time()
            self.bucket.upload(f"pipeline/{name}.config.yaml", text)
            trial = self._wait_gcs(name, submitted, node)
            if index:  # the first after the start is not counted
                samples.append(trial)
                self.plain_emulator.append(self.plain_run())
        self.ours.stop()
        self.results.add("4", "upload → luigi process started (s)", [t.process_start for t in samples], compare=False,
                         note="process start time from /proc (10 ms resolution)")
        self.results.add("4", "upload → task run() started (s)", [t.run_start for t in samples], compare=False)
        self.results.add("4", "upload → task output exists (s)", [t.output for t in samples], compare=False)
        self.results.add("4", "upload → NAME.done.yaml exists (s)", [t.result for t in samples], compare=False,
                         note="polled over HTTP every 10 ms")
        self.results.add("4", "plain luigi runs in between: spawn → task run() started (s)",
                         [p["run_start"] for p in self.plain_emulator], compare=False,
                         note="the floor while measure 4 ran")
        self.emulator = samples

    def _wait_gcs(self, name: str, submitted: float, node) -> Trial:
        output = self.ws.output(name)
        deadline = time.monotonic() + 120
        output_at = None
        while output_at is None:
            if output.exists():
                output_at = time.time()
            elif time.monotonic() > deadline:
                raise TimeoutError(f"{name}: no output; node log:\n{node.output()[-3000:]}")
            else:
                node.check_alive()
                time.sleep(0.005)
        while not self.bucket.exists(f"pipeline/{name}.done.yaml"):
            if self.bucket.exists(f"pipeline/{name}.error.yaml") or time.monotonic() > deadline:
                raise RuntimeError(f"{name}: no done.yaml; node log:\n{node.output()[-3000:]}")
            time.sleep(0.01)
        result_at = time.time()
        process_start, run_start = self.ws.milestones(name, submitted)
        return Trial(process_start, run_start, output_at - submitted, result_at - submitted)

    # -- assembling the tables ---------------------------------------------------------------

    def summarize(self) -> None:
        r = self.results
        ours, orig = self.latency["ours"], self.latency["orig"]
        for attribute, label, note in (
            ("process_start", "luigi process started", "process start time from /proc (10 ms resolution)"),
            ("run_start", "task run() started", ""),
            ("output", "task output exists", ""),
            ("result", "result file exists", "NAME.done.yaml; polled every 5 ms"),
        ):
            r.add("1", f"warm pickup: config written → {label} (s)",
                  [getattr(t, attribute) for t in ours], [getattr(t, attribute) for t in orig], note=note)

        plain_wall = [p["wall"] for p in self.plain]
        plain_cpu = [p["cpu"] for p in self.plain]
        floor_wall = p50(plain_wall)
        r.add("5", "overhead per pipeline above a plain luigi run: config → result minus plain spawn → exit (s)",
              [t.result - floor_wall for t in ours], [t.result - floor_wall for t in orig],
              note=f"plain run p50 {floor_wall:.3f} s")

        for k in self.args.sizes:
            for n in self.args.nodes:
                runs = {key: self.makespans.get((key, k, n), []) for key in ("ours", "orig")}
                notes = []
                if (k, n) in self.skipped:
                    notes.append(f"original {self.skipped[(k, n)]}")
                others = [f"{label} {p50([m.other_cpu for m in runs[key]]):.1f}"
                          for key, label in (("ours", "ours"), ("orig", "original")) if runs[key]]
                notes.append("CPU-s used meanwhile by the rest of the machine: " + " / ".join(others))
                for key, label in (("ours", "ours"), ("orig", "original")):
                    bad = [m for m in runs[key] if m.timed_out or m.errors]
                    if bad:
                        notes.append(f"{label}: " + "; ".join(
                            f"{m.finished}/{k} finished in {m.seconds:.0f} s" + (" (timed out)" if m.timed_out else "")
                            + (f", {m.errors} error(s)" if m.errors else "") for m in bad))
                r.add("2", f"makespan, K={k} no-op pipelines on N={n} node{'s' if n > 1 else ''} (s)",
                      [m.seconds for m in runs["ours"]], [m.seconds for m in runs["orig"]] or None,
                      note="; ".join(notes))
                r.add("2", f"CPU per pipeline, K={k} on N={n}: all processes of all nodes (CPU-s)",
                      [m.cpu / k for m in runs["ours"]], [m.cpu / k for m in runs["orig"]] or None,
                      note=f"plain luigi run: {p50(plain_cpu):.3f} CPU-s")

        floor = {k: k * p50(plain_cpu) / self.cores for k in self.args.sizes}
        r.rows += [
            Row("5", "floor: plain `luigi --module bench_noop Noop`, spawn → exit (s)", plain_wall, compare=False,
                note="same environment, same luigid, --no-lock"),
            Row("5", "floor: plain luigi, spawn → task run() started (s)", [p["run_start"] for p in self.plain],
                compare=False),
            Row("5", "floor: plain luigi, spawn → task output written (s)", [p["output"] for p in self.plain],
                compare=False, note="the output file's modification time"),
            Row("5", "floor: CPU time of one plain luigi run (CPU-s)", plain_cpu, compare=False),
            Row("5", "floor: RSS of one plain luigi run (MB, max)", [p["maxrss"] / MB for p in self.plain],
                compare=False, digits=0),
        ]
        for k in self.args.sizes:
            r.rows.append(Row("5", f"CPU floor for K={k}: K × CPU of one plain run / {self.cores} cores (s)",
                              [floor[k]], compare=False))
            ours_runs = self.makespans.get(("ours", k, 1), [])
            if ours_runs:
                r.rows.append(Row("5", f"ours: makespan of K={k} on one node / CPU floor (×)",
                                  [m.seconds / floor[k] for m in ours_runs], compare=False))
        self.floor = floor
        self._targets(plain_wall, plain_cpu)
        r.rows.sort(key=lambda row: row.measure)  # stable: keeps the order within a measure

    def _targets(self, plain_wall: list[float], plain_cpu: list[float]) -> None:
        r = self.results
        ours, orig = self.latency["ours"], self.latency["orig"]
        floor_run = p50([p["run_start"] for p in self.plain])
        floors = {"output": (p50([p["output"] for p in self.plain]), "spawn → output written"),
                  "result": (p50(plain_wall), "spawn → exit")}
        for attribute, what in (("output", "task output"), ("result", "result file")):
            o, g = p50([getattr(t, attribute) for t in ours]), p50([getattr(t, attribute) for t in orig])
            floor, floor_what = floors[attribute]
            met = g / o >= 10
            why = ""
            if not met:
                why = (f"A plain luigi run of the same no-op task takes {floor:.2f} s ({floor_what}, p50) on this "
                       f"machine, {floor_run:.2f} s of it before the task's run() starts (interpreter start, "
                       f"importing luigi, scheduler round trips). Both systems start a fresh luigi process for "
                       f"every pipeline; ten times below the original's {g:.2f} s is {g / 10:.2f} s"
                       + (", below that floor: no runner that starts luigi per pipeline can reach it here. "
                          if g / 10 < floor else ". ")
                       + f"Poltergust takes {o - floor:.2f} s more than the plain run "
                         f"(the original: {g - floor:.2f} s more).")
            r.targets.append(Target(f"warm pickup, config → {what} (p50)", "≥ 10× lower than the original",
                                    f"{g / o:.1f}× lower ({o:.3f} s vs {g:.3f} s)", met, why))

        k, one = 20, 1
        ours_runs, orig_runs = self.makespans.get(("ours", k, one)), self.makespans.get(("orig", k, one))
        if ours_runs and orig_runs:
            o, g = p50([m.seconds for m in ours_runs]), p50([m.seconds for m in orig_runs])
            floor = k * p50(plain_cpu) / self.cores
            met = g / o >= 3.5
            cpu = p50([m.cpu / k for m in ours_runs])
            own = p50([m.own_cpu / k for m in ours_runs])
            cpu_orig = p50([m.cpu / k for m in orig_runs])
            other, other_orig = p50([m.other_cpu for m in ours_runs]), p50([m.other_cpu for m in orig_runs])
            why = ""
            if not met:
                why = (f"3.5× lower than the original's {g:.1f} s is {g / 3.5:.1f} s; the CPU floor of {k} luigi "
                       f"runs on {self.cores} cores is {floor:.1f} s"
                       + (": below the floor, out of reach for any runner that starts luigi per pipeline. "
                          if g / 3.5 < floor else ". ")
                       + f"The original runs one pipeline at a time ({g / k:.2f} s and {cpu_orig:.2f} CPU-s each); "
                         f"ours took {o:.1f} s ({o / floor:.2f}× the floor). Meanwhile the rest of the machine "
                         f"used {other:.1f} CPU-s during ours' runs and {other_orig:.1f} during the original's (p50).")
            r.targets.append(Target(f"makespan, K={k} on one node (p50)", "≥ 3.5× lower than the original",
                                    f"{g / o:.2f}× lower ({o:.2f} s vs {g:.2f} s)", met, why))
            met = o / floor <= 1.3
            why = "" if met else (
                f"Per pipeline the node and its luigi processes used {cpu:.2f} CPU-s against {p50(plain_cpu):.2f} "
                f"for a plain luigi run: {own:.2f} CPU-s in the node process itself, {cpu - own:.2f} in each of its "
                f"luigi processes (up to --max-concurrent of them at once). The nodes' CPU time "
                f"alone fills {cpu * k / self.cores:.1f} s of {self.cores} cores "
                f"({cpu * k / self.cores / floor:.2f}× the floor). The rest of the machine (other processes, the "
                f"benchmark's polling) used {other:.1f} CPU-s meanwhile, of the {o * self.cores:.1f} CPU-s the "
                f"{self.cores} cores had during the {o:.1f} s (p50).")
            r.targets.append(Target(f"makespan, K={k} on one node (p50)", "≤ 1.3× the CPU floor",
                                    f"{o / floor:.2f}× ({o:.2f} s vs {floor:.2f} s)", met, why))
        else:
            r.targets.append(Target("makespan, K=20 on one node", "≥ 3.5× lower than the original; ≤ 1.3× the "
                                    "CPU floor", "not measured in this run (see --sizes, --nodes)", None))

        idle = self.idle
        share = idle["ours_hour"] / idle["orig_hour"] if idle["orig_hour"] else float("nan")
        met = share <= 0.01
        r.targets.append(Target(
            "idle storage operations per node-hour", "≤ 1 % of the original's",
            f"{share * 100:.2f} % ({idle['ours_hour']:.0f} vs {idle['orig_hour']:.0f})", met,
            "" if met else "Ours listed the bucket more often than its rescan interval implies; see the "
                           "requests counted in measure 3."))

        process = p50([t.process_start for t in self.emulator])
        run = p50([t.run_start for t in self.emulator])
        floor_run = p50([p["run_start"] for p in self.plain_emulator])
        met = process < 0.25
        why = ("" if met else
               "This span holds everything before luigi starts: the notification's way from fake-gcs-server "
               "through the Pub/Sub emulator to the node's subscription, reading the config and the environment "
               "file, and starting the process; compare the plain luigi runs measured in between.")
        r.targets.append(Target("emulator stack: pickup, upload → luigi process started (p50)", "< 0.25 s",
                                f"{process:.3f} s (→ task run() started: {run:.3f} s, of which luigi's own start-up "
                                f"is ≈ {floor_run:.3f} s)", met, why))


def _own_cpu(pid: int) -> float:
    """CPU seconds of the process itself, without its children."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the machine and the report ---------------------------------------------------

def machine_facts(bench: Bench) -> dict[str, str]:
    return {
        "nproc": str(bench.cores),
        **machine(),
        "luigi": f"{bench.env_luigi} in the pipelines' environment; {bench.original.luigi_version} running the original",
        "load average (1 min) at start / end": " / ".join(f"{load:.1f}" for load in bench.load),
    }


def render(bench: Bench, command: str, duration: float) -> str:
    r = bench.results
    args = bench.args
    facts = machine_facts(bench)
    compare = [row.cells() for row in r.rows if row.compare]
    alone = [row.cells() for row in r.rows if not row.compare]
    targets = [[t.name, t.required, t.measured, {True: "met", False: "**missed**", None: "—"}[t.met]]
               for t in r.targets]
    missed = [t for t in r.targets if t.met is False and t.why]
    parts = [
        SECTION,
        "",
        ("Written by `python benchmarks/run.py`; numbers from one run on one machine. "
        "Poltergust (this repository) against `luigi-poltergust==0.0.5` (the original, installed by the "
        "benchmark from the package index into a virtualenv of its own) and against the floor (a plain `luigi` "
        "run of the same task)."),
        "",
        (f"Command: `{command}` — {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, took "  # noqa: UP017
        f"{duration / 60:.1f} min{' (quick mode: tiny sizes)' if args.quick else ''}."),
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in facts.items()) + ".",
        "",
        "### Poltergust against the original",
        "",
        ("Both on the same local pipeline directory and the same luigid, one after the other, alternating round by "
        "round. p50 and p95 over n samples (p95 interpolated between ranks, so with few samples it is close to "
        "the maximum); the ratio is of the p50s, ours / original (below 1: ours is lower)."),
        "",
        table(["#", "measure", "n (ours / orig.)", "Poltergust p50", "p95", "original p50", "p95",
               "ours / original", "note"], compare),
        "",
        "### Poltergust alone, and the floor",
        "",
        table(["#", "measure", "n", "p50", "p95", "note"], alone),
        "",
        "### Targets",
        "",
        table(["target", "required", "measured", ""], targets),
        "",
    ]
    if missed:
        parts += ["Why targets are missed:", ""]
        parts += [f"- {t.name} ({t.required}): {t.why}" for t in missed]
        parts.append("")
    parts += [
        "### How it is measured",
        "",
        ("- Every pipeline is one no-op luigi task (`Noop`, from a module the benchmark writes) that records when "
        "its process and its `run()` started and writes a small output file. Its environment (luigi from the "
        "local wheelhouse) is built once by each system before anything is measured."),
        ("- Poltergust nodes: `python -m poltergust.async_worker --path DIR/pipeline --scheduler-url URL ...` with "
        "their default settings, sharing one environment cache; ready when `/healthz` answers 200."),
        ("- The original: `luigi RunTasks --module bench_original_adapter --path DIR/pipeline --hostname NAME` in "
        "its own virtualenv. The adapter module (written by the benchmark) gives luigi's LocalFileSystem the "
        "`list_wildcard` that 0.0.5 calls, with `glob`, and counts the calls. Its output goes through a pipe; "
        "its environment's dependency is written `--requirement=FILE` (0.0.5 hands each dependency string to pip "
        "as one argument); it builds environments under /tmp/environments (removed afterwards). Each node gets "
        "its own host name and its own luigi lock directory, as on separate machines, so that with several "
        "nodes every node runs every pipeline, as the original does."),
        ("- 1: a config is written atomically into the directory; the benchmark polls every 5 ms for the task's "
        "output and the result file. Submissions are 0.3–1.3 s apart (random, seeded), so they fall anywhere in "
        "the original's 1 s poll; the first pipeline after each node start is not counted."),
        ("- 2: K configs are written at once; the makespan ends when the last result file exists. CPU is that of "
        "the nodes and every process they started (/proc, children included); what the rest of the machine used "
        "meanwhile (from /proc/stat) is in the note, since the machine may be shared. K ≤ 20 is repeated "
        f"{args.reps} times on one node and {max(1, args.reps - 1)} on several; larger K runs once."),
        ("- 3: Poltergust on the local directory, Poltergust on the emulators (its storage requests go through a "
        "counting proxy) and the original run idle side by side in the same window after start-up."),
        ("- 4: configs are uploaded to fake-gcs-server, which publishes OBJECT_FINALIZE into the Pub/Sub emulator; "
        "the node hears it on its own subscription."),
        ("- 5: plain `luigi` runs are interleaved with the rounds of measure 1. Overhead = a pipeline's "
        "config → result time minus the plain run's p50 spawn → exit."),
        (f"- 6: {args.in_flight} configs whose task sleeps {args.in_flight_seconds:.0f} s are submitted at once; "
        "RSS is sampled every 0.2 s."),
        "",
    ]
    return "\n".join(parts)


def write_markdown(path: Path, text: str) -> None:
    """Replace the Pipelines section of `path` (a new file gets the text alone)."""
    write_section(path, "## Pipelines:", text)


# -- command line --------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _pairs(text: str) -> set[tuple[int, int]]:
    pairs = set()
    for part in text.split(","):
        if part.strip():
            k, n = part.lower().split("x")
            pairs.add((int(k), int(n)))
    return pairs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and a short idle window (a few minutes); writes no file unless --markdown "
                             "is given")
    parser.add_argument("--markdown", type=Path, help="write the tables here (default: the Pipelines section of "
                                                      "benchmarks/README.md; with --quick: nowhere)")
    parser.add_argument("--rounds", type=int, help="alternating rounds of measure 1 (default 4; quick 2)")
    parser.add_argument("--latency-trials", type=int, help="warm pickups per system (default 20; quick 4)")
    parser.add_argument("--floor-runs", type=int, help="plain luigi runs (default 12; quick 4)")
    parser.add_argument("--sizes", type=_int_list, help="K, pipelines per makespan (default 20,200; quick 3)")
    parser.add_argument("--nodes", type=_int_list, help="N, nodes per makespan (default 1,3; quick 1,2)")
    parser.add_argument("--reps", type=int, help="repetitions of each makespan with K ≤ 20 on one node (default 3; "
                                                 "quick 1); one less on several nodes; larger K run once")
    parser.add_argument("--original-skip", type=_pairs, default=None,
                        help="KxN makespans the original is left out of, comma-separated (default 200x3, "
                             "which takes it minutes; quick: none); '' runs it everywhere")
    parser.add_argument("--makespan-timeout", type=float, default=900.0, help="seconds before a makespan gives up (default 900)")
    parser.add_argument("--idle-seconds", type=float, help="idle window of measure 3 (default 60; quick 5)")
    parser.add_argument("--emulator-trials", type=int, help="pickups on the emulator stack (default 20; quick 3)")
    parser.add_argument("--in-flight", type=int, help="runs in flight for measure 6 (default 20; quick 3)")
    parser.add_argument("--in-flight-seconds", type=float, help="how long each of those tasks sleeps "
                                                                "(default 10; quick 3)")
    parser.add_argument("--wheelhouse", type=Path,
                        default=Path(os.environ.get("POLTERGUST_TEST_WHEELHOUSE", ROOT / ".wheelhouse")),
                        help="wheels the pipelines' environment installs from: luigi and its dependencies "
                             "(default: .wheelhouse, or POLTERGUST_TEST_WHEELHOUSE)")
    parser.add_argument("--workdir", type=Path, help="keep everything here instead of a temporary directory")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random gaps between submissions (default 1)")
    args = parser.parse_args(argv)
    defaults = {
        "rounds": (4, 2), "latency_trials": (20, 4), "floor_runs": (12, 4), "sizes": ([20, 200], [3]),
        "nodes": ([1, 3], [1, 2]), "reps": (3, 1), "idle_seconds": (60.0, 5.0), "emulator_trials": (20, 3),
        "in_flight": (20, 3), "in_flight_seconds": (10.0, 3.0), "original_skip": ({(200, 3)}, set()),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.rounds = max(1, min(args.rounds, args.latency_trials))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
    markdown = args.markdown or (None if args.quick else README)
    if not any(args.wheelhouse.glob("luigi-*.whl")):
        log(f"no luigi wheel in {args.wheelhouse}: downloading luigi and its dependencies into it")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(args.wheelhouse), "luigi"],
                       check=True)
    args.wheelhouse = args.wheelhouse.resolve()

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: it is ignored in background jobs of a shell
        signal.signal(sig, interrupted)
    temporary = None
    if args.workdir:
        root = args.workdir.resolve()
        root.mkdir(parents=True, exist_ok=True)
    else:
        temporary = tempfile.TemporaryDirectory(prefix="poltergust-bench-")
        root = Path(temporary.name)
    started = time.monotonic()
    try:
        bench = Bench(args, root)
        bench.setup()
        bench.measure_latency()
        bench.measure_makespans()
        bench.start_emulators()
        bench.measure_idle()
        bench.measure_memory()
        bench.measure_emulator()
        bench.load.append(os.getloadavg()[0])
        bench.summarize()
        text = render(bench, command, time.monotonic() - started)
    except BaseException:
        log(f"failed; logs are in {root / 'logs'}" + (" (removed)" if temporary else ""))
        raise
    finally:
        stop_all()
        if temporary is not None:
            temporary.cleanup()
    print(text)
    if markdown is not None:
        write_markdown(markdown, text)
        log(f"written to {markdown}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        sys.exit(130)
