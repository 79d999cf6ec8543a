"""A pipeline's own luigi settings: its config's `luigi:` mapping, checked against what the node sets itself.

Luigi reads `luigi.cfg` in its working directory and then the file
LUIGI_CONFIG_PATH names. A run's `luigi.cfg` is written in its working
directory: the file a LUIGI_CONFIG_PATH variable of the environment or the
config names (a luigi.cfg the pipeline ships), with the config's `luigi:`
mapping over it (the config wins, as its variables do), and LUIGI_CONFIG_PATH
points at it. Both cold and warm starts read it (the warm interpreter's child
reads luigi's configuration anew, see launch/zygote.py). Keys the node sets on
luigi's command line, which would silently win over a file, are refused by
name in either source.
"""
from __future__ import annotations

import configparser
import re
from pathlib import Path
from typing import Any, Mapping, MutableMapping

NODE_SECTIONS = {
    "retcode": "the node sets luigi's exit codes to tell a finished pipeline from a failed one",
    "scheduler": "a setting of luigid, the fleet's scheduler: set it in the deploy's luigid configuration "
                 "(poltergust-luigid-config) or a local node's --scheduler-config",
}
NODE_SECTIONS["resources"] = NODE_SECTIONS["task_history"] = NODE_SECTIONS["scheduler"]
_SCHEDULER = "the node points luigi at the fleet's luigid"
_KEEP_ALIVE = "the node keeps its worker asking for work while the pipeline has tasks, so that it takes over " \
              "tasks freed by other nodes within a second"
NODE_KEYS = {
    **{("core", key): _SCHEDULER for key in (
        "scheduler_host", "scheduler_port", "scheduler_url", "default_scheduler_host", "default_scheduler_port",
        "default_scheduler_url", "local_scheduler")},
    ("core", "no_lock"): "the node runs luigi with --no-lock: nodes sharing a host, and re-runs, must not trip over "
                         "luigi's per-host lock",
    ("core", "take_lock"): "the node runs luigi with --no-lock",
    ("core", "log_level"): "the node runs luigi at --log-level INFO (at DEBUG a waiting worker floods the run log)",
    ("core", "assistant"): "the node decides which of its workers are assistants (those that join a pipeline)",
    ("core", "module"): "the config's task.module names the module",
    ("worker", "id"): "the node names its worker poltergust:PIPELINE:NODE, which luigid and the dashboard read",
    ("worker", "keep_alive"): _KEEP_ALIVE,
    ("worker", "wait_interval"): _KEEP_ALIVE,
    ("worker", "wait_jitter"): _KEEP_ALIVE,
    ("worker", "max_keep_alive_idle_duration"): _KEEP_ALIVE,
}
"""What the node sets on luigi's command line (see `command.luigi_command`), and why."""

NAME = re.compile(r"[A-Za-z0-9_.\-]+")
HEADER = "# luigi's settings of this run, written by the Poltergust node (see poltergust/run/worker_config.py).\n"


class LuigiSettingError(ValueError):
    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


def _normal(key: str) -> str:
    """A key as luigi's parameters match it; files keep the key as given (luigi reads some keys, such as
    `[core] rpc-retry-wait`, only as spelt)."""
    return key.strip().lower().replace("-", "_")


def _refusal(section: str, key: str | None = None) -> str | None:
    if section in NODE_SECTIONS:
        return NODE_SECTIONS[section]
    return NODE_KEYS.get((section, key or ""))


def parse_mapping(mapping: Any) -> dict[str, dict[str, str]]:
    """The config's `luigi:` (section -> key -> plain value) as strings; errors name `section.key`."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise LuigiSettingError("luigi", "must be a mapping of luigi sections (core, worker, a task's name...) to "
                                         "mappings of key: value")
    settings: dict[str, dict[str, str]] = {}
    for section, keys in mapping.items():
        if not isinstance(section, str) or not NAME.fullmatch(section):
            raise LuigiSettingError(f"luigi.{section}", "not a luigi section name")
        if (reason := _refusal(_normal(section))) is not None:
            raise LuigiSettingError(f"luigi.{section}", reason)
        if not isinstance(keys, dict):
            raise LuigiSettingError(f"luigi.{section}", "must be a mapping of key: value")
        for key, value in keys.items():
            where = f"luigi.{section}.{key}"
            if not isinstance(key, str) or not NAME.fullmatch(key):
                raise LuigiSettingError(where, "not a luigi setting name")
            if (reason := _refusal(_normal(section), _normal(key))) is not None:
                raise LuigiSettingError(where, reason)
            if value is None or isinstance(value, (dict, list)) or "\n" in str(value) or "\r" in str(value):
                raise LuigiSettingError(where, "must be a plain value on one line")
            text = str(value).lower() if isinstance(value, bool) else str(value)
            settings.setdefault(section, {})[key.strip().lower()] = text
    return settings


def read_shipped(path: Path) -> dict[str, dict[str, str]]:
    """The luigi.cfg that LUIGI_CONFIG_PATH names, checked like the mapping; errors name the file's section.key."""
    parser = configparser.RawConfigParser()
    try:
        with path.open(encoding="utf-8") as handle:
            parser.read_file(handle, source=str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise LuigiSettingError("LUIGI_CONFIG_PATH", f"cannot read {path}: {exc}") from None
    except configparser.Error as exc:
        raise LuigiSettingError("LUIGI_CONFIG_PATH",
                                f"{path} is not a luigi.cfg: {str(exc).splitlines()[0]}") from None
    shipped = {section: dict(parser.items(section)) for section in parser.sections()}
    for section, keys in shipped.items():
        for key in [None, *keys]:
            if (reason := _refusal(_normal(section), key and _normal(key))) is not None:
                raise LuigiSettingError("LUIGI_CONFIG_PATH", f"{path}: {section}{'.' + key if key else ''}: {reason}")
    return shipped


def write_run_config(cwd: Path, settings: Mapping[str, Mapping[str, str]], env: MutableMapping[str, str]) -> None:
    """Write the run's luigi.cfg in `cwd` and point the run's LUIGI_CONFIG_PATH at it.

    Always written, so that a kept working directory never hands one run's settings to the next.
    """
    if env.get("LUIGI_CONFIG_PARSER", "cfg") != "cfg":
        if settings:
            raise LuigiSettingError("luigi", "needs luigi's cfg configuration parser (LUIGI_CONFIG_PARSER is "
                                             f"{env['LUIGI_CONFIG_PARSER']})")
        return
    merged: dict[str, dict[str, str]] = {}
    if env.get("LUIGI_CONFIG_PATH"):
        merged = read_shipped(cwd / env["LUIGI_CONFIG_PATH"])  # a relative path is luigi's, from `cwd`
    for section, keys in settings.items():
        into = merged.setdefault(section, {})
        for key, value in keys.items():
            for spelt in [k for k in into if _normal(k) == _normal(key)]:
                del into[spelt]
            into[key] = value
    lines = [HEADER.rstrip("\n")]
    for section, keys in merged.items():
        lines += ["", f"[{section}]", *(f"{key} = {value}" for key, value in keys.items())]
    path = cwd / "luigi.cfg"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o644)
    env["LUIGI_CONFIG_PATH"] = str(path)
