"""The fleet benchmark's measurements, and the Markdown that publishes them (tables, growth, targets)."""
from __future__ import annotations

import argparse
import collections
import datetime as _dt
import os
import statistics
from dataclasses import dataclass, field
from typing import Callable

from _report import fmt, machine, table

HEADING = "## Fleet scale: what one pipeline costs N nodes"
PERIODIC = {"list", "upload heartbeat"}
"""Storage requests idle nodes make on their own (rescans, heartbeats): not a pipeline's."""


@dataclass
class PipelineCost:
    """One pipeline on N nodes, from its upload until the fleet is quiet again."""

    kind: str
    """a: one task; b: a wide graph."""
    n: int
    luigi_starts: int
    taking_part: int
    """Nodes that started luigi for it."""
    makespan: float
    cpu: float
    idle_cpu: float
    """What the same nodes use idle over the same span (from the idle window)."""
    luigid_cpu: float
    messages: collections.Counter[tuple[str, str]]
    storage: collections.Counter[str]
    luigid: collections.Counter[str]
    ideal: float | None = None
    other_cpu: float = 0.0
    """What the rest of the machine used over the same span: luigid, the emulators, the benchmark, anyone else."""
    first_tasks: list[float] = field(default_factory=list)
    """Wide graph: seconds from the upload until each node's first task started, in order."""
    last_task: float | None = None
    """Wide graph: seconds from the upload until its last task ended."""

    @property
    def storage_requests(self) -> int:
        """Requests made for the pipeline: all but the nodes' periodic ones (rescans' listings, heartbeats)."""
        return sum(count for kind, count in self.storage.items() if kind not in PERIODIC)

    @property
    def luigid_requests(self) -> int:
        return sum(self.luigid.values())

    @property
    def delivered(self) -> int:
        return sum(self.messages.values())

    @property
    def watched(self) -> int:
        """Messages under the pipeline prefix: what Pub/Sub delivers with the subscriptions' filters applied."""
        return sum(count for (_, scope), count in self.messages.items() if scope == "watched")

    @property
    def cpu_above_idle(self) -> float:
        return self.cpu - self.idle_cpu


@dataclass
class Idle:
    n: int
    window: float
    storage: collections.Counter[str]
    luigid: collections.Counter[str]
    cpu: float
    lists_per_scan: float
    """Listing requests of one node's scan, measured at start-up."""
    rescan: float
    heartbeat: float
    subscriptions_left: int = -1
    first_run_cpu: float = float("nan")
    """CPU-s per node of the pipeline every node ran first (`nodes: all`): a luigi start and a warm interpreter's."""
    """Subscriptions on the topic after the nodes were stopped (SIGTERM)."""

    @property
    def node_minutes(self) -> float:
        return self.n * self.window / 60

    @property
    def storage_per_node_minute(self) -> float:
        """Requests in the window (heartbeats among them), plus the rescans' listings spread over their interval."""
        other = sum(count for kind, count in self.storage.items() if kind != "list")
        return other / self.node_minutes + self.lists_per_scan * 60 / self.rescan

    @property
    def luigid_per_node_minute(self) -> float:
        return sum(self.luigid.values()) / self.node_minutes

    @property
    def cpu_per_node_second(self) -> float:
        return self.cpu / (self.n * self.window)


