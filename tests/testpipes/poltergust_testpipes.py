"""Small luigi pipelines the tests run on real nodes.

Each task writes the name of the node that ran it (POLTERGUST_NODE) into its
output, so tests can tell which node did what.
"""
import json
import os
import random
import sys
import threading
import time

import luigi

AT_IMPORT = os.environ.get("TESTPIPES_AT_IMPORT", "")
"""A variable read when the module is imported: preloading it in a warm interpreter fixes the value."""
if os.environ.get("TESTPIPES_START_THREAD"):  # a module that starts a thread at import (warm interpreters refuse it)
    threading.Thread(target=time.sleep, args=(3600,), name="testpipes-sleeper", daemon=True).start()


def _node() -> str:
    return os.environ.get("POLTERGUST_NODE", "?")


class _Output(luigi.Task):
    out_dir = luigi.Parameter()

    def _write(self, text: str) -> None:
        with self.output().open("w") as handle:
            handle.write(text)


class Touch(_Output):
    """One task that writes its node's name, and an optional variable's value."""

    variable = luigi.Parameter(default="")

    def output(self):
        return luigi.LocalTarget(os.path.join(self.out_dir, "touch.txt"))

    def run(self):
        value = os.environ.get(self.variable, "") if self.variable else ""
        self._write(f"{_node()}\n{value}\n")


class Part(_Output):
    index = luigi.IntParameter()
    seconds = luigi.FloatParameter(default=1.0)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.out_dir, f"part-{self.index}.txt"))

    def run(self):
        time.sleep(self.seconds)
        self._write(_node())


class Fan(_Output):
    """A root task over several independent parts, so several nodes share the work."""

    parts = luigi.IntParameter(default=4)
    seconds = luigi.FloatParameter(default=1.0)

    def requires(self):
        return [Part(out_dir=self.out_dir, index=i, seconds=self.seconds) for i in range(self.parts)]

    def output(self):
        return luigi.LocalTarget(os.path.join(self.out_dir, "fan.txt"))

    def run(self):
        nodes = sorted({target.open().read() for target in self.input()})
        self._write(" ".join(nodes))


class Dynamic(_Output):
    """Yields its parts from run(), as luigi's dynamic_requirements example does: only its worker scheduled them."""

    parts = luigi.IntParameter(default=20)
    seconds = luigi.FloatParameter(default=1.0)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.out_dir, "dynamic.txt"))

    def run(self):
        parts = yield [Part(out_dir=self.out_dir, index=i, seconds=self.seconds) for i in range(self.parts)]
        self._write(" ".join(sorted({target.open().read() for target in parts})))


class Fail(_Output):
    def output(self):
        return luigi.LocalTarget(os.path.join(self.out_dir, "never.txt"))

    def run(self):
        raise RuntimeError("this task fails on purpose")


class Input(luigi.ExternalTask):
    """Data another system writes: luigi only checks that it is there."""

    path = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(self.path)


class NeedsInput(_Output):
    """Needs `input.txt`, written by nobody in the pipeline, and a task that can run meanwhile."""

    def requires(self):
        return [Input(path=os.path.join(self.out_dir, "input.txt")), Touch(out_dir=self.out_dir)]

    def output(self):
        return luigi.LocalTarget(os.path.join(self.out_dir, "used.txt"))

    def run(self):
        self._write(_node())


class Undecidable(luigi.Task):
    def complete(self):
        raise ValueError("the catalogue cannot be reached")


class NeedsUndecidable(_Output):
    def requires(self):
        return Undecidable()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.out_dir, "decided.txt"))

    def run(self):
        self._write(_node())


class Sleep(_Output):
    """Marks that it started, then sleeps: for cancellation and shutdown tests."""

    seconds = luigi.FloatParameter(default=60.0)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.out_dir, "slept.txt"))

    def run(self):
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"started-{_node()}-{os.getpid()}"), "w"):
            pass
        time.sleep(self.seconds)
        self._write(_node())


class Flaky(_Output):
    """Fails on its first run and succeeds on the next: for the `retries` key."""

    def output(self):
        return luigi.LocalTarget(os.path.join(self.out_dir, "flaky.txt"))

    def run(self):
        os.makedirs(self.out_dir, exist_ok=True)
        marker = os.path.join(self.out_dir, "failed-once")
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("failing the first time on purpose")
        self._write(_node())


class Chatty(_Output):
    """Prints a numbered line every `interval` seconds for `seconds`: a log that grows while it runs."""

    seconds = luigi.FloatParameter(default=60.0)
    interval = luigi.FloatParameter(default=0.5)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.out_dir, "chatty.txt"))

    def run(self):
        for line in range(int(self.seconds / self.interval)):
            print(f"chatty line {line}", flush=True)
            time.sleep(self.interval)
        self._write(_node())


