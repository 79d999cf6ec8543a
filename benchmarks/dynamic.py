#!/usr/bin/env python3
"""Tasks yielded from run() spread over nodes: a Dynamic pipeline on one node and on three.

    python benchmarks/dynamic.py                                # 3 rounds; writes its section of benchmarks/README.md
    python benchmarks/dynamic.py --quick --markdown /tmp/d.md   # 1 round, 4 tasks of 0.5 s, testpipes only

A task that yields its requirements from run() is the only one to schedule
them, so only its worker would run them; nodes that join a pipeline run luigi
as assistants (kept to that pipeline by `poltergust.luigid`), which take them.
Two pipelines:

- `poltergust_testpipes.Dynamic`: yields 20 one-second tasks, nothing else;
- luigi's own `examples.dynamic_requirements.Dynamic` (from luigi's source
  distribution in .sdists, see tests/run.sh; left out without it), with a seed
  whose `Configuration` (5 s) names 20 one-second `Data` tasks.

Each runs as a plain luigi process (`--workers 1`, and `--workers 3` for
reference), on one node, and on three nodes; rounds alternate. All on this
machine: one luigid, two local pipeline directories (one watched by one node,
the other by three), one environment built before measuring.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))  # the harness: the tests' luigid starter, luigi's examples as a wheel

from _main import entry, log, run_benchmark  # noqa: E402
from _procs import register  # noqa: E402
from _systems import OurNode, clean_environ  # noqa: E402
from harness import Luigid, luigi_examples, wait_for  # noqa: E402

README = HERE / "README.md"
SECTION = "## Dynamic requirements over nodes"
DATA_DONE = re.compile(r"\bdone\s+Data\(")
SYSTEMS = ("plain luigi, --workers 1", "plain luigi, --workers 3", "1 node", "3 nodes")


@dataclass
class Pipeline:
    label: str
    module: str
    task: str
    tasks: int
    """Tasks yielded from run(), one `seconds` each."""
    seconds: float
    seeds: list[int] = field(default_factory=list)
    """luigi's example: seeds whose Configuration names `tasks` Data tasks, one per run."""

    @property
    def luigis(self) -> bool:
        return self.module.startswith("examples.")

    def arguments(self, out: Path) -> tuple[dict[str, str], dict[str, str]]:
        """(task arguments, variables) of one run writing under `out`."""
        if self.luigis:
            return {"seed": str(self.seeds.pop())}, {luigi_examples.ROOT_VARIABLE: str(out)}
        return {"out-dir": str(out), "parts": str(self.tasks), "seconds": str(self.seconds)}, {}

    def per_node(self, out: Path, logs: list[Path]) -> Counter:
        """How many of the yielded tasks each node ran (by its run log's directory, or its outputs)."""
        if not self.luigis:
            return Counter(path.read_text() for path in out.glob("part-*.txt"))
        found = len(list((out / "tmp").glob("Data_*.txt")))
        if found != self.tasks:
            raise RuntimeError(f"{self.label}: {found} Data outputs, expected {self.tasks}")
        return Counter({path.parts[-3]: len(DATA_DONE.findall(path.read_text())) for path in logs})


