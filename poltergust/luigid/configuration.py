"""luigid's configuration: the user's luigi fragment, checked and merged with the settings the fleet needs.

The deploy (metadata attribute `poltergust-luigid-config`, written by
deploy/node-init.sh through `python -m poltergust.luigid.configuration`) and
the embedded luigid (`--scheduler-config FILE`) both pass through here, so a
key luigid would not read, or one Poltergust sets its own way, is refused by
name before luigid starts instead of being ignored or overridden later.
"""
from __future__ import annotations

import argparse
import configparser
import importlib.util
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

FLEET_DEFAULTS: dict[str, dict[str, str]] = {"scheduler": {
    # Free the tasks of a node that vanished (scaled in, crashed) after 30 s rather than 60 s, so that other
    # nodes take them over sooner; a longer delay suits long tasks on flaky networks, at that cost.
    "worker_disconnect_delay": "30",
    # Check for vanished workers on every request rather than once a minute.
    "prune_on_get_work": "true",
    # luigid serves one request at a time and task history slows it badly with many workers.
    "record_task_history": "false",
}}
"""What the fleet's luigid runs with unless the user's fragment says otherwise."""

OWNED = {
    ("scheduler", "state_path"): "Poltergust sets luigid's state file itself (luigid --state-path, in its state "
                                 "directory), which would win over this key",
}
"""Keys luigid reads that Poltergust sets its own way: refused, never silently overridden."""

WORKER_SECTIONS = ("core", "worker", "retcode")
"""Sections only luigi's workers read: they belong to each pipeline's `luigi:` mapping."""

HEADER = "# luigid's configuration: the fleet's settings merged with the user's (poltergust.luigid.configuration).\n"


class LuigidConfigError(ValueError):
    """A fragment luigid would not run as written; the message names the section and key."""


def _luigid_classes() -> dict[str, Any]:
    """luigi's configuration classes of the sections luigid reads (besides [resources] and [task_history])."""
    import luigi.batch_notifier
    import luigi.notifications
    import luigi.scheduler

    return {"scheduler": luigi.scheduler.scheduler, "batch_email": luigi.batch_notifier.batch_email,
            "email": luigi.notifications.email, "smtp": luigi.notifications.smtp,
            "sendgrid": luigi.notifications.sendgrid}


def _normal(key: str) -> str:
    """A key as luigi's parameters match it (`retry-delay` is `retry_delay`)."""
    return key.replace("-", "_")


def parse_fragment(text: str) -> dict[str, dict[str, str]]:
    """The user's fragment as section -> key -> raw value (keys as luigi reads them: lower case); checked."""
    parser = configparser.RawConfigParser(delimiters=("=", ":"))
    try:
        parser.read_string(text, source="fragment")
    except configparser.Error as exc:
        raise LuigidConfigError(f"not a luigi configuration file: {str(exc).splitlines()[0]}") from None
    fragment = {section: dict(parser.items(section)) for section in parser.sections()}
    check(fragment)
    return fragment


def check(fragment: Mapping[str, Mapping[str, str]]) -> None:
    """Raise `LuigidConfigError` naming the first section or key luigid would not take as written."""
    classes = _luigid_classes()
    for section, keys in fragment.items():
        if section in WORKER_SECTIONS:
            raise LuigidConfigError(f"[{section}]: a setting of luigi's workers, not of luigid; a pipeline sets it "
                                    f"in its config's luigi: mapping")
        for key, value in keys.items():
            where = f"[{section}] {key}"
            if (section, _normal(key)) in OWNED:
                raise LuigidConfigError(f"{where}: {OWNED[section, _normal(key)]}")
            if section == "resources":
                if not value.strip().isdigit():
                    raise LuigidConfigError(f"{where}: a resource's amount must be a whole number (got {value!r})")
            elif section == "task_history":
                if _normal(key) != "db_connection":
                    raise LuigidConfigError(f"{where}: luigid reads only db_connection in [task_history]")
            elif section in classes:
                _check_value(classes[section], where, key, value)
            else:
                raise LuigidConfigError(
                    f"[{section}]: luigid does not read this section (it reads {', '.join(sorted(classes))}, "
                    "resources and task_history)")
    history = {_normal(key): value for key, value in fragment.get("scheduler", {}).items()}.get("record_task_history")
    if (history or "").strip().lower() == "true" and importlib.util.find_spec("sqlalchemy") is None:
        raise LuigidConfigError("[scheduler] record_task_history: luigid's task history needs SQLAlchemy, which "
                                "this installation of Poltergust lacks")


def _check_value(cls: Any, where: str, key: str, value: str) -> None:
    params = dict(cls.get_params())
    key = _normal(key)
    if key not in params:
        raise LuigidConfigError(f"{where}: luigid does not know this key (it knows {', '.join(sorted(params))})")
    if "$" in value or "%" in value:
        return  # interpolated by luigi when luigid reads it
    try:
        params[key].parse(value.strip())
    except (ValueError, TypeError) as exc:
        raise LuigidConfigError(f"{where}: {value!r} is not a valid value ({exc})") from None


def merge(fragment: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """The fleet's defaults with the user's fragment over them (the user's values win, however the key is spelt)."""
    merged = {section: dict(keys) for section, keys in FLEET_DEFAULTS.items()}
    for section, keys in fragment.items():
        into = merged.setdefault(section, {})
        for key, value in keys.items():
            for spelt in [k for k in into if _normal(k) == _normal(key)]:
                del into[spelt]
            into[key] = value
    return merged


def render(config: Mapping[str, Mapping[str, str]]) -> str:
    lines = [HEADER.rstrip("\n")]
    for section, keys in config.items():
        lines += ["", f"[{section}]", *(f"{key} = {value}" for key, value in keys.items())]
    return "\n".join(lines) + "\n"


def luigid_config(user_text: str = "") -> str:
    """The file luigid reads: the fleet's settings merged with `user_text` (checked; may be empty)."""
    return render(merge(parse_fragment(user_text)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m poltergust.luigid.configuration",
        description="Check a luigi configuration fragment for the fleet's luigid and write it merged with the "
                    "settings the fleet needs.")
    parser.add_argument("command", choices=["check", "merge"], help="check: only check; merge: print or write "
                                                                    "the merged file")
    parser.add_argument("fragment", type=Path, help="the user's fragment ([scheduler], [resources], ...)")
    parser.add_argument("--out", type=Path, help="with merge: write here instead of printing")
    args = parser.parse_args(argv)
    try:
        text = luigid_config(args.fragment.read_text())
    except (LuigidConfigError, OSError, UnicodeDecodeError) as exc:
        print(f"{args.fragment}: {exc}", file=sys.stderr)
        return 2
    if args.command == "merge":
        if args.out is None:
            sys.stdout.write(text)
        else:
            args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
