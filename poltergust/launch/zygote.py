"""A warm interpreter: luigi imported once, one forked child per luigi run.

A node starts it as `ENV/bin/python zygote.py FD [--end-leftovers] [MODULE ...]`
in a pipeline's environment, so it uses the standard library only and runs on
every Python an environment may use (3.8 and later). It imports luigi and the
MODULEs (an environment's `preload:`), refuses to serve if that left a thread
running (forking a threaded process can deadlock the child), makes itself
non-dumpable (runs, which may share its user, can neither trace it nor reach
its descriptors through /proc) and serves until its standard input, a pipe
from the node, is closed.

There is no socket in the filesystem: FD is one end of a socketpair the node
made (SOCK_SEQPACKET), inherited at start, and no run holds it. Per run, the
node sends on it one message `run` carrying three descriptors: a stream socket
(the run's connection to the zygote), a second one (the child's own report) and
the write end of the run's output pipe. On the connection it then sends a
4-byte big-endian length and a JSON object `{"argv": [...], "env": {...},
"cwd": "...", "luigi": {...}}` (`luigi`, the fast start of `zygote_run`,
optional), checked before use: anything else gets `{"error": ...}`, and the
zygote serves on. The zygote forks and sends `{"pid": N}`; the child starts its
own session, closes the connection, becomes dumpable, restores a fresh
interpreter's signal handlers, takes the run's environment (all of it), working
directory and output, resets luigi's configuration, reseeds `random` and runs
luigi as `python -m luigi ARGV` would, sending `{"exit": CODE}` on its report
socket just before exiting. The zygote reaps it and sends `{"status": CODE}`
(negative: killed by that signal) on the connection, which the node trusts
first (the child's own report counts only if the zygote died meanwhile; a run
cannot write on the zygote's connection). When the node shuts the connection
for writing (or closes it), the run is stopped: SIGTERM to its process group,
SIGKILL after a grace period.

With `--end-leftovers` (the node starts it so only in a PID namespace of its
own, as a user of its own serving one run at a time), once no run is left
every other process in the namespace is killed: nothing a run started (a
daemon that left its session, say) outlives it.

When the node is gone (standard input or FD closed) or on SIGTERM, the zygote
stops its children's process groups (SIGTERM, then SIGKILL after a grace
period) and exits: no run outlives its node.
"""
import contextlib
import gc
import importlib
import importlib.util
import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback

READY = "poltergust-zygote-ready"
REFUSED = "poltergust-zygote-refused"
GRACE_SECONDS = 5.0
MAX_REQUEST = 8 << 20
END_LEFTOVERS = "--end-leftovers"


