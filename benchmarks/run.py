#!/usr/bin/env python3
"""Poltergust against the original (luigi-poltergust 0.0.5) and against the floor (a plain luigi run).

Poltergust runs twice side by side: with warm starts (the default: luigi forked
from a warm interpreter per environment) and with `--warm false` (spawn: a
fresh `python -m luigi` per run, as before warm starts).

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
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the harness: the tests' starters of luigid and the emulators

from _main import entry, log, run_benchmark
from _procs import command_line, machine_cpu, register, tree_cpu, tree_pss, tree_rss
from _report import fmt, machine, table
from _systems import ROOT, Original, Ours, Trial, Workspace, clean_environ, node_default, wait_trial
from _targets import Target, targets
from harness import Bucket, FakeGcs, Luigid, Proxy, PubSubEmulator

README = HERE / "README.md"
SECTION = "## Pipelines: Poltergust against the original and against the floor"
PROJECT = "poltergust-bench"
TOPIC = "bench-events"
MB = 1024 * 1024


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
    """In the comparison table (all systems) rather than the Poltergust-alone table."""
    spawn: list[float] | None = None
    """Poltergust with --warm false, measured in the same run (`ours` is Poltergust with warm starts)."""

    def cells(self) -> list[str]:
        if not self.compare:
            values = self.ours or []
            return [self.measure, self.label, str(len(values)), fmt(p50(values), self.digits),
                    fmt(p95(values), self.digits) if len(values) > 1 else "—", self.note]
        ours, spawn, orig = self.ours or [], self.spawn or [], self.orig or []

        def ratio(values: list[float]) -> str:
            return fmt(p50(values) / p50(orig), 3) if values and orig and p50(orig) else "—"

        def spread(values: list[float]) -> list[str]:
            return [fmt(p50(values), self.digits) if values else "—",
                    fmt(p95(values), self.digits) if len(values) > 1 else "—"]

        return [self.measure, self.label, f"{len(ours)} / {len(spawn)} / {len(orig)}", *spread(ours), *spread(spawn),
                *spread(orig), ratio(ours), ratio(spawn), self.note]


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
        log(f"workspace {root}")
        (root / "luigid").mkdir(parents=True, exist_ok=True)
        self.luigid = Luigid(root / "luigid")
        register(self.luigid.stop)
        self.ws = Workspace(root, args.wheelhouse, self.luigid.url)
        self.ours = Ours(self.ws, root / "environments", label="Poltergust, warm")
        self.spawn = Ours(self.ws, root / "environments", label="Poltergust, spawn", extra=("--warm", "false"))
        self.original = Original(self.ws)
        register(self.original.remove_environment)
        self.results = Results()
        # Raw samples, by measure.
        self.latency: dict[str, list[Trial]] = {"ours": [], "spawn": [], "orig": []}
        self.plain: list[dict[str, float]] = []
        self.forked: list[dict[str, float]] = []
        """Bare forks of a process with luigi imported: the floor of warm starts."""
        self.makespans: dict[tuple[str, int, int], list[Makespan]] = {}
        self.skipped: dict[tuple[int, int], str] = {}
        self.plain_emulator: list[dict[str, float]] = []
        """Plain luigi runs interleaved with measure 4: the floor at that time."""
        self.load = [os.getloadavg()[0]]
        self.load_samples = _sample_load()
        """The machine's 1-minute load average every 5 s while the benchmark runs (others may share it)."""

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

    # -- measure 1 (and 5): pickup, alternating, with plain luigi runs in between ------------------

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
        command = [str(self.python), "-m", "luigi", "--module", "bench_noop", "Noop",
                   "--out", str(self.ws.output(name)),
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
            order = self._systems(index)
            for key, system in order:
                log(f"measure 1, round {index + 1}/{rounds}: {system.label}, {per_round} pickups")
                self.latency_round(system, key, per_round)
            runs = floor_runs // rounds + (1 if index < floor_runs % rounds else 0)
            log(f"measure 5, round {index + 1}/{rounds}: {runs} plain luigi runs, {runs} bare forks")
            self.plain += [self.plain_run() for _ in range(runs)]
            self.forked += self.fork_runs(runs)

    def fork_runs(self, count: int) -> list[dict[str, float]]:
        """`count` runs of luigi forked by a process that imported it (fork_floor.py), one after another."""
        if not count:
            return []
        with (self.ws.logs / "fork-floor.log").open("ab") as handle:
            printed = subprocess.run(
                [str(self.python), str(self.ws.fork_floor), str(self.ws.out), self.ws.scheduler_url, str(count)],
                stdout=subprocess.PIPE, stderr=handle, env=clean_environ(PYTHONPATH=str(self.ws.modules)),
                cwd=self.ws.root, check=True, text=True).stdout
        runs = []
        for line in printed.splitlines():
            out, cpu = line.rsplit(" ", 1)
            record = json.loads(Path(out).read_text())
            runs.append({"run_start": record["run_start"] - record["process_start"], "cpu": float(cpu)})
        return runs

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
                    for key, system in self._systems(rep):
                        if key == "orig" and (k, n) in self.args.original_skip:
                            self.skipped[(k, n)] = self._skip_reason(k, n)
                            continue
                        if key == "spawn" and n not in self.args.spawn_nodes:
                            continue
                        log(f"measure 2: {system.label}, K={k} pipelines on N={n} node(s), repetition {rep + 1}/{reps}")
                        result = self.makespan(system, k, n)
                        log(f"  {result.seconds:.1f}s, {result.finished}/{k} finished, {result.errors} error(s), "
                            f"{result.cpu:.1f} CPU-s" + (" (TIMED OUT)" if result.timed_out else ""))
                        self.makespans.setdefault((key, k, n), []).append(result)

    def _systems(self, index: int) -> list[tuple[str, Ours | Original]]:
        """The three systems, in an order that rotates with `index` so that none always goes first."""
        order: list[tuple[str, Ours | Original]] = [("ours", self.ours), ("spawn", self.spawn),
                                                    ("orig", self.original)]
        return order[index % 3:] + order[:index % 3]

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
        self.pubsub = PubSubEmulator(workdir, PROJECT)
        register(self.pubsub.stop)
        self.pubsub.create_topic(TOPIC)
        os.environ.pop("PUBSUB_EMULATOR_HOST", None)  # set by create_topic; children get it explicitly
        self.gcs = FakeGcs(workdir, self.pubsub, TOPIC)
        register(self.gcs.stop)
        self.bucket = Bucket(self.gcs, "bench")
        self.bucket.upload("environment/env.yaml", self.ws.environment_yaml)

    def start_gcs_node(self, storage_url: str, *extra: str, system: Ours | None = None) -> list:
        env = clean_environ(PUBSUB_EMULATOR_HOST=self.pubsub.host, STORAGE_EMULATOR_HOST=storage_url)
        name = self.ws.name("sub")
        return (system or self.ours).start(1, "--project", PROJECT, "--topic", TOPIC, "--subscription", name, *extra,
                               path=self.bucket.url("pipeline"), env=env, tag="ours-gcs")

    def measure_idle(self) -> None:
        window = self.args.idle_seconds
        proxy = Proxy(self.gcs.url)
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

        rescan, heartbeat = node_default("rescan_interval"), node_default("heartbeat_interval")
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
                     "window": window, "startup_requests": startup_requests, "rescan": rescan,
                     "heartbeat": heartbeat}

    def in_flight(self, system: Ours | Original, key: str) -> dict[str, float]:
        count, seconds = self.args.in_flight, self.args.in_flight_seconds
        extra = ("--max-concurrent", str(count)) if key != "orig" else ()
        node = system.start(1, *extra)[0]
        names = [self.ws.name(f"mem-{key}") for _ in range(count)]
        for name in names:
            self.ws.submit(name, seconds=seconds)
        own = tree = luigis = pss = 0
        deadline = time.monotonic() + seconds + 8
        while time.monotonic() < deadline:
            node_rss, total, members = tree_rss(node.pid)
            running = sum(1 for pid in members if _is_run(pid))
            own, tree, luigis = max(own, node_rss), max(tree, total), max(luigis, running)
            pss = max(pss, tree_pss(node.pid))
            if self.ws.finished(set(names))[0] == count:
                break
            time.sleep(0.2)
        system.stop()
        self.ws.clear_configs()
        return {"own": own / MB, "tree": tree / MB, "luigis": luigis, "pss": pss / MB}

    def measure_memory(self) -> None:
        count = self.args.in_flight
        samples = {}
        for key, system in self._systems(0):
            log(f"measure 6: {system.label}, {count} runs submitted at once (each task sleeps "
                f"{self.args.in_flight_seconds:.0f} s)")
            samples[key] = self.in_flight(system, key)
        def add(label: str, field: str, note: str = "") -> None:
            self.results.add("6", label, [samples["ours"][field]], [samples["orig"][field]], digits=0, note=note,
                             spawn=[samples["spawn"][field]])

        add(f"RSS of the node process, {count} runs in flight (MB, peak)", "own",
            f"ours with --max-concurrent {count}")
        add(f"RSS of the node and its luigi processes, {count} runs in flight (MB, peak, summed)", "tree",
            "a page shared by forked children counts once per process")
        add(f"PSS of the node and its luigi processes, {count} runs in flight (MB, peak)", "pss",
            "proportional set size: each shared page split among its sharers; warm: with the warm interpreter")
        add("luigi task processes running at once (peak)", "luigis", "the original runs its configs one after another")
        self.in_flight_samples = samples

    # -- measure 4: the emulator stack ----------------------------------------------------------

    def measure_emulator(self) -> None:
        trials = self.args.emulator_trials
        environment = self.bucket.url("environment/env.yaml")
        self.emulator: dict[str, list[Trial]] = {"ours": [], "spawn": []}
        for index in range(2 * self.args.rounds):  # warm and spawn take turns, round by round
            key, system = (("ours", self.ours), ("spawn", self.spawn))[index % 2]
            count = trials // self.args.rounds + (1 if index // 2 < trials % self.args.rounds else 0)
            log(f"measure 4: {system.label} on the GCS + Pub/Sub emulators, {count} pickups")
            node = self.start_gcs_node(self.gcs.url, system=system)[0]
            for trial_index in range(count + 1):
                time.sleep(self.rng.uniform(0.3, 1.3))
                name = self.ws.name("gcs")
                text = self.ws.config_text(name, environment=environment)
                submitted = time.time()
                self.bucket.upload(f"pipeline/{name}.config.yaml", text)
                trial = self._wait_gcs(name, submitted, node)
                if trial_index:  # the first after the start is not counted
                    self.emulator[key].append(trial)
                    if key == "ours":
                        self.plain_emulator.append(self.plain_run())
            system.stop()
        for key, suffix in (("ours", ""), ("spawn", ", spawn")):
            samples = self.emulator[key]
            self.results.add("4", f"upload → luigi process started{suffix} (s)", [t.process_start for t in samples],
                             compare=False, note="process start time from /proc (10 ms resolution); warm: the fork")
            self.results.add("4", f"upload → task run() started{suffix} (s)", [t.run_start for t in samples],
                             compare=False)
            self.results.add("4", f"upload → task output exists{suffix} (s)", [t.output for t in samples],
                             compare=False)
            self.results.add("4", f"upload → NAME.done.yaml exists{suffix} (s)", [t.result for t in samples],
                             compare=False, note="polled over HTTP every 10 ms")
        self.results.add("4", "plain luigi runs in between: spawn → task run() started (s)",
                         [p["run_start"] for p in self.plain_emulator], compare=False,
                         note="the floor while measure 4 ran")

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
        ours, spawn, orig = self.latency["ours"], self.latency["spawn"], self.latency["orig"]
        for attribute, label, note in (
            ("process_start", "luigi process started", "process start time from /proc (10 ms resolution); warm: "
                                                       "the fork"),
            ("run_start", "task run() started", ""),
            ("output", "task output exists", ""),
            ("result", "result file exists", "NAME.done.yaml; polled every 5 ms"),
        ):
            r.add("1", f"pickup: config written → {label} (s)", [getattr(t, attribute) for t in ours],
                  [getattr(t, attribute) for t in orig], note=note, spawn=[getattr(t, attribute) for t in spawn])
        r.add("1", "luigi's own start: luigi process started → task run() (s)",
              [t.run_start - t.process_start for t in ours], [t.run_start - t.process_start for t in orig],
              spawn=[t.run_start - t.process_start for t in spawn],
              note="warm: fork → run(); spawn and original: a fresh interpreter importing luigi")

        plain_wall = [p["wall"] for p in self.plain]
        plain_cpu = [p["cpu"] for p in self.plain]
        floor_wall = p50(plain_wall)
        r.add("5", "overhead per pipeline above a plain luigi run: config → result minus plain spawn → exit (s)",
              [t.result - floor_wall for t in ours], [t.result - floor_wall for t in orig],
              spawn=[t.result - floor_wall for t in spawn], note=f"plain run p50 {floor_wall:.3f} s")

        for k in self.args.sizes:
            for n in self.args.nodes:
                runs = {key: self.makespans.get((key, k, n), []) for key in ("ours", "spawn", "orig")}
                notes = []
                if (k, n) in self.skipped:
                    notes.append(f"original {self.skipped[(k, n)]}")
                labels = (("ours", "warm"), ("spawn", "spawn"), ("orig", "original"))
                others = [f"{label} {p50([m.other_cpu for m in runs[key]]):.1f}" for key, label in labels if runs[key]]
                notes.append("CPU-s used meanwhile by the rest of the machine: " + " / ".join(others))
                for key, label in labels:
                    bad = [m for m in runs[key] if m.timed_out or m.errors]
                    if bad:
                        notes.append(f"{label}: " + "; ".join(
                            f"{m.finished}/{k} finished in {m.seconds:.0f} s" + (" (timed out)" if m.timed_out else "")
                            + (f", {m.errors} error(s)" if m.errors else "") for m in bad))
                r.add("2", f"makespan, K={k} no-op pipelines on N={n} node{'s' if n > 1 else ''} (s)",
                      [m.seconds for m in runs["ours"]], [m.seconds for m in runs["orig"]] or None,
                      spawn=[m.seconds for m in runs["spawn"]] or None, note="; ".join(notes))
                r.add("2", f"CPU per pipeline, K={k} on N={n}: all processes of all nodes (CPU-s)",
                      [m.cpu / k for m in runs["ours"]], [m.cpu / k for m in runs["orig"]] or None,
                      spawn=[m.cpu / k for m in runs["spawn"]] or None,
                      note=f"plain luigi run: {p50(plain_cpu):.3f} CPU-s; node processes alone (warm): "
                           f"{p50([m.own_cpu / k for m in runs['ours']]):.3f}")

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
            Row("5", "floor of warm starts: luigi forked by a process with luigi imported, fork → task run() (s)",
                [f["run_start"] for f in self.forked], compare=False,
                note="fork_floor.py: no node, no warm interpreter's set-up; fork time from /proc (10 ms resolution)"),
            Row("5", "floor of warm starts: CPU time of one forked luigi run (CPU-s)",
                [f["cpu"] for f in self.forked], compare=False),
        ]
        for k in self.args.sizes:
            r.rows.append(Row("5", f"CPU floor for K={k}: K × CPU of one plain run / {self.cores} cores (s)",
                              [floor[k]], compare=False))
            for key, label in (("ours", "warm"), ("spawn", "spawn")):
                runs = self.makespans.get((key, k, 1), [])
                if runs:
                    r.rows.append(Row("5", f"ours ({label}): makespan of K={k} on one node / CPU floor (×)",
                                      [m.seconds / floor[k] for m in runs], compare=False))
        self.floor = floor
        r.targets += targets(self, plain_wall, plain_cpu)
        r.rows.sort(key=lambda row: row.measure)  # stable: keeps the order within a measure


