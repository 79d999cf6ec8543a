"""One run in a warm interpreter's forked child (see `zygote`): the request checked, the run set up, its exit.

Standard library only, loaded by `zygote.py` by path before the environment's
modules: it runs inside pipeline environments, which have neither Poltergust
nor its dependencies.
"""
import json
import os
import random
import signal
import sys
import threading
import time
import traceback


def problem(request):
    """What is wrong with a decoded request, or '' when it can be obeyed."""
    if not isinstance(request, dict) or set(request) != {"argv", "env", "cwd"}:
        return "a request is an object with argv, env and cwd"
    argv, env, cwd = request["argv"], request["env"], request["cwd"]
    if not isinstance(argv, list) or not all(isinstance(arg, str) and "\0" not in arg for arg in argv):
        return "argv must be a list of strings"
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and "=" not in k
                                            and "\0" not in k + v for k, v in env.items()):
        return "env must map names to strings"
    if not isinstance(cwd, str) or not os.path.isabs(cwd) or "\0" in cwd:
        return "cwd must be an absolute path"
    return ""


def run(request, pristine):
    """Take the run's environment (all of it) and working directory, reset luigi, run it; its exit code."""
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    time.tzset()
    _reset_luigi(pristine)
    random.seed()
    return _run_luigi(request["argv"])


def _reset_luigi(pristine):
    """Forget the zygote's luigi configuration; read the run's (LUIGI_CONFIG_PATH, ./luigi.cfg) when used."""
    from luigi import cmdline_parser
    from luigi.configuration import core

    for cls, paths in pristine.items():
        cls._instance = None
        cls._config_paths = list(paths)
    cmdline_parser.CmdlineParser._instance = None  # noqa: SLF001 -- luigi keeps the parsed command line here
    if "LUIGI_CONFIG_PATH" in os.environ:
        core.add_config_path(os.environ["LUIGI_CONFIG_PATH"])


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


def exit(report, code):
    """End the child as an interpreter exiting normally would: threads joined, atexit run, output flushed."""
    try:
        shutdown = getattr(threading, "_shutdown", None)
        if shutdown is not None:
            shutdown()
        import atexit
        atexit._run_exitfuncs()  # noqa: SLF001 -- what a normal exit runs; the child leaves by os._exit
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    try:
        report.sendall((json.dumps({"exit": code}) + "\n").encode())
    except BaseException:  # noqa: BLE001
        pass
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)
