#!/usr/bin/env python3
"""What one pipeline costs a fleet of N nodes, and what idle nodes cost, on the GCS + Pub/Sub emulators.

    python benchmarks/fleet.py              # N = 1, 3, 10, 30, 60; writes its section of benchmarks/README.md
    python benchmarks/fleet.py --quick      # N = 1, 3, a short idle window, a narrower graph; prints only

N node processes (`python -m poltergust.async_worker` with default settings,
one environment cache shared by all and built before measuring) run on this
machine against fake-gcs-server, which publishes bucket notifications into
Google's Pub/Sub emulator, and one luigid (`python -m poltergust.luigid`).
Storage API and luigid each sit behind a counting proxy. For each N the
nodes start and settle, sit idle for a window, then run (a) a one-task
pipeline and (b) a graph of many independent 1 s tasks, one after the other,
and (c, from N = 10) ten such graphs uploaded at once, to see luigid's CPU and
request latency under load.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the harness: the tests' starters of luigid and the emulators

from _fleet_report import PERIODIC, Busy, Idle, PipelineCost, render  # noqa: E402
from _main import entry, log, run_benchmark  # noqa: E402
from _procs import command_line, descendants, machine_cpu, register, tree_cpu  # noqa: E402
from _systems import ROOT, OurNode, Ours, Workspace, clean_environ, node_default  # noqa: E402
from harness import Bucket, FakeGcs, Luigid, Proxy, PubSubEmulator, luigid_call, wait_for  # noqa: E402
from harness import kind as api_operation  # noqa: E402

README = HERE / "README.md"
HEADING = "## Fleet scale"
PROJECT = "poltergust-fleet"
TOPIC = "fleet-events"
METRIC = "poltergust_events_received"
OWN_OBJECTS = (("_poltergust/nodes/", "heartbeat"), ("_poltergust/logs/", "log"), ("_poltergust/runs/", "marker"))
UPLOADED_NAME = re.compile(rb'"name": "([^"]*)"')


def storage_kind(method: str, path: str, body: bytes) -> str:
    """The API operation, with uploads of the nodes' own objects told apart (heartbeats, run logs, markers)."""
    operation = api_operation(method, path)
    if operation == "upload" and (match := UPLOADED_NAME.search(body[:4096])):
        name = match.group(1).decode(errors="replace")
        for prefix, label in OWN_OBJECTS:
            if name.startswith(prefix):
                return f"upload {label}"
    return operation


@dataclass
class Counts:
    """What the fleet has done up to one moment: requests by kind, CPU seconds."""

    at: float
    storage: collections.Counter[str]
    luigid: collections.Counter[str]
    cpu: float
    """The node processes and every process they started (luigi, installers), exited ones included."""
    luigid_cpu: float
    machine_cpu: float
    """CPU seconds the whole machine has been busy (all processes, anyone's)."""