def seeds_naming(count: int, wanted: int) -> list[int]:
    """Seeds for which luigi's Configuration names `count` Data tasks (its first draw is the count)."""
    return [seed for seed in range(1, 10_000) if random.Random(seed).randint(7, 25) == count][:wanted]


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.luigid = Luigid(root / "luigid")
        register(self.luigid.stop)
        wheels = root / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "--wheel-dir", str(wheels), str(ROOT / "tests" / "testpipes")], check=True, cwd=root)
        self.pipelines = [Pipeline(f"poltergust_testpipes.Dynamic: {args.tasks} tasks of {args.seconds:g} s",
                                   "poltergust_testpipes", "Dynamic", args.tasks, args.seconds)]
        dependencies = ["luigi", "poltergust-testpipes"]
        sdist = luigi_examples.find_sdist()
        if args.quick:
            self.skipped = "luigi's own example: left out in quick mode"
        elif sdist is None:
            self.skipped = "luigi's own example: " + luigi_examples.missing_sdist_message()
        else:
            self.skipped = ""
            luigi_examples.build_wheel(sdist, root / "examples")
            dependencies.append("luigi-examples")
            self.pipelines.append(Pipeline(
                "luigi's examples.dynamic_requirements.Dynamic: 5 s Configuration, then 20 one-second Data",
                "examples.dynamic_requirements", "Dynamic", 20, 1.0,
                seeds_naming(20, len(SYSTEMS) * args.rounds + 1)))
        links = [args.wheelhouse, wheels] + ([root / "examples" / "wheels"] if "luigi-examples" in dependencies else [])
        self.environment = ("dependencies:\n  - --no-index\n" + "".join(f"  - --find-links {link}\n" for link in links)
                            + "".join(f"  - {name}\n" for name in dependencies))
        self.sets = {count: self._start_nodes(count) for count in (1, 3)}
        self.samples: dict[tuple[str, str], list[tuple[float, Counter]]] = {}
        self.python: Path | None = None
        self._names = 0

    def _start_nodes(self, count: int) -> tuple[Path, list[OurNode]]:
        pipeline = self.root / f"fleet-{count}" / "pipeline"
        pipeline.mkdir(parents=True)
        (pipeline.parent / "environment").mkdir()
        (pipeline.parent / "environment" / "env.yaml").write_text(self.environment)
        nodes = []
        for index in range(count):
            name = f"n{count}-{'abc'[index]}"
            nodes.append(OurNode.launch(name, self.root / "logs", path=str(pipeline), scheduler_url=self.luigid.url,
                                        env_dir=self.root / "environments", data_dir=self.root / "nodes" / name,
                                        env=clean_environ(), wait=False))
        for node in nodes:
            wait_for(node.ready, 90, f"{node.node_name} to be ready")
        return pipeline, nodes

    def _name(self) -> str:
        self._names += 1
        return f"dyn-{self._names:03d}"

    def on_nodes(self, count: int, pipeline: Pipeline) -> tuple[float, Counter]:
        directory, nodes = self.sets[count]
        name = self._name()
        out = self.root / "out" / name
        arguments, variables = pipeline.arguments(out)
        config = {"environment": "../environment/env.yaml", "variables": variables,
                  "task": {"name": pipeline.task, "module": pipeline.module, **arguments}}
        staged = directory.parent / f"{name}.staged"
        staged.write_text(json.dumps(config))  # JSON is YAML
        started = time.monotonic()
        os.replace(staged, directory / f"{name}.config.yaml")
        outcome = wait_for(lambda: next((o for o in ("done", "error")
                                         if (directory / f"{name}.{o}.yaml").exists()), None),
                           600, f"{name}'s result", interval=0.02)
        elapsed = time.monotonic() - started
        if outcome != "done":
            raise RuntimeError(f"{name} ended as {outcome}: {(directory / f'{name}.{outcome}.yaml').read_text()}")
        logs = [path for node in nodes for path in (self.root / "nodes" / node.node_name / "logs").glob(f"{name}.*")]
        return elapsed, pipeline.per_node(out, logs)

    def plain(self, workers: int, pipeline: Pipeline) -> tuple[float, Counter]:
        assert self.python is not None
        name = self._name()
        out = self.root / "out" / name
        out.mkdir(parents=True)
        arguments, variables = pipeline.arguments(out)
        command = [str(self.python), "-m", "luigi", "--module", pipeline.module, pipeline.task,
                   *[part for key, value in arguments.items() for part in (f"--{key}", value)],
                   "--scheduler-url", self.luigid.url, "--no-lock", "--workers", str(workers)]
        started = time.monotonic()
        with (self.root / "logs" / f"{name}.log").open("wb") as output:
            subprocess.run(command, check=True, stdout=output, stderr=subprocess.STDOUT, cwd=out,
                           env=clean_environ(**variables), timeout=600)
        elapsed = time.monotonic() - started
        ran = pipeline.per_node(out, [self.root / "logs" / f"{name}.log"])
        return elapsed, Counter({"one process": sum(ran.values())})

    def warm_up(self) -> None:
        """Build the environment and start each node's luigi once, outside the measurements."""
        warm = Pipeline("warm-up", "poltergust_testpipes", "Dynamic", 1, 0.0)
        for count in (1, 3):
            self.on_nodes(count, warm)
        built = [p for p in (self.root / "environments").iterdir() if (p / "pyvenv.cfg").exists()]
        self.python = built[0] / "bin" / "python"

    def measure(self) -> None:
        for round_ in range(self.args.rounds):
            for pipeline in self.pipelines:
                for system in SYSTEMS:
                    if system == SYSTEMS[1] and self.args.quick:
                        continue
                    if system.startswith("plain"):
                        sample = self.plain(int(system[-1]), pipeline)
                    else:
                        sample = self.on_nodes(int(system[0]), pipeline)
                    self.samples.setdefault((pipeline.label, system), []).append(sample)
                    log(f"round {round_ + 1}: {pipeline.label[:30]}, {system}: {sample[0]:.1f}s "
                        f"{dict(sample[1])}")


