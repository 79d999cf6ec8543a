"""A warm interpreter: luigi imported once, one forked child per luigi run.

A node starts it as `ENV/bin/python zygote.py SOCKET [MODULE ...]` in a
pipeline's environment, so it uses the standard library only and runs on
every Python an environment may use (3.8 and later). It imports luigi and the
MODULEs (an environment's `preload:`), refuses to serve if that left a thread
running (forking a threaded process can deadlock the child), makes itself
non-dumpable (runs, which may share its user, cannot trace it), and serves on
a Unix socket (mode 0600) until its standard input, a pipe from the node,
is closed.

Per run, the node connects and sends a 4-byte big-endian length and a JSON
object `{"argv": [...], "env": {...}, "cwd": "..."}`, with the write end of
the run's output pipe passed as SCM_RIGHTS. The zygote forks; the child starts
its own session, sends `{"pid": N}`, becomes dumpable, restores a fresh
interpreter's signal handlers, takes the run's environment (all of it),
working directory and output, resets luigi's configuration, reseeds `random`
and runs luigi as `python -m luigi ARGV` would, sending `{"exit": CODE}` just
before exiting. The zygote reaps it and sends `{"status": CODE}` (negative:
killed by that signal), which the node trusts first (the child's own report
counts only if the zygote died meanwhile).

When the node is gone (standard input closed) or on SIGTERM, the zygote stops
its children's process groups (SIGTERM, then SIGKILL after a grace period) and
exits: no run outlives its node.
"""
import contextlib
import gc
import importlib
import json
import os
import random
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


def main(argv):
    fresh_handlers = _signal_handlers()  # what a fresh interpreter has, restored in every child
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:
        del sys.path[0]  # the directory of this file is not the pipeline's to import from
    socket_path, preload = argv[0], argv[1:]
    boot_config_path = os.environ.get("LUIGI_CONFIG_PATH")
    for name in ["luigi", "luigi.cmdline", "luigi.configuration"] + preload:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # noqa: B036 -- whatever a module raises, the node must hear why
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
    Zygote(socket_path, fresh_handlers, pristine).serve()


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
            cls._instance, cls._config_paths  # noqa: B018 -- both must exist to be reset
    except (ImportError, AttributeError):
        return None
    return parsers


def _refuse(reason):
    sys.stdout.write("{} {}\n".format(REFUSED, json.dumps(reason)))
    sys.stdout.flush()
    os._exit(3)


