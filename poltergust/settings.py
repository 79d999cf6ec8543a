"""The node's settings: each declared once, as a field of `Settings` with its flag, variable, default and help.

Every flag can also be given as a POLTERGUST_* environment variable (the
flag name in capitals, dashes as underscores), which is how the systemd unit
and container deployments configure nodes. The parser, the README's table of
flags (`python -m poltergust.settings --markdown`) and the deploy's metadata
check (`poltergust.deploy`) are all made from the declarations below; what
follows from other settings (locations, directories, the topic, the shared
environments' key, the pipelines' user, the notify target) is `settings_from`'s.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, MutableMapping, Sequence

from poltergust.environments import parse_size
from poltergust.launch.sandbox import RunAsError
from poltergust.launch.users import UserPool
from poltergust.layout import Location, safe_name
from poltergust.luigid.configuration import LuigidConfigError, parse_fragment
from poltergust.node.notify import NotifyTarget, notify_target
from poltergust.option import Check, SettingError, add_options, boolean, markdown_table, option, options_of

DEFAULT_ROOT = Path.home() / ".local" / "share" / "poltergust"
"""Below it: `nodes/NODE/` (a node's own files, by default) and `environments/` (shared by the host's nodes)."""


def default_data_dir(node_name: str) -> Path:
    """A node's own directory by default, so nodes sharing a host never mix their run files."""
    return DEFAULT_ROOT / "nodes" / safe_name(node_name)


def _seconds_between(low: float, high: float) -> Check:
    return lambda value: None if low <= value <= high else f"must be {low:g} to {high:g} seconds (got {value:g})"


def _at_least_seconds(low: float) -> Check:
    return lambda value: None if value >= low else f"must be at least {low:g} seconds (got {value:g})"


