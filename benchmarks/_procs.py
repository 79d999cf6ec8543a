"""Child processes of the benchmark, and what /proc says about them.

Every process the benchmark starts runs in its own session, with its output in
a log file, and is registered so that `stop_all()` ends it together with
everything it started in turn, also after Ctrl-C or a failure.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_STOPPERS: list[Callable[[], object]] = []


def register(stop: Callable[[], object]) -> None:
    """Have `stop_all()` call `stop` (for servers started by other helpers)."""
    _STOPPERS.append(stop)


def stop_all() -> None:
    """Stop everything registered, newest first, then any child process left; never raises."""
    while _STOPPERS:
        stop = _STOPPERS.pop()
        try:
            stop()
        except Exception as exc:  # noqa: BLE001 -- cleanup must go on
            print(f"cleanup: {exc}", flush=True)
    _stop_strays()


def _stop_strays(grace: float = 5.0) -> None:
    """Children of this process that nothing registered (a server interrupted while it started, say)."""
    strays = descendants(os.getpid())
    if not strays:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in strays:
            _kill_group(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_running(pid) for pid in strays):
            time.sleep(0.1)
    for pid in strays:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


# -- /proc -------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from the state on (field 3 is index 0)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _running(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def machine_cpu() -> float:
    """CPU seconds the whole machine has been busy since boot (all cores), from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and all its descendants, including children that already exited.

    utime+stime+cutime+cstime of the process and of each live descendant: a
    child's time moves into its parent's cutime/cstime when it is reaped, so
    nothing is counted twice and nothing that ran is lost.
    """
    total = 0
    for member in [pid, *descendants(pid)]:
        fields = _stat_fields(member)
        if fields is not None:
            total += sum(int(value) for value in fields[11:15])
    return total / CLK_TCK


def rss(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[21]) * PAGE_SIZE if fields is not None else 0


def tree_rss(pid: int) -> tuple[int, int, list[int]]:
    """RSS of the process, RSS summed over it and its descendants, and the descendants."""
    members = descendants(pid)
    own = rss(pid)
    return own, own + sum(rss(member) for member in members), members


def pss(pid: int) -> int:
    """Proportional set size: resident pages, each shared one divided among the processes sharing it."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def tree_pss(pid: int) -> int:
    """PSS summed over a process and its descendants: the memory they use together."""
    return sum(pss(member) for member in [pid, *descendants(pid)])


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


# -- processes ---------------------------------------------------------------

class Proc:
    """A child process in a session of its own, output in `log_path`.

    With `pipe=True` its output goes through a pipe that a thread copies to the
    log (some programs behave differently when their stdout is a file).
    """

    def __init__(self, name: str, command: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None, pipe: bool = False) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self._drain: threading.Thread | None = None
        self._stopped = False
        self.process = subprocess.Popen(
            list(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if pipe else self._log,
            stderr=subprocess.STDOUT, env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
        )
        if pipe:
            self._drain = threading.Thread(target=self._copy, daemon=True, name=f"log of {name}")
            self._drain.start()
        register(self.stop)

    @property
    def pid(self) -> int:
        return self.process.pid

    def _copy(self) -> None:
        assert self.process.stdout is not None
        for chunk in iter(lambda: self.process.stdout.read1(1 << 16), b""):  # type: ignore[union-attr]
            self._log.write(chunk)
            self._log.flush()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.output()[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}; end of {self.log_path}:\n{tail}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the session, SIGKILL what is left after `timeout`, then any stray descendant."""
        if self._stopped:
            return
        self._stopped = True
        if self.stop in _STOPPERS:
            _STOPPERS.remove(self.stop)
        family = descendants(self.pid) if self.process.poll() is None else []
        if self.process.poll() is None:
            _kill_group(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        family += descendants(self.pid) if self.process.poll() is None else []
        _kill_group(self.pid, signal.SIGKILL)
        kill_all(family)
        if self.process.poll() is None:
            self.process.wait(5)
        if self._drain is not None:
            self._drain.join(5)
        if not self._log.closed:
            self._log.close()


def kill_all(pids: Sequence[int]) -> None:
    """SIGKILL each process and its group: children that moved to sessions of their own."""
    for member in pids:
        _kill_group(member, signal.SIGKILL)
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_group(pid: int, sig: int) -> None:
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