@dataclass
class Busy:
    """Several wide graphs uploaded at once on N nodes: what luigid does meanwhile."""

    n: int
    pipelines: int
    makespan: float
    """From the uploads until the last result exists."""
    ideal: float
    luigid_requests: int
    luigid_cpu: float
    latencies: list[float]
    """Seconds luigid took to answer each request (measured at its proxy)."""

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares a + b·N."""
    if len(points) < 2:
        return (points[0][1] if points else float("nan")), 0.0
    mean_n = sum(n for n, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((n - mean_n) ** 2 for n, _ in points)
    slope = sum((n - mean_n) * (y - mean_y) for n, y in points) / spread
    return mean_y - slope * mean_n, slope


def _growth(points: list[tuple[int, float]]) -> tuple[str, str]:
    a, b = _fit(points)
    values = [y for _, y in points]
    span = max(n for n, _ in points) - min(n for n, _ in points)
    flat = abs(b) * span <= max(0.25 * max(abs(v) for v in values), 0.5) if values else True
    return f"{fmt(a, 2)} + {fmt(b, 3)}·N", "flat: O(1)" if flat else f"{fmt(b, 2)} per node: O(N)"


def _kinds(counter: collections.Counter, per: int = 1) -> str:
    return ", ".join(f"{kind if isinstance(kind, str) else ' '.join(kind)} {fmt(count / per, 1 if per > 1 else 0)}"
                     for kind, count in sorted(counter.items(), key=lambda item: -item[1]) if count)


Measure = Callable[[PipelineCost], float]
COLUMNS: list[tuple[str, Measure, int | None]] = [
    ("luigi starts", lambda c: c.luigi_starts, 0),
    ("nodes running luigi", lambda c: c.taking_part, 0),
    ("CPU-s above idle", lambda c: c.cpu_above_idle, 2),
    ("CPU-s", lambda c: c.cpu, 2),
    ("messages (filters applied)", lambda c: c.watched, 0),
    ("messages (emulator)", lambda c: c.delivered, 0),
    ("storage requests", lambda c: c.storage_requests, 0),
    ("luigid requests", lambda c: c.luigid_requests, 0),
    ("makespan (s)", lambda c: c.makespan, 1),
    ("CPU-s of the rest of the machine", lambda c: c.other_cpu, 1),
]
WIDE: list[tuple[str, Measure, int | None]] = [
    ("first task starts (s)", lambda c: c.first_tasks[0] if c.first_tasks else float("nan"), 1),
    ("last node's first task (s)", lambda c: c.first_tasks[-1] if c.first_tasks else float("nan"), 1),
    ("last task ends (s)", lambda c: c.last_task if c.last_task is not None else float("nan"), 1),
    ("ideal (s)", lambda c: c.ideal or float("nan"), 1),
    ("makespan / ideal", lambda c: c.makespan / c.ideal if c.ideal else float("nan"), 2),
]


def _median(samples: list[PipelineCost], measure: Measure) -> float:
    return statistics.median(measure(c) for c in samples)


def _groups(costs: list[PipelineCost], kind: str) -> dict[int, list[PipelineCost]]:
    groups: dict[int, list[PipelineCost]] = {}
    for cost in costs:
        if cost.kind == kind:
            groups.setdefault(cost.n, []).append(cost)
    return groups


def _rows(costs: list[PipelineCost], kind: str, columns: list[tuple[str, Measure, int | None]]) -> list[list[str]]:
    return [[str(n), str(len(samples)), *[fmt(_median(samples, measure), digits) for _, measure, digits in columns]]
            for n, samples in sorted(_groups(costs, kind).items())]


SERIES: list[tuple[str, str, Callable[[PipelineCost], float]]] = [
    ("a", "luigi processes started", lambda c: c.luigi_starts),
    ("a", "CPU-s above idle", lambda c: c.cpu_above_idle),
    ("a", "messages delivered (filters applied)", lambda c: c.watched),
    ("a", "storage requests", lambda c: c.storage_requests),
    ("a", "luigid requests", lambda c: c.luigid_requests),
    ("a", "makespan (s)", lambda c: c.makespan),
    ("b", "luigi processes started", lambda c: c.luigi_starts),
    ("b", "CPU-s above idle", lambda c: c.cpu_above_idle),
    ("b", "messages delivered (filters applied)", lambda c: c.watched),
    ("b", "storage requests", lambda c: c.storage_requests),
    ("b", "luigid requests", lambda c: c.luigid_requests),
]


def _typical(samples: list[PipelineCost]) -> PipelineCost:
    """The sample with the median CPU: its breakdowns (by kind) stand for the group's."""
    ordered = sorted(samples, key=lambda c: c.cpu_above_idle)
    return ordered[(len(ordered) - 1) // 2]


def _over(value: float, limit: float) -> str:
    return f"{(value / limit - 1) * 100:.0f} % over the limit" if limit > 0 else "over the limit"


def _targets(costs: list[PipelineCost], ns: list[int]) -> tuple[list[list[str]], list[str]]:
    """The targets, judged on the medians at N=30 (the largest N if it did not run) and on 3 nodes."""
    judged = 30 if 30 in ns else max(ns)
    single, wide = _groups(costs, "a"), _groups(costs, "b")
    runs, ones = single[judged], single.get(1)
    typical = _typical(runs)
    rows: list[list[str]] = []
    why: list[str] = []

    def target(name: str, required: str, value: float, limit: float, measured: str, reason: str) -> None:
        met = value <= limit
        rows.append([name, required, measured, "met" if met else "**missed**"])
        if not met:
            why.append(f"- {name}: {measured}, against {required}: {_over(value, limit)}. {reason}")

    starts = _median(runs, lambda c: c.luigi_starts)
    target(f"(a) luigi processes started, N={judged}", "≤ 2", starts, 2, fmt(starts, 0),
           "Nodes join when the starter sees tasks in luigid that nobody runs and calls for help; see the run logs.")
    watched = _median(runs, lambda c: c.watched)
    kinds = collections.Counter({kind: n for (kind, scope), n in typical.messages.items() if scope == "watched"})
    target(f"(a) messages delivered, N={judged}", f"≤ 3 per node = {3 * judged}", watched, 3 * judged,
           f"{fmt(watched, 0)} ({fmt(watched / judged, 1)} per node; the emulator, which ignores filters, delivered "
           f"{fmt(_median(runs, lambda c: c.delivered), 0)})",
           f"Per node: {_kinds(kinds, judged)}.")
    storage = _median(runs, lambda c: c.storage_requests)
    target(f"(a) storage requests, N={judged}", f"≤ 2 per node + 10 = {2 * judged + 10}", storage, 2 * judged + 10,
           f"{fmt(storage, 0)} ({fmt(storage / judged, 1)} per node)",
           f"By kind, per node (a typical run): {_kinds(typical.storage, judged)}. Every node reads the config "
           "as two requests (its metadata, which says its size before anything is downloaded, then its content "
           "at that generation) and tries the start marker once: 3 per node. Two would need the size and "
           "generation from the notification itself (a JSON_API_V1 payload) or a download capped by a range.")
    if ones:
        cpu, cpu_one = _median(runs, lambda c: c.cpu_above_idle), _median(ones, lambda c: c.cpu_above_idle)
        slope = (cpu - cpu_one) / max(judged - 1, 1)
        target(f"(a) CPU-s above idle, N={judged}", "≤ 2× N=1", cpu, 2 * cpu_one,
               f"{fmt(cpu / cpu_one, 2)}× ({fmt(cpu, 2)} vs {fmt(cpu_one, 2)}; with idle: "
               f"{fmt(_median(runs, lambda c: c.cpu), 2)} vs {fmt(_median(ones, lambda c: c.cpu), 2)})",
               f"Each node that does not run the pipeline still costs ≈ {fmt(slope * 1000, 0)} ms of CPU in its own "
               f"process: it hears of the upload, the result and the removal, reads the config and tries the start "
               f"marker; the emulator, which ignores filters, makes it hear "
               f"{fmt(_median(runs, lambda c: c.delivered) / judged, 1)} messages, not "
               f"{fmt(watched / judged, 1)}. Meeting the target needs less than "
               f"{fmt(cpu_one / max(judged - 1, 1) * 1000, 0)} ms per node.")
    if 1 in wide and judged in wide:
        alone = _median(wide[1], lambda c: c.luigid_requests)
        joined = _typical(wide[judged])
        helpers = max(joined.taking_part - 1, 0)
        requests = _median(wide[judged], lambda c: c.luigid_requests)
        limit = 2 * alone + 10 * helpers
        target(f"(b) luigid requests, N={judged}", f"≤ 2× N=1 + 10 per helper = {fmt(limit, 0)}", requests, limit,
               f"{fmt(requests, 0)} ({helpers} helpers; N=1: {fmt(alone, 0)})",
               f"luigid calls of a typical run: {_kinds(joined.luigid)}.")
    if wide.get(3) and wide[3][0].ideal and wide[3][0].first_tasks:
        b3 = _typical(wide[3])
        makespan = _median(wide[3], lambda c: c.makespan)
        target("(b) makespan on 3 nodes", "≤ 1.2× the ideal", makespan, 1.2 * (b3.ideal or 0),
               f"{fmt(makespan / (b3.ideal or 1), 2)}× ({fmt(makespan, 1)} s vs {fmt(b3.ideal or 0, 1)} s)",
               f"The first task started {fmt(b3.first_tasks[0], 1)} s after the upload (luigi's start and its "
               f"scheduling of the whole graph on the node that started the run); the helpers' first tasks at "
               f"{' and '.join(fmt(t, 1) + ' s' for t in b3.first_tasks[1:])} (the starter's first look at the "
               f"graph, its call for help, then each helper's own luigi start and first request for work); the "
               f"last task ended at {fmt(b3.last_task or 0, 1)} s and the result was written at "
               f"{fmt(b3.makespan, 1)} s. All of it on the same 2 cores that run the tasks: {fmt(b3.cpu, 1)} CPU-s "
               f"of the nodes, {fmt(b3.other_cpu, 1)} of the rest of the machine (luigid, the emulators, the "
               f"benchmark and whatever else ran) over the {fmt(b3.makespan, 0)} s.")
    return rows, why


def _summary(costs: list[PipelineCost], idles: list[Idle]) -> list[str]:
    """What grows how, in words, from the measured points."""
    def slope(kind: str, measure: Measure) -> float:
        return _fit([(n, _median(samples, measure)) for n, samples in _groups(costs, kind).items()])[1]

    single, wide = _groups(costs, "a"), _groups(costs, "b")
    top, low = max(single), min(single)
    makespans = {n: _median(samples, lambda c: c.makespan) for n, samples in wide.items()}
    fastest = min(makespans, key=makespans.__getitem__)
    joined = wide[top]
    helpers = _median(joined, lambda c: max(c.taking_part - 1, 0))
    extra = _median(joined, lambda c: c.luigid_requests) - _median(wide[low], lambda c: c.luigid_requests)
    cpu_per_joiner = _median(joined, lambda c: c.cpu_above_idle / max(c.taking_part, 1))
    return [
        f"- Per pipeline, every node costs ≈ {fmt(slope('a', lambda c: c.storage_requests), 1)} storage requests, "
        f"{fmt(slope('a', lambda c: c.watched), 1)} messages and "
        f"{fmt(slope('a', lambda c: c.cpu_above_idle) * 1000, 0)} ms of CPU whether or not it runs anything: "
        "hearing of the upload, reading the config, trying the start marker, and hearing of the result and the "
        "removal (not reading them). That is O(N), the part DESIGN.md allows (one notification and one read per "
        "node).",
        f"- A one-task pipeline starts luigi {fmt(_median(single[top], lambda c: c.luigi_starts), 0)} time(s) and "
        f"makes {fmt(_median(single[top], lambda c: c.luigid_requests), 0)} luigid requests at N={top} "
        f"(N={low}: {fmt(_median(single[low], lambda c: c.luigi_starts), 0)} and "
        f"{fmt(_median(single[low], lambda c: c.luigid_requests), 0)}).",
        f"- A wide graph takes every node that answers a call for help, up to its width: at N={top}, "
        f"{fmt(helpers, 0)} helpers joined the starter, and luigid answered "
        f"{fmt(extra / max(helpers, 1), 1)} requests more per helper than for the graph on one node (a helper asks "
        f"for work and reports its tasks; it does not add the graph again); each node that ran luigi cost "
        f"{fmt(cpu_per_joiner, 2)} CPU-s. The makespan was shortest at N={fastest} "
        f"({fmt(makespans[fastest], 1)} s): every node of this benchmark shares the same 2 cores, so beyond a few "
        "nodes more luigi processes cost more CPU than they save; on separate machines each brings its own.",
        f"- Idle nodes: {fmt(max(i.storage_per_node_minute for i in idles), 2)} storage requests per node-minute at "
        f"most (a heartbeat every {fmt(idles[0].heartbeat, 0)} s, a listing every {fmt(idles[0].rescan, 0)} s), "
        f"{fmt(max(i.luigid_per_node_minute for i in idles), 2)} luigid requests, "
        f"≈ {fmt(statistics.median(i.cpu_per_node_second * 60 for i in idles), 2)} CPU-s per node-minute (the "
        "open Pub/Sub stream), at every N.",
    ]


def render(costs: list[PipelineCost], idles: list[Idle], busies: list[Busy], args: argparse.Namespace,
           command: str, duration: float, load: list[float]) -> str:
    ns = sorted({c.n for c in costs})
    facts = {"nproc": str(len(os.sched_getaffinity(0))), **machine(),
             "load average (1 min) at start / end": " / ".join(f"{value:.1f}" for value in load)}
    header = ["N", "runs", *[name for name, _, _ in COLUMNS]]
    growth = []
    for kind, label, value in SERIES:
        points = [(n, float(_median(samples, value))) for n, samples in sorted(_groups(costs, kind).items())]
        fit, words = _growth(points)
        growth.append([f"({kind}) {label}", *[fmt(y, 2 if isinstance(y, float) and y % 1 else 0) for _, y in points],
                       fit, words])
    for label, value in (("idle storage requests per node-minute", lambda i: i.storage_per_node_minute),
                         ("idle luigid requests per node-minute", lambda i: i.luigid_per_node_minute)):
        points = [(i.n, value(i)) for i in idles]
        fit, words = _growth(points)
        growth.append([label, *[fmt(y, 2) for _, y in points], fit, words])
    targets, why = _targets(costs, ns)
    top = max(ns)
    worst = {kind: _typical(_groups(costs, kind)[top]) for kind in ("a", "b")}
    parts = [
        HEADING, "",
        "Written by `python benchmarks/fleet.py`; numbers from one run on one machine, all N node processes on "
        "this one machine (so every node's CPU comes out of the same 2 cores).", "",
        f"Command: `{command}` — {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, took "  # noqa: UP017
        f"{duration / 60:.1f} min{' (quick mode)' if args.quick else ''}.", "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in facts.items()) + ".", "",
        *_summary(costs, idles), "",
        "### (a) a one-task pipeline", "", "Medians over the runs at each N (the breakdowns below the tables: the run "
        "with the median CPU).", "",
        table(header, _rows(costs, "a", COLUMNS)), "",
        f"Storage requests at N={top}, by kind: {_kinds(worst['a'].storage)}; luigid calls: "
        f"{_kinds(worst['a'].luigid)}; messages: {_kinds(worst['a'].messages)}.", "",
        f"### (b) a graph of {args.parts} independent {args.seconds:g} s tasks", "",
        table(header + [name for name, _, _ in WIDE], _rows(costs, "b", COLUMNS + WIDE)), "",
        "Medians over the runs at each N. Times are from the upload; each task's end is its output file's "
        "modification time.", "",
        f"Storage requests at N={top}, by kind: {_kinds(worst['b'].storage)}; luigid calls: "
        f"{_kinds(worst['b'].luigid)}; messages: {_kinds(worst['b'].messages)}.", "",
        f"### (c) {args.busy_pipelines} wide graphs at once: luigid under load", "",
        table(["N", "pipelines", "makespan (s)", "ideal (s)", "luigid requests", "luigid CPU-s",
               "luigid latency p50 (ms)", "p99 (ms)", "max (ms)"],
              [[str(b.n), str(b.pipelines), fmt(b.makespan, 1), fmt(b.ideal, 1), str(b.luigid_requests),
                fmt(b.luigid_cpu, 2), fmt(b.percentile(0.5) * 1000, 1), fmt(b.percentile(0.99) * 1000, 1),
                fmt(max(b.latencies, default=float("nan")) * 1000, 1)] for b in busies]), "",
        f"The {args.busy_pipelines} configs are uploaded together (from N={args.busy_from}: fewer nodes would take "
        "minutes of task time); latency is luigid's time to answer each request, measured at its proxy.", "",
        "### Idle nodes", "",
        table(["N", "window (s)", "storage requests per node-minute", "luigid requests per node-minute",
               "CPU-s per node-minute", "subscriptions left after SIGTERM"],
              [[str(i.n), fmt(i.window, 1), fmt(i.storage_per_node_minute, 2), fmt(i.luigid_per_node_minute, 2),
                fmt(i.cpu_per_node_second * 60, 3), str(i.subscriptions_left)] for i in idles]), "",
        "### What grows how", "",
        "A least-squares line a + b·N through the measured points; flat when b over the whole range of N is "
        "small next to the values.", "",
        table(["measure", *[f"N={n}" for n in ns], "fit", "growth"], growth), "",
        "### Targets", "", table(["target", "required", "measured", ""], targets), "",
    ]
    if why:
        parts += ["Why targets are missed:", "", *why, ""]
    parts += [
        "### How it is measured", "",
        "- Before the idle window every node runs one pipeline (a one-task pipeline with `nodes: all`, its task "
        "lasting long enough for every node's luigi to start), as in a fleet that has been at work: each node "
        "then has its environment's warm interpreter, so a measured pipeline costs the same whichever node "
        "starts it. That first pipeline cost each node "
        + ", ".join(f"{fmt(i.first_run_cpu, 2)} (N={i.n})" for i in idles)
        + " CPU-s (its reads and writes, a luigi start and the warm interpreter's): what the starting node spends "
        "on a pipeline that is the first it runs, where (a) at N=1 shows what it spends once it has run one.",
        "- Nodes: `python -m poltergust.async_worker --path gs://fleet/pipeline --project P --topic T "
        "--scheduler-url URL --data-dir DIR --env-dir SHARED --node-name NAME --http-port PORT`, every other "
        "setting at its default (subscription name derived, rescan every 300 s), all started at once; ready "
        "when `/healthz` answers 200. The environment (luigi from the local wheelhouse) is built once before "
        "measuring, so no node builds one.",
        "- Storage: the nodes reach fake-gcs-server through a counting proxy (`STORAGE_EMULATOR_HOST`); the "
        "benchmark's own uploads and polls go around it. A pipeline's storage requests leave out what nodes do "
        "on their own schedule whatever the pipelines (the rescans' listings, the heartbeats), which can fall into "
        "any window; uploads are told apart by what they write (heartbeat, log, marker: the nodes' own objects "
        "under `_poltergust/`).",
        "- luigid: `python -m poltergust.luigid` behind a counting proxy that every node and every luigi worker "
        "uses as `--scheduler-url`.",
        "- Messages: each node counts what its subscription delivers (`poltergust_events_received_total`, read "
        "from `/metrics` before and after). The Pub/Sub emulator ignores subscription filters, so it delivers "
        "every notification of the bucket, including the nodes' own writes under `_poltergust/`; "
        "\"filters applied\" counts the messages under the pipeline prefix, which is what Pub/Sub delivers "
        "through the nodes' filters.",
        "- luigi processes: the \"luigi attempt\" lines of every node's run logs of the pipeline.",
        "- CPU: utime + stime of the node processes and every process they started (/proc, reaped children "
        "included), from the upload until the fleet is quiet again (no luigi process, no request to either proxy "
        "for 2 s); \"above idle\" subtracts what the same nodes use idle over the same span (from the idle "
        "window). luigid's CPU is not in it (at the largest N: "
        f"{fmt(worst['a'].luigid_cpu, 2)} CPU-s for (a), {fmt(worst['b'].luigid_cpu, 2)} for (b)).",
        "- Makespan: from the upload until `NAME.done.yaml` exists (polled every 50 ms). The ideal of (b) is "
        "⌈tasks / N⌉ × task duration: each node runs one task at a time. The machine may be shared: \"rest of the "
        "machine\" is its busy CPU time (/proc/stat) over the same span, minus the nodes'.",
        f"- Idle: a {args.idle_seconds:g} s window after start-up has settled, before the pipelines (the "
        "heartbeats in it are counted as they come); the rescan's listings (counted at start-up) are spread over "
        "the rescan interval. After the pipelines every node gets "
        "SIGTERM, and the topic's subscriptions are counted.",
        "",
    ]
    return "\n".join(parts)
