"""One run in a warm interpreter's forked child (see `zygote`): the request checked, the run set up, its exit.

Standard library only, loaded by `zygote.py` by path before the environment's
modules: it runs inside pipeline environments, which have neither Poltergust
nor its dependencies.

The fast start: `python -m luigi` builds its argparse parser, over every
parameter of every registered task, three times per run (most of a warm
start's time). A request's `luigi` part (see `run.command.fast_start`) says
the same run as its argv: the module, the root task, its parameters as the
command line passes them and the node's settings. The child then sets those
settings in luigi's configuration (which luigi reads right after its command
line, so nothing the pipeline configures can differ), builds the task with
`from_str_params` and runs luigi's own `_schedule_and_run` and exit codes
exactly as `luigi.retcodes.run_with_retcodes` does. Where the two could
differ (a key that is not one of the root task's own flags, a bare flag that
is not a boolean, a luigi without these functions, a TOML configuration, a
module or task that does not load) it says why in the run log and runs the
command line instead.
"""
import importlib
import json
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback


def problem(request):
    """What is wrong with a decoded request, or '' when it can be obeyed."""
    if not isinstance(request, dict) or not {"argv", "env", "cwd"} <= set(request) <= {"argv", "env", "cwd", "luigi"}:
        return "a request is an object with argv, env, cwd and optionally luigi"
    argv, env, cwd = request["argv"], request["env"], request["cwd"]
    if not isinstance(argv, list) or not all(isinstance(arg, str) and "\0" not in arg for arg in argv):
        return "argv must be a list of strings"
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and "=" not in k
                                            and "\0" not in k + v for k, v in env.items()):
        return "env must map names to strings"
    if not isinstance(cwd, str) or not os.path.isabs(cwd) or "\0" in cwd:
        return "cwd must be an absolute path"
    return _luigi_problem(request.get("luigi", {"module": "", "task": "", "params": {}, "settings": {}}))


def _luigi_problem(call):
    def strings(mapping, values=(str,)):
        return isinstance(mapping, dict) and all(isinstance(k, str) and isinstance(v, values)
                                                 for k, v in mapping.items())

    if not isinstance(call, dict) or set(call) != {"module", "task", "params", "settings"}:
        return "luigi is an object with module, task, params and settings"
    if not isinstance(call["module"], str) or not isinstance(call["task"], str):
        return "luigi's module and task must be strings"
    if not strings(call["params"], (str, bool)) or False in call["params"].values():
        return "luigi's params must map names to strings or true"
    if not strings(call["settings"], dict) or not all(strings(keys) for keys in call["settings"].values()):
        return "luigi's settings must map sections to mappings of strings"
    return ""


def run(request, pristine):
    """Take the run's environment (all of it) and working directory, reset luigi, run it; its exit code."""
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    time.tzset()
    _reset_luigi(pristine)
    random.seed()
    import luigi.cmdline

    argv = list(request["argv"])
    sys.argv = [os.path.join(os.path.dirname(luigi.__file__), "__main__.py")] + argv
    if not getattr(sys.flags, "safe_path", False):
        sys.path.insert(0, os.getcwd())  # as `-m` puts the working directory first
    if "luigi" in request:
        start = _fast_start(request["luigi"])
        if start is not None:
            return _exit_code(start)
        _reset_luigi(pristine)  # forget what the fast start set
    return _exit_code(lambda: luigi.cmdline.luigi_run(argv))


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


def _exit_code(start):
    """Run `start` as `python -m luigi` runs luigi: the exit code that interpreter would have."""
    try:
        start()
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


class _NotCovered(Exception):
    """The fast start could differ from luigi's command line here (the message says why)."""


def _fast_start(call):
    """A function that runs the call without luigi's command-line parser, or None (said in the run log)."""
    try:
        return _prepare(call)
    except _NotCovered as exc:
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001 -- the command line meets the same error and reports it as luigi does
        reason = "{}: {}".format(type(exc).__name__, exc)
    print("poltergust: luigi starts from its command line ({})".format(reason), file=sys.stderr, flush=True)
    return None