class Fleet:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        log(f"workspace {root}; starting the Pub/Sub emulator, fake-gcs-server and luigid")
        self.pubsub = PubSubEmulator(root / "emulators", PROJECT)
        register(self.pubsub.stop)
        self.pubsub.create_topic(TOPIC)  # and PUBSUB_EMULATOR_HOST for this process, to list subscriptions
        self.gcs = FakeGcs(root / "emulators", self.pubsub, TOPIC)
        register(self.gcs.stop)
        self.bucket = Bucket(self.gcs, "fleet")
        self.luigid = Luigid(root / "luigid")
        register(self.luigid.stop)
        self.storage = Proxy(self.gcs.url, classify=storage_kind)
        register(self.storage.close)
        self.scheduler = Proxy(self.luigid.url, classify=luigid_call)
        register(self.scheduler.close)
        self.ws = Workspace(root, args.wheelhouse, self.scheduler.url)
        self.environment = self.bucket.url("environment/env.yaml")
        self.bucket.upload("environment/env.yaml", self.ws.environment_yaml)
        self.ours = Ours(self.ws, root / "environments")
        self.env = clean_environ(PUBSUB_EMULATOR_HOST=self.pubsub.host, STORAGE_EMULATOR_HOST=self.storage.url)
        self.costs: list[PipelineCost] = []
        self.idles: list[Idle] = []
        self.busies: list[Busy] = []
        self.load = [os.getloadavg()[0]]

    # -- nodes ---------------------------------------------------------------------

    def start(self, count: int) -> list[OurNode]:
        return self.ours.start(count, "--project", PROJECT, "--topic", TOPIC, path=self.bucket.url("pipeline"),
                               env=self.env, tag=f"n{count}")

    def stop(self, nodes: list[OurNode]) -> int:
        """SIGTERM every node at once, wait for them; returns how many subscriptions are left behind."""
        for node in nodes:
            try:
                os.killpg(node.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.ours.stop()
        from google.cloud import pubsub_v1

        with pubsub_v1.SubscriberClient() as client:
            return len(list(client.list_subscriptions(request={"project": f"projects/{PROJECT}"})))

    def counts(self, nodes: list[OurNode]) -> Counts:
        return Counts(time.time(), collections.Counter(self.storage.counts()),
                      collections.Counter(self.scheduler.counts()), sum(tree_cpu(node.pid) for node in nodes),
                      tree_cpu(self.luigid.process.pid), machine_cpu())

    def messages(self, nodes: list[OurNode]) -> collections.Counter[tuple[str, str]]:
        """Messages delivered to the nodes' subscriptions so far, by (kind, scope), from their /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        total: collections.Counter[tuple[str, str]] = collections.Counter()
        for node in nodes:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics", timeout=10) as response:
                text = response.read().decode()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == f"{METRIC}_total":
                        total[(sample.labels["kind"], sample.labels["scope"])] += int(sample.value)
        return total

    def settle(self, nodes: list[OurNode], quiet: float = 2.0, timeout: float = 90.0) -> None:
        """Wait until no luigi runs and neither proxy has seen a request (rescans, heartbeats aside) for `quiet` s."""
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            storage = {k: v for k, v in self.storage.counts().items() if k not in PERIODIC}
            luigi = any(" -m luigi " in command_line(pid) for pid in descendants(os.getpid()))
            now = (storage, self.scheduler.counts(), luigi)
            if now != last:
                last, since = now, time.monotonic()
            elif not luigi and time.monotonic() - since >= quiet:
                return
            for node in nodes:
                node.check_alive()
            time.sleep(0.25)
        log("  (did not settle: measuring anyway)")

    # -- measures --------------------------------------------------------------------

    def idle(self, nodes: list[OurNode], startup_lists: int) -> Idle:
        before, window = self.counts(nodes), self.args.idle_seconds
        time.sleep(window)
        after = self.counts(nodes)
        return Idle(len(nodes), after.at - before.at, after.storage - before.storage, after.luigid - before.luigid,
                    after.cpu - before.cpu, startup_lists / len(nodes), node_default("rescan_interval"),
                    node_default("heartbeat_interval"))

    def prime(self, nodes: list[OurNode]) -> float:
        """Have every node run one pipeline (`nodes: all`), as in a fleet at work: each then has its warm
        interpreter, so the pipelines measured next cost the same on whichever node starts them.

        The task lasts long enough for every node's luigi to start before it ends; returns the CPU-s per node.
        """
        name = self.ws.name(f"prime{len(nodes)}")
        seconds = 2 + 0.5 * len(nodes)
        log(f"  every node runs one pipeline first ({seconds:g} s task, nodes: all)")
        before = self.counts(nodes)
        self.bucket.upload(f"pipeline/{name}.config.yaml",
                           self.ws.config_text(name, environment=self.environment, seconds=seconds) + "nodes: all\n")
        self._wait_result(name, nodes)
        self.settle(nodes)
        starts, _ = self._luigi_starts(nodes, name)
        warm = sum(any("zygote" in command_line(pid) for pid in descendants(node.pid)) for node in nodes)
        log(f"    {starts} luigi start(s); {warm} of {len(nodes)} node(s) have a warm interpreter")
        return (self.counts(nodes).cpu - before.cpu) / len(nodes)

    def config(self, kind: str, name: str) -> str:
        if kind == "a":
            return self.ws.config_text(name, environment=self.environment)
        task = {"name": "Fan", "module": "poltergust_testpipes", "out-dir": str(self.ws.out / name),
                "parts": self.args.parts, "seconds": self.args.seconds}
        return yaml.safe_dump({"environment": self.environment, "task": task,
                               "variables": {"PYTHONPATH": str(ROOT / "tests" / "testpipes")}})

    def pipeline(self, kind: str, nodes: list[OurNode], idle: Idle | None) -> PipelineCost:
        name = self.ws.name(f"{kind}{len(nodes)}")
        before, messages_before = self.counts(nodes), self.messages(nodes)
        started = time.time()
        self.bucket.upload(f"pipeline/{name}.config.yaml", self.config(kind, name))
        self._wait_result(name, nodes)
        makespan = time.time() - started
        self.settle(nodes)
        after, messages = self.counts(nodes), self.messages(nodes) - messages_before
        starts, taking_part = self._luigi_starts(nodes, name)
        span = after.at - before.at
        idle_cpu = idle.cpu_per_node_second * len(nodes) * span if idle else 0.0
        cost = PipelineCost(kind, len(nodes), starts, taking_part, makespan, after.cpu - before.cpu, idle_cpu,
                            after.luigid_cpu - before.luigid_cpu, messages, after.storage - before.storage,
                            after.luigid - before.luigid)
        cost.other_cpu = max(0.0, after.machine_cpu - before.machine_cpu - cost.cpu)
        if kind == "b":
            cost.ideal = -(-self.args.parts // len(nodes)) * self.args.seconds  # each node runs one task at a time
            cost.first_tasks, cost.last_task = self._timeline(name, started)
        return cost

    def busy(self, nodes: list[OurNode]) -> Busy:
        """Several wide graphs uploaded at once: luigid's CPU and its answers' latency while they run."""
        names = [self.ws.name(f"c{len(nodes)}-{i}") for i in range(self.args.busy_pipelines)]
        before, answered = self.counts(nodes), len(self.scheduler.latencies())
        started = time.time()
        for name in names:
            self.bucket.upload(f"pipeline/{name}.config.yaml", self.config("b", name))
        for name in names:
            self._wait_result(name, nodes)
        makespan = time.time() - started
        self.settle(nodes)
        after = self.counts(nodes)
        ideal = -(-len(names) * self.args.parts // len(nodes)) * self.args.seconds
        return Busy(len(nodes), len(names), makespan, ideal, sum((after.luigid - before.luigid).values()),
                    after.luigid_cpu - before.luigid_cpu, self.scheduler.latencies()[answered:])

    def _timeline(self, name: str, started: float) -> tuple[list[float], float]:
        """When each node's first task of the wide graph started, and when its last task ended (after the upload).

        Each task writes its node's name into its output; the file's modification time is the task's end.
        """
        firsts: dict[str, float] = {}
        last = 0.0
        for path in (self.ws.out / name).glob("part-*.txt"):
            end = path.stat().st_mtime - started
            node = path.read_text()
            firsts[node] = min(firsts.get(node, end), end - self.args.seconds)
            last = max(last, end)
        return sorted(firsts.values()), last

    def _wait_result(self, name: str, nodes: list[OurNode]) -> None:
        deadline = time.monotonic() + self.args.pipeline_timeout
        checked = 0.0
        while not self.bucket.exists(f"pipeline/{name}.done.yaml"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: no result after {self.args.pipeline_timeout:.0f}s; see {self.ws.logs}")
            if time.monotonic() - checked > 1:
                checked = time.monotonic()
                if self.bucket.exists(f"pipeline/{name}.error.yaml"):
                    raise RuntimeError(f"{name} ended in error:\n{self.bucket.read(f'pipeline/{name}.error.yaml')!r}")
                for node in nodes:
                    node.check_alive()
            time.sleep(0.05)

    def _luigi_starts(self, nodes: list[OurNode], name: str) -> tuple[int, int]:
        """luigi processes started for the pipeline fleet-wide, and on how many nodes (from the run logs)."""
        starts = taking_part = 0
        for node in nodes:
            found = 0
            for path in (self.ws.root / "nodes" / node.node_name / "logs").glob(f"{name}.*.log"):
                found += path.read_text(errors="replace").count("luigi attempt")
            starts += found
            taking_part += bool(found)
        return starts, taking_part

    # -- the run -----------------------------------------------------------------------

    def warm_up(self) -> None:
        log("building the pipelines' environment once (not measured)")
        nodes = self.start(1)
        name = self.ws.name("warm")
        self.bucket.upload(f"pipeline/{name}.config.yaml", self.config("a", name))
        self._wait_result(name, nodes)
        self.stop(nodes)

    def round(self, count: int) -> None:
        lists_before = self.storage.counts().get("list", 0)
        log(f"N={count}: starting {count} node(s)")
        started = time.monotonic()
        nodes = self.start(count)
        subscribed = time.monotonic() - started
        # Every node imports and subscribes on the same few cores: allow more time the more there are.
        wait_for(lambda: all("scanned:" in node.output() for node in nodes), 60 + 3 * count,
                 "every node's first scan")
        log(f"  ready in {subscribed:.1f}s (process start to subscribed), first scan done at "
            f"{time.monotonic() - started:.1f}s")
        self.settle(nodes)
        startup_lists = self.storage.counts().get("list", 0) - lists_before
        first_run = self.prime(nodes)
        log(f"  idle for {self.args.idle_seconds:.0f}s")
        idle = self.idle(nodes, startup_lists)
        idle.first_run_cpu = first_run
        # The wide graph is repeated where its target is judged (3 nodes); elsewhere it runs once.
        for shape in ["a"] * self.args.repeat + ["b"] * (self.args.repeat if count == 3 else 1):
            log(f"  pipeline ({shape})")
            cost = self.pipeline(shape, nodes, idle)
            log(f"    {cost.makespan:.1f}s, {cost.luigi_starts} luigi start(s) on {cost.taking_part} node(s), "
                f"{cost.cpu:.1f} CPU-s, {cost.storage_requests} storage and {sum(cost.luigid.values())} luigid "
                f"requests, {cost.delivered} messages delivered ({cost.watched} under the prefix)")
            self.costs.append(cost)
        if count >= self.args.busy_from:
            log(f"  {self.args.busy_pipelines} wide graphs at once")
            busy = self.busy(nodes)
            log(f"    {busy.makespan:.1f}s, {busy.luigid_requests} luigid requests, {busy.luigid_cpu:.1f} luigid "
                f"CPU-s, p99 {busy.percentile(0.99) * 1000:.0f} ms")
            self.busies.append(busy)
        idle.subscriptions_left = self.stop(nodes)
        self.idles.append(idle)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/fleet.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 1, 3, short idle window, narrower graph (~2 min); "
                                                             "writes no file unless --markdown is given")
    parser.add_argument("--markdown", type=Path, help="write the tables here (default: the Fleet scale section of "
                                                      "benchmarks/README.md; with --quick: nowhere)")
    parser.add_argument("--nodes", type=lambda text: [int(n) for n in text.split(",") if n.strip()],
                        help="N, node processes per round (default 1,3,10,30,60; quick 1,3)")
    parser.add_argument("--idle-seconds", type=float, help="idle window per round (default 60, a heartbeat interval; "
                                                         "quick 5)")
    parser.add_argument("--repeat", type=int, help="runs of the one-task pipeline (a) per N, and of the wide graph "
                                                   "(b) on 3 nodes; medians reported (default 3; quick 1)")
    parser.add_argument("--parts", type=int, help="tasks of the wide graph (b) (default 30; quick 6)")
    parser.add_argument("--busy-pipelines", type=int, help="wide graphs uploaded at once in (c) (default 10; quick 2)")
    parser.add_argument("--busy-from", type=int, help="the smallest N that runs (c) (default 10; quick 3)")
    parser.add_argument("--seconds", type=float, default=1.0, help="how long each of its tasks takes (default 1)")
    parser.add_argument("--pipeline-timeout", type=float, default=900.0,
                        help="seconds before a pipeline gives up (default 900)")
    parser.add_argument("--wheelhouse", type=Path,
                        default=Path(os.environ.get("POLTERGUST_TEST_WHEELHOUSE", ROOT / ".wheelhouse")),
                        help="wheels the pipelines' environment installs luigi from (default: .wheelhouse)")
    parser.add_argument("--workdir", type=Path, help="keep everything here instead of a temporary directory")
    args = parser.parse_args(argv)
    for name, full, quick in (("nodes", [1, 3, 10, 30, 60], [1, 3]), ("idle_seconds", 60.0, 5.0), ("parts", 30, 6),
                              ("repeat", 3, 1), ("busy_pipelines", 10, 2), ("busy_from", 10, 3)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not any(args.wheelhouse.glob("luigi-*.whl")):
        raise SystemExit(f"no luigi wheel in {args.wheelhouse}: run `bash tests/run.sh` (or pip download luigi) first")
    args.wheelhouse = args.wheelhouse.resolve()

    def measure(root: Path, command: str) -> str:
        started = time.monotonic()
        fleet = Fleet(args, root)
        fleet.warm_up()
        for count in args.nodes:
            fleet.round(count)
        fleet.load.append(os.getloadavg()[0])
        return render(fleet.costs, fleet.idles, fleet.busies, args, command, time.monotonic() - started, fleet.load)

    return run_benchmark("fleet.py", args, argv, measure, readme=README, heading=HEADING, prefix="poltergust-fleet-")


if __name__ == "__main__":
    entry(main)
