"""What deploy/node-init.sh asks of the installed release: `check-metadata`.

(The scheduler VM's luigi.cfg comes from `poltergust.luigid.configuration`.)
node-init.sh checks only what it needs before Python exists (the role and the
release to install). The rest it hands over here, each metadata attribute with
the node flag it becomes:

    python -m poltergust.deploy check-metadata --role node --service-user poltergust \\
        --value poltergust-topic topic "$TOPIC" --value poltergust-path path "$PATHS" ...

Each value is parsed and checked by the node's own declarations (`settings`),
as the node would when it starts, and then by the few rules a fleet's VM adds
(`VM_RULES`: buckets only, Pub/Sub and project names, the pipelines' user,
secrets). Every problem is printed naming its metadata attribute, and the exit
status is 2; on success one line says what the node will use, derived values
included (the topic, for instance). Values that are not node flags (secrets,
the environments a bake builds) name a rule instead of a flag.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from poltergust.option import SettingError
from poltergust.settings import OPTION, Settings, settings_from

GCS_BUCKET = r"gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]"
"""Bucket names: 3-222 characters of lower-case letters, digits, - _ and dots."""
PUBSUB_ID = r"[A-Za-z][A-Za-z0-9._~+%-]{2,254}"
SYSTEMD_PLAIN = r"[A-Za-z0-9_@+=:,./-]+"
"""What the unit's Environment= line holds as it is (node-init.sh quotes only ExecStart's words)."""


def _each(pattern: str, problem: str) -> Callable[[str, str], list[str]]:
    """A rule for space-separated words that must each match `pattern`."""
    return lambda value, service_user: [problem.format(word) for word in value.split()
                                        if not re.fullmatch(pattern, word)]


def _one(pattern: str, problem: str) -> Callable[[str, str], list[str]]:
    return lambda value, service_user: [] if re.fullmatch(pattern, value) else [problem.format(value)]


def _run_as(user: str, service_user: str) -> list[str]:
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", user):
        return [f"'{user}' is not a user name (or 'none')"]
    if user in ("root", service_user):
        return [f"must be an unprivileged user of its own, not '{user}'"]
    return []


def _positive(value: str, service_user: str) -> list[str]:
    return [] if re.fullmatch(r"[1-9][0-9]{0,3}", value) else [f"must be a positive integer, got '{value}'"]


@dataclass(frozen=True)
class Rule:
    """What a VM's value must be beyond what the node checks; `required` roles refuse it missing."""

    check: Callable[[str, str], list[str]] | None = None
    required: tuple[str, ...] = ()
    missing: str = ""


VM_RULES = {
    "path": Rule(_each(GCS_BUCKET + "(/.*)?", "'{}' is not a gs://BUCKET/PREFIX URL"), required=("node",)),
    "scheduler-url": Rule(_one(r"https?://[^\s/]+(/\S*)?", "'{}' is not an http(s)://HOST:PORT URL"),
                          required=("node",)),
    "topic": Rule(_one(f"{PUBSUB_ID}|projects/[a-z][a-z0-9.:-]+/topics/{PUBSUB_ID}",
                       "'{}' is not a valid Pub/Sub topic name")),
    "project": Rule(_one(r"([a-z][a-z0-9.-]*:)?[a-z][a-z0-9-]{4,28}[a-z0-9]", "'{}' is not a valid project id"),
                    required=("node",), missing="is missing and project/project-id is not available either"),
    "max-concurrent": Rule(_positive),
    "backlog-subscription": Rule(_one(PUBSUB_ID, "'{}' is not a valid Pub/Sub subscription id")),
    "allowed-environment-prefix": Rule(_each(f"(?={GCS_BUCKET}(/.*)?$){SYSTEMD_PLAIN}",
                                             "'{}' is not a gs://BUCKET/PREFIX URL")),
    "run-as": Rule(_run_as),
    "env-cache-size": Rule(),
    "min-free-disk": Rule(),
    "secrets": Rule(_each(r"[A-Za-z_][A-Za-z0-9_]*=([A-Za-z0-9_-]+|projects/[a-z0-9.:-]+/secrets/[A-Za-z0-9_-]+"
                          r"(/versions/(latest|[0-9]+))?)",
                          "'{}' is not NAME=SECRET_ID or NAME=projects/P/secrets/S[/versions/V]")),
    "bake-environments": Rule(_each(GCS_BUCKET + r"/[A-Za-z0-9._~/+%=-]+", "'{}' is not a gs://BUCKET/OBJECT URL")),
}
"""The metadata a VM takes, by the node flag it becomes (or, for `secrets` and `bake-environments`, by name)."""


