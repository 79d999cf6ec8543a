"""Run one Poltergust node: `python -m poltergust.async_worker --path gs://BUCKET/pipeline ...`.

Every flag can also be given as a POLTERGUST_* environment variable (the flag
name in capitals, dashes as underscores), which is how the systemd unit and
container deployments configure nodes.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Sequence

import uvloop

from .environments import Environments, parse_size
from .events import EventSource, PubSubEvents, default_subscription
from . import logs
from .health import health_server
from .localdir import LocalEvents
from .notify import notify_target
from .scheduler import DEFAULT_PORT, embedded_scheduler
from .storage import Location, open_store
from .worker import Node, Settings

log = logging.getLogger("poltergust")


def _env(flag: str) -> str:
    return "POLTERGUST_" + flag.upper().replace("-", "_")


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m poltergust.async_worker",
        description="Run one Poltergust node: watch pipeline prefixes for *.config.yaml and run them with luigi. "
                    "Each flag can also be set through the environment variable shown with it.",
    )

    def add(flag: str, help: str, default: object = None, **kwargs: object) -> None:
        name = _env(flag)
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
        type=int, default=DEFAULT_PORT)
    add("node-name", "this node's name, used in log object names and claims", default=socket.gethostname())
    add("project", "Google Cloud project of the notification topic and the subscription (gs:// paths only)",
        default=os.environ.get("GOOGLE_CLOUD_PROJECT"))
    add("topic", "Pub/Sub topic receiving the bucket's notifications (default: poltergust-BUCKET "
                 "for the first --path)")
    add("subscription", "this node's subscription on the topic, created if missing (default: poltergust-NODE)")
    add("data-dir", "directory for run logs and luigi working directories",
        default=str(Path.home() / ".local" / "share" / "poltergust"))
    add("env-dir", "directory where environments are built and cached (default: DATA_DIR/environments)")
    add("env-cache-size", "disk budget of the environment cache, such as 500M or 10G (0: none); beyond it the "
                          "least recently used environments not in use are removed", default="0", type=parse_size)
    add("share-environments", "upload each environment this node builds beside its environment file, and unpack "
                              "such an archive instead of building (true or false)", default="false",
        type=lambda value: value.strip().lower() in ("1", "true", "yes", "on"), nargs="?", const="true")
    add("warm", "start luigi from a warm interpreter per environment, forked for each run, instead of a fresh "
                "python every time (true or false)", default="true", type=_flag, nargs="?", const="true")
    add("warm-idle-seconds", "stop an environment's warm interpreter after this many seconds without a run",
        type=float, default=600.0)
    add("warm-prestart", "start an environment's warm interpreter as soon as a run has the environment, rather "
                         "than when luigi starts (true or false)", default="false", type=_flag, nargs="?",
        const="true")
    add("max-concurrent", "pipelines this node runs at once", type=int, default=4)
    add("rescan-interval", "seconds between full rescans of the prefixes (the safety net for lost events)",
        type=float, default=300.0)
    add("outage-limit", "seconds a storage or scheduler outage is waited out before a run ends as an error",
        type=float, default=600.0)
    add("claim-grace", "seconds a run claimed by another node is left to it before this node completes it",
        type=float, default=60.0)
    add("allowed-environment-prefix", "URL prefix environment files may be read from; repeatable "
                                      "(default: the buckets of --path)", action="append", metavar="URL")
    add("http-port", "serve GET /healthz on this port (0: no health server)", type=int, default=0)
    add("http-host", "address of the health server; 0.0.0.0 lets a load balancer reach it", default="127.0.0.1")
    add("log-level", "logging level of the node's own log", default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add("log-format", "the node's own log: JSON lines (Cloud Logging fields), readable text, or auto: "
                      "JSON unless stderr is a terminal", default="auto", choices=["auto", "json", "text"])
    add("notify-url", "on each finished run, the claiming node POSTs a JSON summary here (a DB_URL variable "
                      "instead gets the original GET with pipeline_url)", metavar="URL")
    return parser


def settings_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Settings, str, str, str]:
    """Validate the parsed flags; returns the settings plus project, topic and subscription."""
    for flag in ("path", "allowed-environment-prefix"):
        attribute = flag.replace("-", "_")
        if getattr(args, attribute) is None:
            setattr(args, attribute, os.environ.get(_env(flag), "").split())
    if not args.path:
        parser.error("--path is required (or set POLTERGUST_PATH)")
    try:
        locations = [Location.parse(url) for url in args.path]
    except ValueError as exc:
        parser.error(f"--path {exc}")
    if len({loc.bucket.startswith("gs://") for loc in locations}) > 1:
        parser.error("--path: one node watches either buckets or local directories, not both")
    if locations[0].bucket.startswith("gs://") and not args.project:
        parser.error("--project is required for gs:// paths (or set POLTERGUST_PROJECT or GOOGLE_CLOUD_PROJECT)")
    data_dir = Path(args.data_dir).expanduser()
    settings = Settings(
        locations=locations,
        scheduler_url=args.scheduler_url or "",
        embedded_scheduler_port=args.embedded_scheduler_port,
        node_name=args.node_name,
        data_dir=data_dir,
        env_dir=Path(args.env_dir).expanduser() if args.env_dir else data_dir / "environments",
        max_concurrent=args.max_concurrent,
        rescan_interval=args.rescan_interval,
        outage_limit=args.outage_limit,
        claim_grace=args.claim_grace,
        notify=notify_target(args.notify_url, os.environ.get("DB_URL")),
        allowed_environment_prefixes=args.allowed_environment_prefix,
        warm=args.warm,
        warm_idle_seconds=args.warm_idle_seconds,
        warm_prestart=args.warm_prestart,
    )
    topic = args.topic or f"poltergust-{locations[0].bucket.rsplit('/', 1)[-1]}"
    subscription = args.subscription or default_subscription(args.node_name)
    return settings, args.project, topic, subscription


async def serve(settings: Settings, project: str, topic: str, subscription: str, http: tuple[str, int],
                environment_options: dict | None = None) -> None:
    events: EventSource
    if settings.locations[0].bucket.startswith("gs://"):
        events = PubSubEvents(project, topic, subscription, settings.locations)
    else:
        events = LocalEvents(settings.locations)
    async with contextlib.AsyncExitStack() as stack:
        if not settings.scheduler_url:
            settings.scheduler_url = await stack.enter_async_context(
                embedded_scheduler(settings.data_dir, settings.embedded_scheduler_port))
        node = Node(settings, events, functools.partial(open_store, retry_for=settings.outage_limit),
                    Environments(settings.env_dir, **(environment_options or {})))
        if http[1]:
            await stack.enter_async_context(health_server(node, *http))
        await node.run()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_level, args.node_name, args.log_format)
    settings, project, topic, subscription = settings_from(args, parser)
    uvloop.run(serve(settings, project, topic, subscription, (args.http_host, args.http_port),
                     dict(cache_size=args.env_cache_size, share=args.share_environments)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
