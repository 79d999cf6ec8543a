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
    first_tasks: list[float] = field(default_factory=list)
    """Wide graph: seconds from the upload until each node's first task started, in order."""
    last_task: float | None = None
    """Wide graph: seconds from the upload until its last task ended."""

    @property
    def storage_requests(self) -> int:
        """Requests made for the pipeline: everything but listings (those are the nodes' periodic rescans)."""
        return sum(count for kind, count in self.storage.items() if kind != "list")

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
    subscriptions_left: int = -1
    """Subscriptions on the topic after the nodes were stopped (SIGTERM)."""

    @property
    def node_minutes(self) -> float:
        return self.n * self.window / 60

    @property
    def storage_per_node_minute(self) -> float:
        """Requests in the window (listings aside), plus the rescans' listings spread over their interval."""
        other = sum(count for kind, count in self.storage.items() if kind != "list")
        return other / self.node_minutes + self.lists_per_scan * 60 / self.rescan

    @property
    def luigid_per_node_minute(self) -> float:
        return sum(self.luigid.values()) / self.node_minutes

    @property
    def cpu_per_node_second(self) -> float:
        return self.cpu / (self.n * self.window)


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


def _targets(costs: list[PipelineCost], ns: list[int]) -> tuple[list[list[str]], list[str]]:
    by = {(kind, n): _typical(samples) for kind in ("a", "b") for n, samples in _groups(costs, kind).items()}
    top = max(ns)
    a, one = by[("a", top)], by.get(("a", 1))
    rows: list[list[str]] = []
    why: list[str] = []

    def target(name: str, required: str, measured: str, met: bool, reason: str) -> None:
        rows.append([name, required, measured, "met" if met else "**missed**"])
        if not met:
            why.append(f"- {name} ({required}): {reason}")

    per_node = (a.watched - (by[("a", 1)].watched if one else 0)) / max(top - 1, 1)
    target(f"(a) luigi processes started, N={top}", "≤ 2", str(a.luigi_starts), a.luigi_starts <= 2,
           f"{a.luigi_starts} starts on {a.taking_part} nodes: nodes join when the starter sees tasks in luigid that "
           "nobody runs and calls for help; see the run logs.")
    if one:
        ratio = a.cpu_above_idle / one.cpu_above_idle if one.cpu_above_idle > 0 else float("inf")
        slope = (a.cpu_above_idle - one.cpu_above_idle) / max(top - 1, 1)
        target(f"(a) CPU-s above idle, N={top}", "≤ 2× N=1", f"{fmt(ratio, 2)}× ({fmt(a.cpu_above_idle, 2)} vs "
               f"{fmt(one.cpu_above_idle, 2)}; with idle: {fmt(a.cpu, 2)} vs {fmt(one.cpu, 2)})", ratio <= 2,
               f"each extra node costs ≈ {fmt(slope, 3)} CPU-s in its own process for a pipeline it does not run: "
               f"it is told of every write under the prefix ({fmt(per_node, 1)} messages), reads the config and "
               "tries the start marker, and reads the claimed generation the claim's rewrite announces.")
    kinds = collections.Counter({kind: count for (kind, scope), count in a.messages.items() if scope == "watched"})
    target(f"(a) messages delivered, N={top}", f"≤ 3·N = {3 * top}",
           f"{a.watched} ({fmt(a.watched / top, 1)} per node; the emulator, which ignores filters, delivered "
           f"{a.delivered})", a.watched <= 3 * top,
           f"per node: {_kinds(kinds, top)}. Every write under the pipeline prefix reaches every node (Pub/Sub "
           "filters have no suffix match): the upload, the claim's conditional rewrite of the config (a finalize "
           "and a delete of the old generation), the result file and the config's removal make 5; each call for "
           "help adds one. Three per node needs a claim that leaves the config as it is (a create-if-absent "
           "marker under `_poltergust/`, say).")
    storage_extra = a.storage_requests - 3 * top
    target(f"(a) storage requests, N={top}", f"≤ 3·N + 20 = {3 * top + 20}",
           f"{a.storage_requests} ({fmt(a.storage_requests / top, 1)} per node)", storage_extra <= 20,
           f"by kind, per node: {_kinds(a.storage, top)}. Each node reads the config (metadata and content) and "
           "tries the start marker once: 3; the claim's rewrite then announces a new generation of the config, "
           "which every node reads (its metadata, and its content unless it is already gone) only to find it "
           "claimed.")
    b3 = by.get(("b", 3))
    if b3 is not None and b3.ideal and b3.first_tasks:
        ratio = b3.makespan / b3.ideal
        target("(b) makespan on 3 nodes", "≤ 1.3× the ideal", f"{fmt(ratio, 2)}× ({fmt(b3.makespan, 1)} s vs "
               f"{fmt(b3.ideal, 1)} s)", ratio <= 1.3,
               f"the first task started {fmt(b3.first_tasks[0], 1)} s after the upload (luigi's start and its "
               f"scheduling of the whole graph, on the node that started the run), the helpers' first tasks "
               f"{' and '.join(fmt(t, 1) + ' s' for t in b3.first_tasks[1:])} after it (the starter's first look "
               f"at the graph, its call for help, then each helper's own luigi start and walk of the graph); the "
               f"last task ended at {fmt(b3.last_task or 0, 1)} s and the result was written at "
               f"{fmt(b3.makespan, 1)} s. All of it on the same 2 cores that run the tasks: {fmt(b3.cpu, 1)} "
               f"CPU-s in all.")
    return rows, why


