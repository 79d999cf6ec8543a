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
