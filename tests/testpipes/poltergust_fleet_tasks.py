"""Tasks showing luigi's fleet features on several nodes: resources, priorities, retries, batches, workers.

Each task records where and when it ran (node, pid, start and end times) in
its output, or appends an attempt line to a file the nodes share, so that a
test can check what overlapped, in which order, and how often.
"""
import json
import os
import time

import luigi


class _Timed(luigi.Task):
    out_dir = luigi.Parameter()
    seconds = luigi.FloatParameter(default=1.0)

    def _run_timed(self, **extra):
        start = time.time()
        time.sleep(self.seconds)
        record = {"node": os.environ.get("POLTERGUST_NODE", "?"), "pid": os.getpid(), "start": start,
                  "end": time.time(), **extra}
        with self.output().open("w") as handle:
            json.dump(record, handle)

    def run(self):
        self._run_timed()


class Warehouse(_Timed):
    """Needs one unit of the `acc_db` resource, which luigid's [resources] limits across the fleet."""

    index = luigi.IntParameter()
    resources = {"acc_db": 1}

    def output(self):
        return luigi.LocalTarget(os.path.join(self.out_dir, f"warehouse-{self.index}.json"))


class Warehouses(luigi.WrapperTask):
    out_dir = luigi.Parameter()
    count = luigi.IntParameter(default=6)
    seconds = luigi.FloatParameter(default=1.0)

    def requires(self):
        return [Warehouse(out_dir=self.out_dir, index=i, seconds=self.seconds) for i in range(self.count)]


class Ranked(_Timed):
    """A task of priority `rank`; all of them share one `serial` unit, so they run one at a time."""

    rank = luigi.IntParameter()
    after = luigi.IntParameter(default=-1)
    """Another Ranked's rank this one needs first (that one then runs at this one's priority, if higher)."""
    resources = {"serial": 1}

    @property
    def priority(self):
        return self.rank

    def requires(self):
        return [Ranked(out_dir=self.out_dir, rank=self.after, seconds=self.seconds)] if self.after >= 0 else []

    def output(self):
        return luigi.LocalTarget(os.path.join(self.out_dir, f"ranked-{self.rank}.json"))


class Priorities(luigi.WrapperTask):
    """Ranked tasks of priorities 20, 40, 60, 80 and one of 100 that needs one of priority 0 first."""

    out_dir = luigi.Parameter()
    seconds = luigi.FloatParameter(default=0.5)

    def requires(self):
        ranked = [Ranked(out_dir=self.out_dir, rank=rank, seconds=self.seconds) for rank in (40, 20, 80, 60)]
        return ranked + [Ranked(out_dir=self.out_dir, rank=100, after=0, seconds=self.seconds)]


def _attempt(out_dir, name):
    """Append this attempt to `name`'s file (O_APPEND: the nodes share it); return how many came before."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"attempts-{name}.log")
    with open(path, "a") as handle:
        handle.write(os.environ.get("POLTERGUST_NODE", "?") + "\n")
    with open(path) as handle:
        return len(handle.read().splitlines()) - 1


class FailsTwice(luigi.Task):
    """Fails on its first two attempts, then succeeds: luigid's [scheduler] retry_count lets it."""

    out_dir = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.out_dir, "fails-twice.txt"))

    def run(self):
        before = _attempt(self.out_dir, "fails-twice")
        if before < 2:
            raise RuntimeError(f"attempt {before + 1} fails on purpose")
        with self.output().open("w") as handle:
            handle.write(os.environ.get("POLTERGUST_NODE", "?"))


class KeepsFailing(luigi.Task):
    """Fails every time; after `retry_count` failures luigid disables it."""

    out_dir = luigi.Parameter()
    retry_count = 2  # its own retry policy, below luigid's [scheduler] retry_count

    def output(self):
        return luigi.LocalTarget(os.path.join(self.out_dir, "keeps-failing.txt"))

    def run(self):
        before = _attempt(self.out_dir, "keeps-failing")
        raise RuntimeError(f"attempt {before + 1} fails on purpose, as always")


class Retries(luigi.WrapperTask):
    out_dir = luigi.Parameter()
    failing = luigi.BoolParameter(default=False)

    def requires(self):
        return [FailsTwice(out_dir=self.out_dir)] + ([KeepsFailing(out_dir=self.out_dir)] if self.failing else [])


class Loaded(luigi.Task):
    """A batch task: pending Loaded tasks run as one, with their days joined by commas."""

    out_dir = luigi.Parameter()
    day = luigi.Parameter(batch_method=",".join)

    def output(self):
        return [luigi.LocalTarget(os.path.join(self.out_dir, f"loaded-{day}.txt")) for day in self.day.split(",")]

    def run(self):
        _attempt(self.out_dir, "loaded")
        for target in self.output():
            with target.open("w") as handle:
                handle.write(self.day)


class Load(luigi.WrapperTask):
    out_dir = luigi.Parameter()
    days = luigi.IntParameter(default=6)

    def requires(self):
        return [Loaded(out_dir=self.out_dir, day=f"day{day}") for day in range(self.days)]


class Slow(_Timed):
    index = luigi.IntParameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.out_dir, f"slow-{self.index}.json"))

    def run(self):
        self._run_timed(workers=luigi.interface.core().workers)


class Slows(luigi.WrapperTask):
    out_dir = luigi.Parameter()
    count = luigi.IntParameter(default=3)
    seconds = luigi.FloatParameter(default=3.0)

    def requires(self):
        return [Slow(out_dir=self.out_dir, index=i, seconds=self.seconds) for i in range(self.count)]