class Dump(_Output):
    """Prints its whole environment and a file's content (as if fetched from elsewhere), then fails."""

    leak = luigi.Parameter(default="")

    def output(self):
        return luigi.LocalTarget(os.path.join(self.out_dir, "never.txt"))

    def run(self):
        for name, value in sorted(os.environ.items()):
            print(f"env {name}={value}", flush=True)
        with open("/proc/self/environ", "rb") as handle:  # what the process started with (a warm one: inherited)
            for entry in filter(None, handle.read().split(b"\0")):
                print(f"initial env {entry.decode(errors='replace')}", flush=True)
        if self.leak:
            with open(self.leak) as handle:
                secret = handle.read().strip()
            from urllib.parse import quote

            print(f"leaked {secret} and {quote(secret, safe='')}", flush=True)
        raise RuntimeError("dumped the environment")


class Plant(_Output):
    """Tries to write a file where it should not be able to (under --run-as)."""

    target = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(self.target)

    def run(self):
        with open(self.target, "w") as handle:
            handle.write("planted")
class Report(_Output):
    """Writes what its process sees (ids, variables, luigi's configuration, a random number) as JSON."""

    variable = luigi.Parameter(default="")
    setting = luigi.Parameter(default="")
    """Usually left to luigi's configuration ([Report] setting=...), to show which configuration was read."""

    def output(self):
        return luigi.LocalTarget(os.path.join(self.out_dir, "report.json"))

    def run(self):
        self._write(json.dumps({
            "node": _node(), "pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0), "cwd": os.getcwd(),
            "python": "%d.%d" % sys.version_info[:2], "random": random.random(), "setting": self.setting,
            "value": os.environ.get(self.variable) if self.variable else None, "at_import": AT_IMPORT,
            "threads": threading.active_count(),
        }))


class Intrude(_Output):
    """What a hostile pipeline tries under --run-as (tests/test_sandbox.py); writes what it reached as JSON.

    It leaves a daemon behind (its own session, double-forked) holding a lock on `out-dir/daemon.lock`; it
    opens every other process's working directory and environment, lists and opens `env-dir/.locks`, and
    writes a .pth file into every cached environment and a file into the cache itself.
    """

    env_dir = luigi.Parameter()
    secret = luigi.Parameter(default="")
    """A value that must not be found in any process's environment."""

    def output(self):
        return luigi.LocalTarget(os.path.join(self.out_dir, "intrude.json"))

    def run(self):
        import fcntl
        import glob

        os.makedirs(self.out_dir, exist_ok=True)
        found = {"uid": os.getuid(), "pid": os.getpid(), "cwds": [], "environ": [], "secret": [], "wrote": [],
                 "locks": None, "signalled": []}
        if os.fork() == 0:  # the daemon: its own session, its parent gone, the lock held for as long as it lives
            os.setsid()
            if os.fork() == 0:
                lock = os.open(os.path.join(self.out_dir, "daemon.lock"), os.O_RDWR | os.O_CREAT, 0o666)
                fcntl.flock(lock, fcntl.LOCK_EX)
                with open(os.path.join(self.out_dir, "daemon.started"), "w"):
                    pass
                while True:
                    time.sleep(1)
            os._exit(0)
        while not os.path.exists(os.path.join(self.out_dir, "daemon.started")):
            time.sleep(0.05)
        for pid in (p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
            try:
                found["cwds"].append([pid, os.readlink(f"/proc/{pid}/cwd"), os.listdir(f"/proc/{pid}/cwd/")])
            except OSError:
                pass
            try:
                with open(f"/proc/{pid}/environ", "rb") as handle:
                    environ = handle.read()
                found["environ"].append(pid)
                if self.secret and self.secret.encode() in environ:
                    found["secret"].append(pid)
            except OSError:
                pass
            try:
                os.kill(int(pid), 0)
                found["signalled"].append(pid)
            except OSError:
                pass
        try:
            found["locks"] = os.listdir(os.path.join(self.env_dir, ".locks"))
            for name in found["locks"]:
                fcntl.flock(os.open(os.path.join(self.env_dir, ".locks", name), os.O_RDONLY), fcntl.LOCK_SH)
        except OSError as exc:
            found["locks_error"] = str(exc)
        targets = [os.path.join(self.env_dir, "planted.txt")]
        targets += [os.path.join(site, "intruder.pth") for site in glob.glob(f"{self.env_dir}/*/lib/*/site-packages")]
        for target in targets:
            try:
                with open(target, "w") as handle:
                    handle.write("import os; os.environ['INTRUDED'] = '1'\n")
                found["wrote"].append(target)
            except OSError:
                pass
        self._write(json.dumps(found))


class Token(_Output):
    """Asks the metadata server its environment names (GCE_METADATA_HOST) for a token, as client libraries do."""

    def output(self):
        return luigi.LocalTarget(os.path.join(self.out_dir, "token.json"))

    def run(self):
        import urllib.request

        host = os.environ.get("GCE_METADATA_HOST", "metadata.google.internal")
        seen = {"host": host, "ip": os.environ.get("GCE_METADATA_IP")}
        for key, path in (("token", "instance/service-accounts/default/token"),
                          ("email", "instance/service-accounts/default/email"), ("project", "project/project-id")):
            request = urllib.request.Request(f"http://{host}/computeMetadata/v1/{path}",
                                             headers={"Metadata-Flavor": "Google"})
            with urllib.request.urlopen(request, timeout=10) as response:
                seen[key] = response.read().decode()
        print(f"got token {json.loads(seen['token'])['access_token']}", flush=True)
        self._write(json.dumps(seen))