@dataclass(frozen=True)
class Settings:
    """One node's settings; each field declares its option: flag, variable, default, parsing, check and help."""

    locations: list[Location] = field(metadata=option(
        "path", metavar="URL", repeatable=True,
        help="pipeline prefix to watch: `gs://BUCKET/PREFIX`, or a local directory (`file:///DIR` or a plain "
             "path); repeatable (in the variable: separated by spaces)"))
    node_name: str = field(metadata=option(
        "node-name", metavar="NAME", fallback=lambda environ: socket.gethostname(),
        shown_default="the host name", help="this node's name, used in log object names and claims"))
    data_dir: Path = field(metadata=option(
        "data-dir", metavar="DIR", shown_default="`~/.local/share/poltergust/nodes/NODE`",
        help="directory for run logs and luigi working directories"))
    env_dir: Path = field(metadata=option(
        "env-dir", metavar="DIR",
        shown_default="`DATA_DIR/environments`, or `~/.local/share/poltergust/environments` without `--data-dir`",
        help="directory where environments are built and cached, shareable by the host's nodes"))
    scheduler_url: str = field(default="", metadata=option(
        "scheduler-url", metavar="URL",
        help="URL of the luigi central scheduler (luigid) all nodes share; without it, a local luigid on "
             "127.0.0.1 (`--embedded-scheduler-port`), started by the first local node (which stops it when it "
             "exits) and joined by the others"))
    embedded_scheduler_port: int = field(default=8082, metadata=option(
        "embedded-scheduler-port", parse=int, metavar="PORT",
        help="port of the local luigid used without `--scheduler-url`"))
    scheduler_config: str = field(default="", metadata=option(
        "scheduler-config", metavar="FILE",
        help="a luigi configuration file (`[scheduler]`, `[resources]`, `[task_history]`, ...) for the local luigid "
             "this node starts without `--scheduler-url`, merged with the settings the fleet needs; checked at "
             "start (see Luigi on the fleet)"))
    project: str = field(default="", metadata=option(
        "project", metavar="PROJECT", fallback=lambda environ: environ.get("GOOGLE_CLOUD_PROJECT", ""),
        shown_default="`GOOGLE_CLOUD_PROJECT`",
        help="Google Cloud project of the notification topic and the subscriptions (gs:// paths only)"))
    topic: str = field(default="", metadata=option(
        "topic", metavar="TOPIC", shown_default="`poltergust-BUCKET` for the first `--path`",
        help="Pub/Sub topic receiving the bucket's notifications"))
    subscription: str = field(default="", metadata=option(
        "subscription", metavar="NAME",
        shown_default="`poltergust-NODE-HASH`, from the node name, the topic and the paths",
        help="this node's subscription on the topic, created if missing; an existing one on another topic or "
             "with another filter is refused (and left as it is)"))
    backlog_subscription: str = field(default="", metadata=option(
        "backlog-subscription", metavar="NAME", shown_default="none",
        help="the backlog subscription all nodes share on the topic, created if missing: a config's message "
             "stays in it until the config is finished, and the fleet's autoscaler counts its undelivered "
             "messages (gs:// paths only)"))
    backlog_ack_deadline: int = field(default=60, metadata=option(
        "backlog-ack-deadline", parse=int, metavar="SECONDS", check=_seconds_between(10, 600),
        help="seconds a held backlog message is leased at a time (10 to 600): a killed node's configs return "
             "to the backlog within about this long"))
    backlog_max_lease: float = field(default=86400.0, metadata=option(
        "backlog-max-lease", parse=float, metavar="SECONDS",
        help="seconds a node holds a backlog message at most, the longest a pipeline may run before another "
             "node is offered it"))
    env_cache_size: int | None = field(default=None, metadata=option(
        "env-cache-size", parse=parse_size, metavar="SIZE", shown_default="none",
        help="disk budget of the environment cache, such as `500M` or `10G` (0: none); beyond it the least "
             "recently used environments not in use are removed"))
    share_environments: bool = field(default=False, metadata=option(
        "share-environments", parse=boolean, switch=True,
        help="upload each environment this node builds beside its environment file, and unpack such an archive "
             "instead of building (true or false)"))
    share_key: bytes | None = field(default=None, repr=False, metadata=option(
        "share-environments-key-env", metavar="NAME",
        help="name of the environment variable holding the key that signs shared environments (at least 16 "
             "characters, the same on every node); required by `--share-environments`, and removed from the "
             "node's environment at start so that installers and luigi do not inherit it"))
    max_concurrent: int = field(default=4, metadata=option(
        "max-concurrent", parse=int, metavar="N", help="pipelines this node runs at once"))
    rescan_interval: float = field(default=300.0, metadata=option(
        "rescan-interval", parse=float, metavar="SECONDS",
        help="seconds between full rescans of the prefixes (the safety net for lost events)"))
    outage_limit: float = field(default=600.0, metadata=option(
        "outage-limit", parse=float, metavar="SECONDS",
        help="seconds a storage or scheduler outage is waited out before a run ends as an error"))
    claim_grace: float = field(default=60.0, metadata=option(
        "claim-grace", parse=float, metavar="SECONDS",
        help="seconds a run claimed by another node is left to it before this node completes it"))
    start_stale_after: float = field(default=180.0, metadata=option(
        "start-stale-after", parse=float, metavar="SECONDS", check=_at_least_seconds(3),
        help="seconds after which a run's start marker that its starting node stopped refreshing counts as that "
             "of a dead node, and a standing-by node takes the run over at its next check; the starter refreshes "
             "it, and standing-by nodes check it, every third of this (or every `--rescan-interval` if shorter). "
             "At least 3; use the same value on every node: a node with a shorter window would take over runs "
             "whose starters are alive"))
    log_upload_interval: float = field(default=30.0, metadata=option(
        "log-upload-interval", parse=float, metavar="SECONDS",
        help="seconds between refreshes of a running pipeline's log in the bucket (always at its start and end)"))
    heartbeat_interval: float = field(default=60.0, metadata=option(
        "heartbeat-interval", parse=float, metavar="SECONDS",
        help="seconds between this node's heartbeats (`_poltergust/nodes/NODE.json` in each bucket), which the "
             "dashboard shows"))
    notify: NotifyTarget | None = field(default=None, metadata=option(
        "notify-url", metavar="URL",
        help="on each finished run, the claiming node POSTs a JSON summary here (a `DB_URL` variable instead "
             "gets the original GET with `pipeline_url`)"))
    secret_env: list[str] = field(default_factory=list, metadata=option(
        "secret-env", metavar="NAME", repeatable=True,
        help="a node variable that is a secret: never passed to pipelines, masked in every log and result "
             "(besides `{{NAME}}` references and names with TOKEN, SECRET, PASSWORD...); repeatable"))
    secrets_file: str = field(default="", metadata=option(
        "secrets-file", metavar="PATH",
        help="a file of `NAME=VALUE` lines read at start (systemd's `LoadCredential=`, say), so that secrets never "
             "sit in the node's environment: each NAME counts as a `--secret-env` variable (for `{{NAME}}` in "
             "environment files and `--share-environments-key-env`)"))
    file_secrets: dict[str, str] = field(default_factory=dict, repr=False)
    """Secrets read from --secrets-file at start: like node variables named by --secret-env, never in os.environ."""
    pipeline_service_account: str = field(default="", metadata=option(
        "pipeline-service-account", metavar="EMAIL", shown_default="none",
        help="give each run Google credentials of this service account (not the node's): a metadata endpoint on "
             "loopback, in the run's `GCE_METADATA_HOST`, serving tokens the node mints by impersonation"))
    iam_credentials_url: str = field(default="https://iamcredentials.googleapis.com", metadata=option(
        "iam-credentials-url", metavar="URL", help="the IAM Credentials API that mints those tokens"))
    allowed_environment_prefixes: list[str] = field(default_factory=list, metadata=option(
        "allowed-environment-prefix", metavar="URL", repeatable=True,
        shown_default="the buckets of `--path`",
        help="URL prefix environment files may be read from; repeatable"))
    run_as: UserPool | None = field(default=None, metadata=option(
        "run-as", metavar="USER",
        help="run pipelines and builds as this unprivileged user, each in a sandbox and a private working "
             "directory (the node must run as root); without it pipelines share the node's user and trust domain"))
    run_as_pool: int = field(default=1, metadata=option(
        "run-as-pool", parse=int, metavar="N",
        help="with `--run-as USER`: run pipelines and builds as `USER-1` ... `USER-N`, one user per run or build "
             "at a time (1: `USER` alone, so one run or build at a time)"))
    warm: bool = field(default=True, metadata=option(
        "warm", parse=boolean, switch=True,
        help="start luigi from a warm interpreter per environment, forked for each run, instead of a fresh "
             "python every time (true or false; see Warm starts)"))
    warm_idle_seconds: float = field(default=600.0, metadata=option(
        "warm-idle-seconds", parse=float, metavar="SECONDS",
        help="stop an environment's warm interpreter after this many seconds without a run"))
    warm_prestart: bool = field(default=False, metadata=option(
        "warm-prestart", parse=boolean, switch=True,
        help="start an environment's warm interpreter as soon as a run has the environment, rather than when "
             "luigi starts (true or false)"))
    min_free_disk: int | None = field(default=None, metadata=option(
        "min-free-disk", parse=parse_size, metavar="SIZE", shown_default="no check",
        help="`/healthz` answers 503 while the disk of `--data-dir` or `--env-dir` has less free space than "
             "this, such as `2G` (0: no check), so that autohealing replaces a node that can no longer build "
             "environments"))
    http_host: str = field(default="127.0.0.1", metadata=option(
        "http-host", metavar="HOST",
        help="address of the health server; 0.0.0.0 lets a load balancer reach it"))
    http_port: int = field(default=0, metadata=option(
        "http-port", parse=int, metavar="PORT",
        help="serve `GET /healthz` on this port (0: no health server): 200 while the event stream is attached, "
             "503 with the reason while it is not (the node keeps trying to attach, and keeps scanning meanwhile) "
             "or the disk is nearly full; a stalled node does not answer"))
    log_level: str = field(default="INFO", metadata=option(
        "log-level", metavar="LEVEL", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level of the node's own log: DEBUG, INFO, WARNING or ERROR"))
    log_format: str = field(default="auto", metadata=option(
        "log-format", metavar="FORMAT", choices=("auto", "json", "text"),
        help="the node's own log: `json` lines (Cloud Logging fields), readable `text`, or `auto`: JSON unless "
             "stderr is a terminal"))

    @property
    def environment_prefixes(self) -> list[str]:
        return self.allowed_environment_prefixes or [loc.bucket for loc in self.locations]


OPTIONS = options_of(Settings)
OPTION = {each.flag: each for each in OPTIONS}
_FIELD_OF = {each.metadata["option"].dest: each.name
             for each in dataclasses.fields(Settings) if "option" in each.metadata}


def build_parser(environ: Mapping[str, str] | None = None,
                 prog: str = "python -m poltergust.async_worker") -> argparse.ArgumentParser:
    """The node's flags, each defaulting to its variable in `environ` (the process's environment by default)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run one Poltergust node: watch pipeline prefixes for *.config.yaml and run them with luigi. "
                    "Each flag can also be set through the environment variable shown with it.",
    )
    add_options(parser, OPTIONS, os.environ if environ is None else environ)
    return parser


def parse_settings(argv: Sequence[str] | None = None, environ: MutableMapping[str, str] | None = None,
                   prog: str = "python -m poltergust.async_worker") -> Settings:
    """Settings from the command line and the environment; exits with a usage error for bad values."""
    environ = os.environ if environ is None else environ
    parser = build_parser(environ, prog)
    values = vars(parser.parse_args(argv))
    for each in OPTIONS:
        if each.repeatable and values[each.dest] is None:
            values[each.dest] = each.initial(environ)
    try:
        return settings_from(values, environ)
    except SettingError as exc:
        parser.error(str(exc))


def readme_table() -> str:
    """The README's table of the node's flags (tests/test_settings.py keeps README.md equal to it)."""
    return markdown_table(OPTIONS)


def settings_from(values: Mapping[str, Any], environ: MutableMapping[str, str]) -> Settings:
    """The settings from every option's value (by `Option.dest`): checked, and all derived values made here.

    Raises SettingError for the first bad value. Looks up the pipelines' user (--run-as) and takes the key
    of shared environments out of `environ`: the node's own process environment.
    """
    if not values["path"]:
        raise SettingError("path", "is required", "--path is required (or set POLTERGUST_PATH)")
    try:
        locations = [Location.parse(url) for url in values["path"]]
    except ValueError as exc:
        raise SettingError("path", str(exc), str(exc)) from None
    try:
        allowed = [Location.parse(url).url() for url in values["allowed_environment_prefix"]]
    except ValueError as exc:
        raise SettingError("allowed-environment-prefix", str(exc), str(exc)) from None
    if len({loc.is_gcs for loc in locations}) > 1:
        raise SettingError("path", "one node watches either buckets or local directories, not both")
    if locations[0].is_gcs and not values["project"]:
        raise SettingError("project", "is required for gs:// paths", "--project is required for gs:// paths "
                           "(or set POLTERGUST_PROJECT or GOOGLE_CLOUD_PROJECT)")
    if values["backlog_subscription"] and not locations[0].is_gcs:
        raise SettingError("backlog-subscription", "only for gs:// paths (a local directory has no backlog)")
    for each in OPTIONS:
        problem = each.problem(values[each.dest])
        if problem:
            raise problem
    given_data_dir = values["data_dir"]
    data_dir = Path(given_data_dir).expanduser() if given_data_dir else default_data_dir(values["node_name"])
    if values["env_dir"]:
        env_dir = Path(values["env_dir"]).expanduser()
    else:
        env_dir = data_dir / "environments" if given_data_dir else DEFAULT_ROOT / "environments"
    file_secrets = _file_secrets(values["secrets_file"]) if values["secrets_file"] else {}
    derived = {
        "locations": locations,
        "allowed_environment_prefixes": allowed,
        "data_dir": data_dir,
        "env_dir": env_dir,
        "topic": values["topic"] or f"poltergust-{locations[0].bucket.rsplit('/', 1)[-1]}",
        "share_key": _share_key(values["share_environments"], values["share_environments_key_env"], environ,
                                file_secrets),
        "file_secrets": file_secrets,
        "secret_env": [*values["secret_env"], *file_secrets],
        "run_as": _run_as(values["run_as"], values["run_as_pool"]),
        "scheduler_config": _scheduler_config(values["scheduler_config"], values["scheduler_url"]),
        "notify": notify_target(values["notify_url"], environ.get("DB_URL")),
    }
    fields = {_FIELD_OF[dest]: value for dest, value in values.items()}
    fields.update(derived)
    return Settings(**fields)


def _run_as(user: str | None, pool: int) -> UserPool | None:
    if pool != 1 and not user:
        raise SettingError("run-as-pool", "only with --run-as USER (the pool's users are USER-1 ... USER-N)")
    try:
        return UserPool.lookup(user, pool) if user else None
    except RunAsError as exc:
        raise SettingError("run-as", str(exc), str(exc)) from None


def _file_secrets(path: str) -> dict[str, str]:
    """NAME=VALUE lines of --secrets-file (blank lines and # comments skipped); a bad line is named, never shown."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingError("secrets-file", f"{path}: cannot read it: {exc}", f"--secrets-file {path}: cannot read "
                           f"it: {exc}") from None
    secrets = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, equals, value = line.partition("=")
        if not equals or not name.isidentifier():
            raise SettingError("secrets-file", f"{path}: line {number} is not NAME=VALUE")
        secrets[name] = value
    return secrets


def _share_key(sharing: bool, name: str | None, environ: MutableMapping[str, str],
               file_secrets: dict[str, str]) -> bytes | None:
    """The key signing shared environments, taken out of the node's environment (or --secrets-file); None when not
    sharing."""
    key = environ.pop(name, "") if name else ""
    key = file_secrets.get(name, key) if name else key
    if not sharing:
        return None
    if not name:
        raise SettingError("share-environments", "needs --share-environments-key-env NAME",
                           "--share-environments needs --share-environments-key-env NAME: the variable NAME holds "
                           "the key that signs shared environments, so that nodes only use archives other nodes made")
    if len(key) < 16:
        raise SettingError("share-environments-key-env", f"the variable {name} is missing or too short",
                           f"--share-environments-key-env {name}: the variable {name} "
                           f"{'is not set' if not key else 'is too short'}; it must hold a key of at least 16 "
                           "characters")
    return key.encode()


def _scheduler_config(path: str, scheduler_url: str) -> str:
    """The --scheduler-config file's text, checked now so that a key luigid would not take stops the node first."""
    if not path:
        return ""
    if scheduler_url:
        raise SettingError("scheduler-config", "only for the local luigid started without --scheduler-url; the "
                           "fleet's luigid takes its configuration from the deploy (poltergust-luigid-config)")
    try:
        text = Path(path).expanduser().read_text()
        parse_fragment(text)
    except (OSError, UnicodeDecodeError, LuigidConfigError) as exc:
        raise SettingError("scheduler-config", f"{path}: {exc}", f"--scheduler-config {path}: {exc}") from None
    return text


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m poltergust.settings --markdown  (prints README.md's table of the node's flags)")
    print(readme_table(), end="")