def _prepare(call):
    import luigi.configuration
    import luigi.execution_summary as summary
    import luigi.interface
    import luigi.retcodes
    from luigi.task_register import Register

    for module, name in ((luigi.interface, "_schedule_and_run"), (summary, "_summary_dict"),
                         (summary, "_root_task"), (luigi.retcodes, "retcode")):
        if not hasattr(module, name):
            raise _NotCovered("this luigi has no {}.{}".format(module.__name__, name))
    config = luigi.configuration.get_config()
    if not (hasattr(config, "add_section") and hasattr(config, "has_section")):
        raise _NotCovered("luigi's configuration is not an INI file")
    importlib.import_module(call["module"])
    task_cls = Register.get_task_cls(call["task"])
    given = _given(task_cls, call["params"], {
        "--" + name.replace("_", "-") for _, unprefixed, name, _ in Register.get_all_params() if unprefixed})
    for section, keys in call["settings"].items():
        if not config.has_section(section):
            config.add_section(section)
        for key, value in keys.items():
            config.set(section, key, value)
            if config.get(section, key) != value:
                raise _NotCovered("luigi's configuration reads [{}] {} differently".format(section, key))
    return lambda: _run_with_retcodes(lambda: task_cls.from_str_params(given))


def _given(task_cls, params, global_flags):
    """The root task's parameters, as luigi's parser would hand them to it; _NotCovered where it might not."""
    own = dict(task_cls.get_params())
    given = {}
    for key, value in params.items():
        name = key.replace("-", "_")
        flag = "--" + key
        if name not in own or key != name.replace("_", "-"):
            raise _NotCovered("{} is not one of {}'s own flags".format(flag, task_cls.get_task_family()))
        if flag in global_flags:
            raise _NotCovered("{} is also one of luigi's own flags".format(flag))
        kwargs = own[name]._parser_kwargs(name)  # noqa: SLF001 -- how luigi's parser takes this parameter
        bare = kwargs.get("action") == "store_true"
        takes_value = kwargs in ({"action": "store", "dest": name},
                                 {"action": "store", "dest": name, "nargs": "?", "const": True})
        if value is True and (bare or kwargs.get("const") is True):
            value = "true"
        elif value is True or bare or not takes_value:
            raise _NotCovered("{} is given as luigi's parser may not take it".format(flag))
        elif value.startswith("-"):
            raise _NotCovered("the value of {} starts with '-'".format(flag))
        if value:  # as luigi's parser: an empty value leaves the parameter to the configuration
            given[name] = value
    return given


def _run_with_retcodes(make_task):
    """`luigi.retcodes.run_with_retcodes` for a task made by `make_task` instead of from the command line."""
    import luigi.execution_summary as summary
    import luigi.interface
    from luigi.retcodes import retcode
    from luigi.setup_logging import InterfaceLogging

    logger = logging.getLogger("luigi-interface")
    retcodes = retcode()
    try:
        worker = luigi.interface._schedule_and_run([make_task()]).worker  # noqa: SLF001 -- what luigi's own CLI runs
    except luigi.interface.PidLockAlreadyTakenExit:
        sys.exit(retcodes.already_running)
    except Exception:  # noqa: BLE001 -- as luigi: some errors come before logging is set up
        InterfaceLogging.setup(luigi.interface.core())
        logger.exception("Uncaught exception in luigi")
        sys.exit(retcodes.unhandled_exception)
    task_sets = summary._summary_dict(worker)  # noqa: SLF001
    root_task = summary._root_task(worker)  # noqa: SLF001
    has = {status for status, tasks in task_sets.items() if tasks}.__contains__
    codes_and_conds = (
        (retcodes.missing_data, has("still_pending_ext")),
        (retcodes.task_failed, has("failed")),
        (retcodes.already_running, has("run_by_other_worker")),
        (retcodes.scheduling_error, has("scheduling_error")),
        (retcodes.not_run, has("not_run")),
    )
    expected = max(code * (1 if cond else 0) for code, cond in codes_and_conds)
    if expected == 0 and root_task not in task_sets["completed"] and root_task not in task_sets["already_done"]:
        sys.exit(retcodes.not_run)
    sys.exit(expected)


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
