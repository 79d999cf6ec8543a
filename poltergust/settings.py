"""The node's settings: every flag (and its POLTERGUST_* variable) parsed and checked once, into one value.

Every flag can also be given as a POLTERGUST_* environment variable (the
flag name in capitals, dashes as underscores), which is how the systemd unit
and container deployments configure nodes.
"""
from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from poltergust.layout import Location, safe_name
from poltergust.node.notify import NotifyTarget, notify_target
from poltergust.launch.sandbox import RunAs, RunAsError
from poltergust.environments import parse_size

DEFAULT_SCHEDULER_PORT = 8082
DEFAULT_ROOT = Path.home() / ".local" / "share" / "poltergust"
"""Below it: `nodes/NODE/` (a node's own files, by default) and `environments/` (shared by the host's nodes)."""


def default_data_dir(node_name: str) -> Path:
    """A node's own directory by default, so nodes sharing a host never mix their run files."""
    return DEFAULT_ROOT / "nodes" / safe_name(node_name)


@dataclass(frozen=True)
class Settings:
    locations: list[Location]
    node_name: str
    data_dir: Path
    env_dir: Path
    scheduler_url: str = ""
    """Empty: the node starts or joins a local luigid on `embedded_scheduler_port`."""
    embedded_scheduler_port: int = DEFAULT_SCHEDULER_PORT
    project: str = ""
    topic: str = ""
    subscription: str = ""
    """Empty: derived from the node name, the topic and the prefixes (see `events.pubsub`)."""
    backlog_subscription: str = ""
    """The subscription all nodes share and the autoscaler reads (see `backlog`); empty: none."""
    backlog_ack_deadline: int = 60
    backlog_max_lease: float = 86400.0
    env_cache_size: int | None = None
    share_environments: bool = False
    share_key: bytes | None = field(default=None, repr=False)
    """Signs and checks shared environment archives (from the variable --share-environments-key-env names)."""
    max_concurrent: int = 4
    rescan_interval: float = 300.0
    outage_limit: float = 600.0
    """How long a storage or scheduler outage is ridden out before a run gives up."""
    claim_grace: float = 60.0
    """How long a claim by another node is left to that node before anyone else completes it."""
    start_stale_after: float = 180.0
    """A run's start marker not refreshed for this long is its dead starter's: a standing-by node takes over."""
    log_upload_interval: float = 30.0
    """A run's log is refreshed in the bucket this often while it runs (and always at its end)."""
    heartbeat_interval: float = 60.0
    notify: NotifyTarget | None = None
    secret_env: list[str] = field(default_factory=list)
    """Node variables that are secrets beyond those found by name (see `secret_env`)."""
    file_secrets: dict[str, str] = field(default_factory=dict, repr=False)
    """Secrets read from --secrets-file at start: like node variables named by --secret-env, never in os.environ."""
    allowed_environment_prefixes: list[str] = field(default_factory=list)
    """URL prefixes environment files may come from; empty means the pipelines' own buckets."""
    pipeline_service_account: str = ""
    """Runs get this account's tokens from a metadata endpoint of their own (see `run.credentials`); empty: none."""
    iam_credentials_url: str = "https://iamcredentials.googleapis.com"
    run_as: RunAs | None = None
    """Run luigi as this unprivileged user (the node runs as root); None: as the node's own user."""
    warm: bool = True
    """Start luigi from a warm interpreter per environment (see `warm`) rather than afresh each time."""
    warm_idle_seconds: float = 600.0
    warm_prestart: bool = False
    min_free_disk: int | None = None
    """/healthz fails while the data or environment disk has less free space (None: no check)."""
    http_host: str = "127.0.0.1"
    http_port: int = 0
    log_level: str = "INFO"
    log_format: str = "auto"

    @property
    def environment_prefixes(self) -> list[str]:
        return self.allowed_environment_prefixes or [loc.bucket for loc in self.locations]