def _sibling(name):
    """A standard-library module beside this file, loaded by path (this directory is not on sys.path)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
    spec = importlib.util.spec_from_file_location("_poltergust_" + name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]  # the file is beside this one
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


RUN = _sibling("zygote_run")


def main(argv):
    fresh_handlers = _signal_handlers()  # what a fresh interpreter has, restored in every child
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:
        del sys.path[0]  # the directory of this file is not the pipeline's to import from
    control, preload = int(argv[0]), argv[1:]
    end_leftovers = preload[:1] == [END_LEFTOVERS]
    preload = preload[1:] if end_leftovers else preload
    boot_config_path = os.environ.get("LUIGI_CONFIG_PATH")
    for name in ["luigi", "luigi.cmdline", "luigi.configuration"] + preload:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # noqa: BLE001 -- whatever a module raises, the node must hear why
            _refuse("cannot import {}: {}: {}".format(name, type(exc).__name__, exc))
    threads = _extra_threads()
    if threads:
        _refuse("importing {} left {} running; a process with threads cannot be forked safely".format(
            ", ".join(preload) or "luigi", threads))
    parsers = _config_parsers()
    if parsers is None:
        _refuse("this luigi's configuration cannot be reset between runs")
    pristine = {cls: [p for p in cls._config_paths if p != boot_config_path] for cls in parsers}
    _set_dumpable(False)  # pipelines running as this user cannot trace or rewrite it to reach later runs
    gc.collect()
    if hasattr(gc, "freeze"):
        gc.freeze()  # keeps the collector from touching (and so copying) the preloaded objects in children
    Zygote(control, fresh_handlers, pristine, end_leftovers).serve()


def _set_dumpable(dumpable):
    """prctl(PR_SET_DUMPABLE): off, no process of the same user may trace this one or write its memory."""
    try:
        __import__("ctypes").CDLL(None).prctl(4, int(dumpable), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux


def _signal_handlers():
    handlers = {}
    for sig in set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}:
        with contextlib.suppress(OSError, ValueError):
            handlers[sig] = signal.getsignal(sig)
    return handlers


def _extra_threads():
    """A description of the threads besides this one, or '' if there are none."""
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    try:
        tasks = len(os.listdir("/proc/self/task"))
    except OSError:
        tasks = 1
    if others or tasks > 1:
        return "{} thread(s){}".format(max(len(others), tasks - 1), " ({})".format(", ".join(others)) if others else "")
    return ""


def _config_parsers():
    try:
        from luigi.configuration import core
        parsers = set(core.PARSERS.values())
        for cls in parsers:
            cls._instance, cls._config_paths  # type: ignore[attr-defined]  # noqa: B018 -- both must exist to be reset
    except (ImportError, AttributeError):
        return None
    return parsers


def _refuse(reason):
    sys.stdout.write("{} {}\n".format(REFUSED, json.dumps(reason)))
    sys.stdout.flush()
    os._exit(3)


class Zygote:
    def __init__(self, control, fresh_handlers, pristine, end_leftovers):
        self.fresh_handlers = fresh_handlers
        self.pristine = pristine
        self.end_leftovers = end_leftovers
        self.stopping = False
        self.children = {}
        """pid -> the connection of its run (None once the node closed it)."""
        self.deadlines = {}
        """pid -> when its process group gets SIGKILL (the node stopped the run)."""
        self.connections = {}
        """socket -> [received bytes, [report socket, output descriptor]]."""
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a Python handler, so the wakeup fd hears it
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop)
        self.control = socket.socket(fileno=control)
        self.control.setblocking(False)
        self.selector.register(self.control, selectors.EVENT_READ, self._accept)
        self.selector.register(0, selectors.EVENT_READ, self._control)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self._reap)

    def _stop(self, *_):
        self.stopping = True

    def serve(self):
        sys.stdout.write("{} {}\n".format(READY, json.dumps({"pid": os.getpid(), "python": sys.version.split()[0]})))
        sys.stdout.flush()
        while not self.stopping:
            timeout = max(0.0, min(self.deadlines.values()) - time.monotonic()) if self.deadlines else None
            for key, _ in self.selector.select(timeout):
                key.data(key.fileobj)
            for pid, deadline in list(self.deadlines.items()):
                if deadline <= time.monotonic():
                    del self.deadlines[pid]
                    _kill_group(pid, signal.SIGKILL)
        self._stop_children()

    def _control(self, _):
        try:
            if not os.read(0, 4096):
                self.stopping = True  # the node is gone
        except OSError:
            self.stopping = True

    def _accept(self, _):
        """A message from the node on the inherited socket: `run` with the run's three descriptors."""
        try:
            data, ancillary, flags, _ = self.control.recvmsg(64, socket.CMSG_SPACE(4 * 16))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancillary, flags = b"", [], 0
        fds = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds += list(struct.unpack("{}i".format(usable // 4), payload[:usable]))
        if not data and not fds:
            self.stopping = True  # the node is gone
            return
        if data != b"run" or len(fds) != 3 or flags & socket.MSG_CTRUNC:
            _release(fds)
            return  # nobody to answer: not the node's message
        connection = socket.socket(fileno=fds[0])
        report = socket.socket(fileno=fds[1])
        connection.setblocking(False)
        self.connections[connection] = [b"", [report, fds[2]]]
        self.selector.register(connection, selectors.EVENT_READ, self._receive)

    def _receive(self, connection):
        state = self.connections[connection]
        try:
            data = connection.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(connection)
            return
        state[0] += data
        if len(state[0]) >= 4:
            size = struct.unpack(">I", state[0][:4])[0]
            if size > MAX_REQUEST:
                self._refuse(connection, "request refused: {} bytes, more than {}".format(size, MAX_REQUEST))
            elif len(state[0]) >= 4 + size:
                try:
                    request = json.loads(state[0][4:4 + size].decode("utf-8"))
                    problem = RUN.problem(request)
                except ValueError as exc:
                    problem = "not a JSON request: {}".format(exc)
                if problem:
                    self._refuse(connection, "request refused: " + problem)
                    return
                self.selector.unregister(connection)  # one request per connection
                self._start(connection, request)

    def _refuse(self, connection, why):
        self._answer(connection, {"error": why})
        self._close(connection)

    def _close(self, connection):
        state = self.connections.pop(connection, None)
        if state is None:
            return
        _release(state[1])
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(connection)
        for pid, owner in list(self.children.items()):
            if owner is connection:  # the node gave up on this run: it ends with its connection
                self.children[pid] = None
                self._end(pid)
        connection.close()

    def _end(self, pid):
        """Stop a run the node gave up on: SIGTERM to its process group now, SIGKILL after the grace period."""
        _kill_group(pid, signal.SIGTERM)
        self.deadlines.setdefault(pid, time.monotonic() + GRACE_SECONDS)

    def _start(self, connection, request):
        report, output = self.connections[connection][1]
        self.connections[connection][1] = []
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            _release([report, output])
            self._refuse(connection, "fork failed: {}".format(exc))
            return
        if pid == 0:
            self._child(connection, request, report, output)
        _release([report, output])
        self.children[pid] = connection
        self._answer(connection, {"pid": pid})
        # Notice the node shutting or closing the connection even while the child runs.
        self.selector.register(connection, selectors.EVENT_READ, self._watch)

    def _watch(self, connection):
        try:
            if connection.recv(4096):
                return  # nothing more is expected; ignored
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(connection)
            return
        self.selector.unregister(connection)  # shut for writing: stop the run, still answer its status
        for pid, owner in self.children.items():
            if owner is connection:
                self._end(pid)

    def _answer(self, connection, message):
        try:
            connection.setblocking(True)
            connection.settimeout(GRACE_SECONDS)
            connection.sendall((json.dumps(message) + "\n").encode())
            connection.setblocking(False)
        except OSError:
            pass

    def _reap(self, _):
        try:
            while os.read(self.wake_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            connection = self.children.pop(pid, None)
            self.deadlines.pop(pid, None)
            if self.end_leftovers and not self.children:
                with contextlib.suppress(OSError):
                    os.kill(-1, signal.SIGKILL)  # all else in this PID namespace the run's user can signal
            if connection is not None:
                self._answer(connection, {"status": code})
                self.connections.pop(connection, None)
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(connection)
                connection.close()

    def _stop_children(self):
        """The node is gone or asked us to stop: no run outlives it."""
        deadline = time.monotonic() + GRACE_SECONDS
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in list(self.children):
                _kill_group(pid, sig)
            while self.children and time.monotonic() < deadline:
                self._reap(None)
                if self.children:
                    self.selector.select(0.05)
            if not self.children:
                break
            deadline = time.monotonic() + GRACE_SECONDS

    # -- in the child ------------------------------------------------------

    def _child(self, connection, request, report, output):
        code = 1
        try:
            os.setsid()
            connection.close()  # the zygote's: a run cannot speak for it
            _set_dumpable(True)  # the run is an ordinary process, as if started afresh
            report.setblocking(True)
            signal.set_wakeup_fd(-1)
            for sig, handler in self.fresh_handlers.items():
                with contextlib.suppress(OSError, ValueError, TypeError):
                    signal.signal(sig, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            self.selector.close()
            self.control.close()
            for other, (_, pending) in self.connections.items():
                _release(pending)
                other.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(output, 1)
            os.dup2(output, 2)
            os.close(null)
            os.close(output)
            code = RUN.run(request, self.pristine)
        except BaseException:  # noqa: BLE001 -- the child must end here, never return into the zygote's loop
            traceback.print_exc()
        RUN.exit(report, code)

def _release(held):
    """Close received descriptors (sockets or numbers)."""
    for item in held:
        with contextlib.suppress(OSError):
            item.close() if isinstance(item, socket.socket) else os.close(item)


def _kill_group(pid, sig):
    with contextlib.suppress(OSError):
        os.killpg(pid, sig)


if __name__ == "__main__":
    main(sys.argv[1:])