def render(bench: Bench, command: str, took: float, load: tuple[float, float]) -> str:
    args = bench.args
    lines = [
        SECTION, "",
        f"Written by `{command}` — {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"took {took / 60:.1f} min.",
        "",
        f"Machine: nproc {os.cpu_count()}; Python {platform.python_version()}; luigi "
        f"{luigi_examples.luigi_version()}; load average (1 min) at start / end {load[0]:.1f} / {load[1]:.1f}.",
        "",
        "Seconds from writing the config to its result file (nodes), or from spawning luigi to its exit (plain); "
        f"median and range over {args.rounds} round(s). Tasks per node: how many of the yielded tasks each node "
        "ran, in the median round.",
        "",
        "| pipeline | run on | n | median (s) | min–max (s) | one node / this | yielded tasks per node |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for pipeline in bench.pipelines:
        one_node = statistics.median(t for t, _ in bench.samples[(pipeline.label, "1 node")])
        for system in SYSTEMS:
            samples = bench.samples.get((pipeline.label, system))
            if not samples:
                continue
            times = [t for t, _ in samples]
            median = statistics.median(times)
            spread = sorted(samples, key=lambda sample: sample[0])[len(samples) // 2][1]
            per_node = " + ".join(str(n) for _, n in sorted(spread.items(), key=lambda item: -item[1]))
            lines.append(f"| {pipeline.label} | {system} | {len(times)} | {median:.1f} | {min(times):.1f}–"
                         f"{max(times):.1f} | {one_node / median:.2f}× | {per_node} |")
    if bench.skipped:
        lines += ["", f"Not measured: {bench.skipped}."]
    lines += [
        "",
        "How it goes: the node that wins the start marker runs luigi; the task yields its tasks; at its next look "
        "at luigid (once a second) the node sees tasks waiting that nobody runs and calls for help (again after "
        "2 s, doubling, while tasks still wait); standing-by nodes take a helper place each and run luigi as "
        "`--assistant`, which takes tasks that a worker of the same pipeline scheduled.",
        "",
        f"Floors: the yielded work is {args.tasks * args.seconds:g} s on one worker and "
        f"{args.tasks * args.seconds / 3:.1f} s on three; luigi's example adds its 5 s "
        "Configuration, which no number of nodes shortens. Every run also pays luigi's start (about 0.5 s, more "
        "under load), and on three nodes the wait for help: a helper hears the call, starts luigi and schedules "
        "the root task again, which makes luigid forget the root's yielded requirements (luigid resets a task's "
        "dependencies to those its scheduling worker sends), so a helper's first task is often the root's "
        "`run()` once more, yielding them again (cheap here: the outputs exist or are pending).",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/dynamic.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, 4 tasks of 0.5 s, testpipes only; "
                                                             "writes no file unless --markdown is given")
    parser.add_argument("--markdown", type=Path, help="where to write the table (default: its section of "
                                                      "benchmarks/README.md; with --quick: nowhere)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; quick 1)")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary directory)")
    parser.add_argument("--wheelhouse", type=Path,
                        default=Path(os.environ.get("POLTERGUST_TEST_WHEELHOUSE", ROOT / ".wheelhouse")),
                        help="wheels for the pipelines' environment (default: .wheelhouse, as the tests)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.tasks, args.seconds = (4, 0.5) if args.quick else (20, 1.0)
    args.wheelhouse = args.wheelhouse.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not any(args.wheelhouse.glob("luigi-*.whl")):
        raise SystemExit(f"no luigi wheel in {args.wheelhouse}: run tests/run.sh's set-up, or pass --wheelhouse")

    def measure(root: Path, command: str) -> str:
        started, load = time.monotonic(), os.getloadavg()[0]
        bench = Bench(args, root)
        bench.warm_up()
        bench.measure()
        return render(bench, command, time.monotonic() - started, (load, os.getloadavg()[0]))

    return run_benchmark("dynamic.py", args, argv, measure, readme=README, heading=SECTION,
                         prefix="poltergust-dynamic-")


if __name__ == "__main__":
    entry(main)