@dataclass(frozen=True)
class Given:
    """One metadata attribute's value, and the flag (or rule) it is for."""

    key: str
    flag: str
    value: str


def problems_of(role: str, given: Sequence[Given], service_user: str) -> tuple[list[str], Settings | None]:
    """Each problem as "metadata attribute KEY: PROBLEM", and the node's settings when there is none."""
    problems = []
    values: dict[str, object] = {}
    for item in given:
        found = _value_problems(role, item, service_user)
        problems += [f"metadata attribute {item.key}: {problem}" for problem in found]
        option = OPTION.get(item.flag)
        if not found and option and item.value:
            values[option.dest] = item.value.split() if option.repeatable else option.convert(item.value)
    if problems or role != "node":
        return problems, None
    values.pop("run_as", None)  # the user is made after this check; the node looks it up when it starts
    try:
        return [], settings_from(_with_defaults(values), {})
    except SettingError as exc:
        key = next((item.key for item in given if item.flag == exc.flag), "")
        return [f"metadata attribute {key}: {exc.problem}" if key else f"metadata: {exc}"], None


def _value_problems(role: str, item: Given, service_user: str) -> list[str]:
    rule = VM_RULES[item.flag]
    if re.search(r"[\x00-\x1f\x7f]", item.value):
        return ["contains control characters (newline, tab, ...)"]
    if not item.value.strip():
        return [rule.missing or f"is missing or empty (it is required for poltergust-role={role})"] \
            if role in rule.required else []
    option = OPTION.get(item.flag)
    if option and not option.repeatable:
        try:
            problem = option.problem(option.convert(item.value))
        except SettingError as exc:
            problem = exc
        if problem:
            return [problem.problem]
    return rule.check(item.value, service_user) if rule.check else []


def _with_defaults(values: dict[str, object]) -> dict[str, object]:
    """Every option's value: the given ones, and the node's defaults (as without any variable) for the rest."""
    return {option.dest: values.get(option.dest, option.initial({})) for option in OPTION.values()}


def _summary(settings: Settings) -> str:
    paths = " ".join(location.url() for location in settings.locations)
    return (f"metadata checked: the node watches {paths} with luigid {settings.scheduler_url}, "
            f"topic {settings.topic}, project {settings.project}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m poltergust.deploy", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-metadata", help="check a VM's metadata with the node's own declarations")
    check.add_argument("--role", required=True, choices=["node", "scheduler", "bake"])
    check.add_argument("--service-user", default="poltergust", help="the node's own user, which pipelines may "
                                                                    "not run as (default: %(default)s)")
    check.add_argument("--value", nargs=3, action="append", default=[], metavar=("KEY", "FLAG", "VALUE"),
                       help=f"a metadata attribute, the node flag or rule it is for ({', '.join(VM_RULES)}), "
                            "and its value (empty: not set); repeatable")
    args = parser.parse_args(argv)
    unknown = sorted({flag for _, flag, _ in args.value} - set(VM_RULES))
    if unknown:
        parser.error(f"--value: no rule for {', '.join(unknown)} (known: {', '.join(VM_RULES)})")
    problems, settings = problems_of(args.role, [Given(*value) for value in args.value], args.service_user)
    for problem in problems:
        print(f"check-metadata: {problem}", file=sys.stderr)
    if problems:
        return 2
    print(_summary(settings) if settings else f"metadata checked for poltergust-role={args.role}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