class Zygote:
    def __init__(self, socket_path, fresh_handlers, pristine):
        self.fresh_handlers = fresh_handlers
        self.pristine = pristine
        self.stopping = False
        self.children = {}
        """pid -> the connection of its run (None once the node closed it)."""
        self.connections = {}
        """socket -> [received bytes, received descriptors]."""
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a Python handler, so the wakeup fd hears it
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mask = os.umask(0o177)
        try:
            self.listener.bind(socket_path)
        finally:
            os.umask(mask)
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        self.selector.register(0, selectors.EVENT_READ, self._control)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self._reap)

    def _stop(self, *_):
        self.stopping = True

    def serve(self):
        sys.stdout.write("{} {}\n".format(READY, json.dumps({"pid": os.getpid(), "python": sys.version.split()[0]})))
        sys.stdout.flush()
        while not self.stopping:
            for key, _ in self.selector.select():
                key.data(key.fileobj)
        self._stop_children()

    def _control(self, _):
        try:
            if not os.read(0, 4096):
                self.stopping = True  # the node is gone
        except OSError:
            self.stopping = True

    def _accept(self, _):
        try:
            connection, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        connection.setblocking(False)
        self.connections[connection] = [b"", []]
        self.selector.register(connection, selectors.EVENT_READ, self._receive)

    def _receive(self, connection):
        state = self.connections[connection]
        try:
            data, ancillary, flags, _ = connection.recvmsg(1 << 16, socket.CMSG_SPACE(4 * 16))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancillary, flags = b"", [], 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                state[1] += list(struct.unpack("{}i".format(usable // 4), payload[:usable]))
        if not data:
            self._close(connection)
            return
        state[0] += data
        if len(state[0]) >= 4:
            size = struct.unpack(">I", state[0][:4])[0]
            if size > MAX_REQUEST or flags & socket.MSG_CTRUNC:
                self._answer(connection, {"error": "request refused (too large, or descriptors lost)"})
                self._close(connection)
            elif len(state[0]) >= 4 + size:
                self.selector.unregister(connection)  # one request per connection
                fds, state[1] = state[1], []
                self._start(connection, json.loads(state[0][4:4 + size].decode("utf-8")), fds)

    def _close(self, connection):
        state = self.connections.pop(connection, None)
        if state is None:
            return
        for fd in state[1]:
            os.close(fd)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(connection)
        for pid, owner in list(self.children.items()):
            if owner is connection:  # the node gave up on this run: it ends with its connection
                self.children[pid] = None
                _kill_group(pid, signal.SIGTERM)
        connection.close()

    def _start(self, connection, request, fds):
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            self._answer(connection, {"error": "expected one output descriptor, got {}".format(len(fds))})
            return
        output = fds[0]
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(output)
            self._answer(connection, {"error": "fork failed: {}".format(exc)})
            return
        if pid == 0:
            self._child(connection, request, output)
        os.close(output)
        self.children[pid] = connection
        # Notice the node closing the connection even while the child runs.
        self.selector.register(connection, selectors.EVENT_READ, self._watch)

    def _watch(self, connection):
        try:
            if connection.recv(4096):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._close(connection)

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
            if connection is not None:
                self._answer(connection, {"status": code})

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
        with contextlib.suppress(OSError):
            os.unlink(self.listener.getsockname())

    # -- in the child ------------------------------------------------------

    def _child(self, connection, request, output):
        code = 1
        try:
            os.setsid()
            _set_dumpable(True)  # the run is an ordinary process, as if started afresh
            connection.setblocking(True)
            connection.sendall((json.dumps({"pid": os.getpid()}) + "\n").encode())
            signal.set_wakeup_fd(-1)
            for sig, handler in self.fresh_handlers.items():
                with contextlib.suppress(OSError, ValueError, TypeError):
                    signal.signal(sig, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            self.selector.close()
            self.listener.close()
            for other, (_, pending) in self.connections.items():
                for fd in pending:
                    os.close(fd)
                if other is not connection:
                    other.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(output, 1)
            os.dup2(output, 2)
            os.close(null)
            os.close(output)
            os.environ.clear()
            os.environ.update(request["env"])
            os.chdir(request["cwd"])
            time.tzset()
            self._reset_luigi()
            random.seed()
            code = _run_luigi(request["argv"])
        except BaseException:  # noqa: B036 -- the child must end here, never return into the zygote's loop
            traceback.print_exc()
        _exit(connection, code)

    def _reset_luigi(self):
        """Forget the zygote's luigi configuration; read the run's (LUIGI_CONFIG_PATH, ./luigi.cfg) when used."""
        from luigi.configuration import core
        from luigi import cmdline_parser

        for cls, paths in self.pristine.items():
            cls._instance = None
            cls._config_paths = list(paths)
        cmdline_parser.CmdlineParser._instance = None
        if "LUIGI_CONFIG_PATH" in os.environ:
            core.add_config_path(os.environ["LUIGI_CONFIG_PATH"])


def _kill_group(pid, sig):
    with contextlib.suppress(OSError):
        os.killpg(pid, sig)


def _run_luigi(argv):
    """What `python -m luigi ARGV` does, returning the exit code that interpreter would have."""
    import luigi
    import luigi.cmdline

    sys.argv = [os.path.join(os.path.dirname(luigi.__file__), "__main__.py")] + list(argv)
    if not getattr(sys.flags, "safe_path", False):
        sys.path.insert(0, os.getcwd())  # as `-m` puts the working directory first
    try:
        luigi.cmdline.luigi_run(list(argv))
        return 0
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return -signal.SIGINT


def _exit(connection, code):
    """End the child as an interpreter exiting normally would: threads joined, atexit run, output flushed."""
    try:
        shutdown = getattr(threading, "_shutdown", None)
        if shutdown is not None:
            shutdown()
        import atexit
        atexit._run_exitfuncs()
    except BaseException:  # noqa: B036
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: B036
            pass
    try:
        connection.sendall((json.dumps({"exit": code}) + "\n").encode())
    except BaseException:  # noqa: B036
        pass
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


if __name__ == "__main__":
    main(sys.argv[1:])