def _is_run(pid: int) -> bool:
    """A luigi process of a benchmark pipeline: spawned (`-m luigi`), or forked by a warm interpreter."""
    command = command_line(pid)
    return ("bench_noop" in command and "luigi" in command) or ("zygote.py" in command and _parent_is_zygote(pid))


def _parent_is_zygote(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            parent = int(handle.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "zygote.py" in command_line(parent)


def _sample_load(interval: float = 5.0) -> list[float]:
    """A list a daemon thread appends the 1-minute load average to every `interval` seconds."""
    samples: list[float] = []

    def sample() -> None:
        while True:
            samples.append(os.getloadavg()[0])
            time.sleep(interval)

    threading.Thread(target=sample, daemon=True, name="load sampler").start()
    return samples


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
        "luigi": f"{bench.env_luigi} in the pipelines' environment; "
                 f"{bench.original.luigi_version} running the original",
        "load average (1 min) at start / end": " / ".join(f"{load:.1f}" for load in bench.load),
        "sampled every 5 s during the run: median / max": (f"{p50(bench.load_samples):.1f} / "
                                                           f"{max(bench.load_samples, default=float('nan')):.1f}"),
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
        "run of the same task). Poltergust runs two ways side by side: *warm*, the default, forks luigi from a "
        "warm interpreter per environment; *spawn* (`--warm false`) starts a fresh `python -m luigi` per run, as "
        "before warm starts."),
        "",
        (f"Command: `{command}` — {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, took "  # noqa: UP017
        f"{duration / 60:.1f} min{' (quick mode: tiny sizes)' if args.quick else ''}."),
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in facts.items()) + ".",
        "",
        "### Poltergust against the original",
        "",
        ("All on the same local pipeline directory and the same luigid, one after the other, taking turns round "
        "by round. p50 and p95 over n samples (p95 interpolated between ranks, so with few samples it is close to "
        "the maximum); the ratios are of the p50s, Poltergust / original (below 1: Poltergust is lower)."),
        "",
        table(["#", "measure", "n (warm / spawn / orig.)", "warm p50", "p95", "spawn p50", "p95", "original p50",
               "p95", "warm / original", "spawn / original", "note"], compare),
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
        "their default settings (warm) or `--warm false` (spawn), sharing one environment cache; ready when "
        "`/healthz` answers 200. Every measure starts its nodes afresh, so a warm node's first run includes "
        "starting its warm interpreter (not counted in 1 and 4, counted in 2)."),
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
        "the nodes and every process they started (/proc, children included, warm interpreters too); what the "
        "rest of the machine used meanwhile (from /proc/stat) is in the note, since the machine may be shared. "
        f"K ≤ 20 is repeated {args.reps} times on one node and {max(1, args.reps - 1)} on several; larger K runs "
        f"once. Spawn runs on N = {', '.join(map(str, args.spawn_nodes))} only."),
        ("- 3: Poltergust on the local directory, Poltergust on the emulators (its storage requests go through a "
        "counting proxy) and the original run idle side by side in the same window after start-up."),
        ("- 4: configs are uploaded to fake-gcs-server, which publishes OBJECT_FINALIZE into the Pub/Sub emulator; "
        "the node hears it on its own subscription. Warm and spawn nodes take turns, round by round."),
        ("- 5: plain `luigi` runs are interleaved with the rounds of measure 1. Overhead = a pipeline's "
        "config → result time minus the plain run's p50 spawn → exit."),
        (f"- 6: {args.in_flight} configs whose task sleeps {args.in_flight_seconds:.0f} s are submitted at once; "
        "RSS and PSS (from /proc/PID/smaps_rollup) are sampled every 0.2 s. Summed RSS counts a page shared by "
        "forked children once per process; PSS splits it among them, so its sum is the memory actually used."),
        "",
    ]
    return "\n".join(parts)


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
    parser.add_argument("--spawn-nodes", type=_int_list, default=[1],
                        help="N at which makespans also run Poltergust with --warm false (default 1)")
    parser.add_argument("--reps", type=int, help="repetitions of each makespan with K ≤ 20 on one node (default 3; "
                                                 "quick 1); one less on several nodes; larger K run once")
    parser.add_argument("--original-skip", type=_pairs, default=None,
                        help="KxN makespans the original is left out of, comma-separated (default 200x3, "
                             "which takes it minutes; quick: none); '' runs it everywhere")
    parser.add_argument("--makespan-timeout", type=float, default=900.0,
                        help="seconds before a makespan gives up (default 900)")
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
    if not any(args.wheelhouse.glob("luigi-*.whl")):
        log(f"no luigi wheel in {args.wheelhouse}: downloading luigi and its dependencies into it")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(args.wheelhouse), "luigi"],
                       check=True)
    args.wheelhouse = args.wheelhouse.resolve()

    def measure(root: Path, command: str) -> str:
        started = time.monotonic()
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
        return render(bench, command, time.monotonic() - started)

    # --markdown naming a file without the section: the file becomes the section alone.
    return run_benchmark("run.py", args, argv, measure, readme=README, heading="## Pipelines:",
                         prefix="poltergust-bench-", append=False)


if __name__ == "__main__":
    entry(main)