def render(costs: list[PipelineCost], idles: list[Idle], args: argparse.Namespace, command: str, duration: float,
           load: list[float]) -> str:
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
        "Written by `python benchmarks/fleet.py`; numbers from one run on one machine, every N node processes on "
        "this one machine (so every node's CPU comes out of the same 2 cores).", "",
        f"Command: `{command}` — {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, took "  # noqa: UP017
        f"{duration / 60:.1f} min{' (quick mode)' if args.quick else ''}.", "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in facts.items()) + ".", "",
        "### (a) a one-task pipeline", "", "Medians over the runs at each N.", "",
        table(header, _rows(costs, "a", COLUMNS)), "",
        f"Storage requests at N={top}, by kind: {_kinds(worst['a'].storage)}; luigid calls: "
        f"{_kinds(worst['a'].luigid)}; messages: {_kinds(worst['a'].messages)}.", "",
        f"### (b) a graph of {args.parts} independent {args.seconds:g} s tasks", "",
        table(header + [name for name, _, _ in WIDE], _rows(costs, "b", COLUMNS + WIDE)), "",
        "Times are from the upload; each task's end is its output file's modification time.", "",
        f"Storage requests at N={top}, by kind: {_kinds(worst['b'].storage)}; luigid calls: "
        f"{_kinds(worst['b'].luigid)}; messages: {_kinds(worst['b'].messages)}.", "",
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
        "- Nodes: `python -m poltergust.async_worker --path gs://fleet/pipeline --project P --topic T "
        "--scheduler-url URL --data-dir DIR --env-dir SHARED --node-name NAME --http-port PORT`, every other "
        "setting at its default (subscription name derived, rescan every 300 s), all started at once; ready "
        "when `/healthz` answers 200. The environment (luigi from the local wheelhouse) is built once before "
        "measuring, so no node builds one.",
        "- Storage: the nodes reach fake-gcs-server through a counting proxy (`STORAGE_EMULATOR_HOST`); the "
        "benchmark's own uploads and polls go around it. A pipeline's storage requests leave out listings "
        "(the nodes' periodic rescans, which can fall into any window).",
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
        "⌈tasks / N⌉ × task duration: each node runs one task at a time.",
        f"- Idle: a {args.idle_seconds:g} s window after start-up has settled, before the pipelines; the rescan's "
        "listings (counted at start-up) are spread over the rescan interval. After the pipelines every node gets "
        "SIGTERM, and the topic's subscriptions are counted.",
        "",
    ]
    return "\n".join(parts)