def _variable(flag: str) -> str:
    return "POLTERGUST_" + flag.upper().replace("-", "_")


def _boolean(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m poltergust.async_worker",
        description="Run one Poltergust node: watch pipeline prefixes for *.config.yaml and run them with luigi. "
                    "Each flag can also be set through the environment variable shown with it.",
    )

    def add(flag: str, help: str, default: object = None, **kwargs: object) -> None:
        name = _variable(flag)
        if kwargs.get("action") == "append":
            default = None  # filled from the variable after parsing, so flags replace it
            shown = ""
        else:
            default = os.environ.get(name, default)
            shown = f" (default: {default})" if default is not None else ""
        parser.add_argument(f"--{flag}", default=default, help=f"{help}{shown} [{name}]", **kwargs)  # type: ignore[arg-type]

    add("path", "pipeline prefix to watch: gs://BUCKET/PREFIX, or a local directory (file:///DIR or a plain "
                "path); repeat for several (in the variable: separated by spaces)", action="append", metavar="URL")
    add("scheduler-url", "URL of the luigi central scheduler (luigid) all nodes share (default: a local luigid "
                         "on 127.0.0.1, started by the first local node and joined by the others)",
        metavar="URL")
    add("embedded-scheduler-port", "port of the local luigid used when --scheduler-url is not given",
        type=int, default=DEFAULT_SCHEDULER_PORT)
    add("node-name", "this node's name, used in log object names and claims", default=socket.gethostname())
    add("project", "Google Cloud project of the notification topic and the subscription (gs:// paths only)",
        default=os.environ.get("GOOGLE_CLOUD_PROJECT"))
    add("topic", "Pub/Sub topic receiving the bucket's notifications (default: poltergust-BUCKET "
                 "for the first --path)")
    add("subscription", "this node's subscription on the topic, created if missing (default: derived from the "
                        "node name, the topic and the paths)")
    add("backlog-subscription", "the backlog subscription all nodes share on the topic, created if missing: a "
                                "config's message stays in it until the config is finished, and the fleet's "
                                "autoscaler counts its undelivered messages (default: none)", metavar="NAME")
    add("backlog-ack-deadline", "seconds a held backlog message is leased at a time (10 to 600): a killed node's "
                                "configs return to the backlog within about this long", type=int, default=60)
    add("backlog-max-lease", "seconds a node holds a backlog message at most, the longest a pipeline may run "
                             "before another node is offered it", type=float, default=86400.0)
    add("data-dir", f"directory for run logs and luigi working directories (default: {DEFAULT_ROOT}/nodes/NODE)")
    add("env-dir", "directory where environments are built and cached, shareable by the host's nodes "
                   f"(default: DATA_DIR/environments, or {DEFAULT_ROOT}/environments without --data-dir)")
    add("env-cache-size", "disk budget of the environment cache, such as 500M or 10G (0: none); beyond it the "
                          "least recently used environments not in use are removed", default="0", type=parse_size)
    add("share-environments", "upload each environment this node builds beside its environment file, and unpack "
                              "such an archive instead of building (true or false)", default="false",
        type=_boolean, nargs="?", const="true")
    add("share-environments-key-env", "name of the environment variable holding the key that signs shared "
                                      "environments (at least 16 characters, the same on every node); required "
                                      "by --share-environments, and removed from the node's environment at start "
                                      "so that installers and luigi do not inherit it", metavar="NAME")
    add("max-concurrent", "pipelines this node runs at once", type=int, default=4)
    add("rescan-interval", "seconds between full rescans of the prefixes (the safety net for lost events)",
        type=float, default=300.0)
    add("outage-limit", "seconds a storage or scheduler outage is waited out before a run ends as an error",
        type=float, default=600.0)
    add("claim-grace", "seconds a run claimed by another node is left to it before this node completes it",
        type=float, default=60.0)
    add("start-stale-after", "seconds after which a run's start marker that its starting node stopped refreshing "
                             "counts as that of a dead node, and a standing-by node takes the run over at its next "
                             "check; the starter refreshes it, and standing-by nodes check it, every third of this "
                             "(or every --rescan-interval if shorter). The same on every node, at least 3", type=float, default=180.0)
    add("log-upload-interval", "seconds between refreshes of a running pipeline's log in the bucket",
        type=float, default=30.0)
    add("heartbeat-interval", "seconds between this node's heartbeats (_poltergust/nodes/NODE.json in each bucket), "
                              "which the dashboard shows", type=float, default=60.0)
    add("secret-env", "a node variable that is a secret: never passed to pipelines, masked in every log and result "
                      "(besides {{NAME}} references and names with TOKEN, SECRET, PASSWORD...); repeatable",
        action="append", metavar="NAME")
    add("secrets-file", "a file of NAME=VALUE lines read at start (systemd's LoadCredential=, say), so that "
                        "secrets never sit in the node's environment: each NAME counts as a --secret-env variable "
                        "(for {{NAME}} in environment files and --share-environments-key-env)", metavar="PATH")
    add("pipeline-service-account", "give each run Google credentials of this service account (not the node's): "
                                    "a metadata endpoint on loopback, in the run's GCE_METADATA_HOST, serving "
                                    "tokens the node mints by impersonation (default: none)", metavar="EMAIL")
    add("iam-credentials-url", "the IAM Credentials API that mints those tokens",
        default="https://iamcredentials.googleapis.com", metavar="URL")
    add("run-as", "run pipelines as this unprivileged user, each in a private working directory (the node must "
                  "run as root); without it pipelines share the node's user and trust domain", metavar="USER")
    add("allowed-environment-prefix", "URL prefix environment files may be read from; repeatable "
                                      "(default: the buckets of --path)", action="append", metavar="URL")
    add("warm", "start luigi from a warm interpreter per environment, forked for each run, instead of a fresh "
                "python every time (true or false)", default="true", type=_boolean, nargs="?", const="true")
    add("warm-idle-seconds", "stop an environment's warm interpreter after this many seconds without a run",
        type=float, default=600.0)
    add("warm-prestart", "start an environment's warm interpreter as soon as a run has the environment, rather "
                         "than when luigi starts (true or false)", default="false", type=_boolean, nargs="?",
        const="true")
    add("min-free-disk", "/healthz fails while the data or environment directory's disk has less free space than "
                         "this, such as 2G (0: no check)", default="0", type=parse_size)
    add("http-port", "serve GET /healthz on this port (0: no health server)", type=int, default=0)
    add("http-host", "address of the health server; 0.0.0.0 lets a load balancer reach it", default="127.0.0.1")
    add("log-level", "logging level of the node's own log", default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add("log-format", "the node's own log: JSON lines (Cloud Logging fields), readable text, or auto: "
                      "JSON unless stderr is a terminal", default="auto", choices=["auto", "json", "text"])
    add("notify-url", "on each finished run, the claiming node POSTs a JSON summary here (a DB_URL variable "
                      "instead gets the original GET with pipeline_url)", metavar="URL")
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Settings from the command line and the environment; exits with a usage error for bad values."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("path", "allowed-environment-prefix", "secret-env"):
        attribute = flag.replace("-", "_")
        if getattr(args, attribute) is None:
            setattr(args, attribute, os.environ.get(_variable(flag), "").split())
    if not args.path:
        parser.error("--path is required (or set POLTERGUST_PATH)")
    try:
        locations = [Location.parse(url) for url in args.path]
        allowed = [Location.parse(url).url() for url in args.allowed_environment_prefix]
    except ValueError as exc:
        parser.error(str(exc))
    if len({loc.is_gcs for loc in locations}) > 1:
        parser.error("--path: one node watches either buckets or local directories, not both")
    if locations[0].is_gcs and not args.project:
        parser.error("--project is required for gs:// paths (or set POLTERGUST_PROJECT or GOOGLE_CLOUD_PROJECT)")
    if args.backlog_subscription and not locations[0].is_gcs:
        parser.error("--backlog-subscription: only for gs:// paths (a local directory has no backlog)")
    if not 10 <= args.backlog_ack_deadline <= 600:
        parser.error(f"--backlog-ack-deadline: must be 10 to 600 seconds (got {args.backlog_ack_deadline})")
    if args.start_stale_after < 3:
        parser.error(f"--start-stale-after: must be at least 3 seconds (got {args.start_stale_after:g})")
    file_secrets = _file_secrets(args.secrets_file, parser) if args.secrets_file else {}
    share_key = _share_key(args, parser, file_secrets)
    try:
        run_as = RunAs.lookup(args.run_as) if args.run_as else None
    except RunAsError as exc:
        parser.error(str(exc))
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir(args.node_name)
    if args.env_dir:
        env_dir = Path(args.env_dir).expanduser()
    else:
        env_dir = data_dir / "environments" if args.data_dir else DEFAULT_ROOT / "environments"
    return Settings(
        locations=locations,
        node_name=args.node_name,
        data_dir=data_dir,
        env_dir=env_dir,
        scheduler_url=args.scheduler_url or "",
        embedded_scheduler_port=args.embedded_scheduler_port,
        project=args.project or "",
        topic=args.topic or f"poltergust-{locations[0].bucket.rsplit('/', 1)[-1]}",
        subscription=args.subscription or "",
        backlog_subscription=args.backlog_subscription or "",
        backlog_ack_deadline=args.backlog_ack_deadline,
        backlog_max_lease=args.backlog_max_lease,
        env_cache_size=args.env_cache_size,
        share_environments=args.share_environments,
        share_key=share_key,
        max_concurrent=args.max_concurrent,
        rescan_interval=args.rescan_interval,
        outage_limit=args.outage_limit,
        claim_grace=args.claim_grace,
        start_stale_after=args.start_stale_after,
        log_upload_interval=args.log_upload_interval,
        heartbeat_interval=args.heartbeat_interval,
        notify=notify_target(args.notify_url, os.environ.get("DB_URL")),
        secret_env=[*args.secret_env, *file_secrets],
        file_secrets=file_secrets,
        run_as=run_as,
        pipeline_service_account=args.pipeline_service_account or "",
        iam_credentials_url=args.iam_credentials_url,
        allowed_environment_prefixes=allowed,
        warm=args.warm,
        warm_idle_seconds=args.warm_idle_seconds,
        warm_prestart=args.warm_prestart,
        min_free_disk=args.min_free_disk,
        http_host=args.http_host,
        http_port=args.http_port,
        log_level=args.log_level,
        log_format=args.log_format,
    )


def _file_secrets(path: str, parser: argparse.ArgumentParser) -> dict[str, str]:
    """NAME=VALUE lines of --secrets-file (blank lines and # comments skipped); exits naming a bad line."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"--secrets-file {path}: cannot read it: {exc}")
    secrets = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, equals, value = line.partition("=")
        if not equals or not name.isidentifier():
            parser.error(f"--secrets-file {path}: line {number} is not NAME=VALUE")  # the value is never shown
        secrets[name] = value
    return secrets


def _share_key(args: argparse.Namespace, parser: argparse.ArgumentParser,
               file_secrets: dict[str, str]) -> bytes | None:
    """The key signing shared environments, taken out of the node's environment; None when not sharing."""
    name = args.share_environments_key_env
    key = os.environ.pop(name, "") if name else ""
    key = file_secrets.get(name, key) if name else key
    if not args.share_environments:
        return None
    if not name:
        parser.error("--share-environments needs --share-environments-key-env NAME: the variable NAME holds the key "
                     "that signs shared environments, so that nodes only use archives other nodes made")
    if len(key) < 16:
        parser.error(f"--share-environments-key-env {name}: the variable {name} "
                     f"{'is not set' if not key else 'is too short'}; it must hold a key of at least 16 characters")
    return key.encode()
