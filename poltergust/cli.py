"""The `poltergust` command: node, submit, status, logs, validate, demo, dashboard.

Argument parsing and printing only; the work is `client`'s, so the CLI shows
exactly what the nodes see.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Sequence

from poltergust import client
from poltergust.client import CLI_RETRY_SECONDS, Pipeline, UsageError
from poltergust.config import ConfigError
from poltergust.layout import Location
from poltergust.run.log_index import latest, node_logs, read_log
from poltergust.storage import ObjectStore, StorageError, open_store


def _say(line: str) -> None:
    print(line, flush=True)


# -- submit -----------------------------------------------------------------

async def submit(config_path: Path, target: Location, name: str | None, wait: bool) -> int:
    name = name or client.pipeline_name_of(config_path)
    try:
        uploaded = await client.submit(config_path, target, name, _say)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    _say(f"submitted {target.url(uploaded.name)} (generation {uploaded.generation})")
    if not wait:
        return 0
    async with open_store(target.bucket, CLI_RETRY_SECONDS) as store:
        outcome, section = await client.wait(store, target, name, uploaded.generation, _say)
    _say(f"{name}: {outcome} on {section.get('node')} in {section.get('duration_seconds')}s"
         + (f": {section.get('reason')}" if outcome == "error" else ""))
    _say(f"result: {target.url(target.prefix + name)}.{outcome}.yaml")
    if section.get("logs"):
        _say(f"logs: {section['logs']}")
    return 0 if outcome == "done" else 1


# -- status -----------------------------------------------------------------

async def status(target: Location, only: str | None) -> int:
    async with open_store(target.bucket, CLI_RETRY_SECONDS) as store:
        found = await client.pipelines(store, target, only)
        if not found:
            print(f"no pipelines under {target.url()}" + (f" named {only}" if only else ""))
            return 1 if only else 0
        for name in sorted(found):
            print(await _status_line(store, target, found[name]))
        return 0


async def _status_line(store: ObjectStore, target: Location, pipeline: Pipeline) -> str:
    now = datetime.now(timezone.utc)
    name, state = pipeline.name, pipeline.state
    if state == "config":
        config = pipeline.objects["config"]
        nodes = await client.running_nodes(store, config.name, config.generation)
        shown = f"running on {', '.join(nodes)}" if nodes else "queued"
        return f"{name:30} {shown:40} submitted {_age(now - config.updated)} ago"
    info = pipeline.objects[state]
    section = await client.result_section(store, info)
    line = (f"{name:30} {state:40} took {section.get('duration_seconds', '?')}s on "
            f"{section.get('node', '?')}, {_age(now - info.updated)} ago")
    return line + (f": {section.get('reason')}" if state == "error" else "")


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# -- logs -------------------------------------------------------------------

async def logs(target: Location, name: str, node: str | None, follow: bool) -> int:
    """Print the nodes' logs of the pipeline's latest run (following it while it goes on)."""
    offsets: dict[str, int] = {}
    config_name = target.config(name)
    async with open_store(target.bucket, CLI_RETRY_SECONDS) as store:
        while True:
            found = latest(await node_logs(store, config_name))
            wanted = {log.node: log for log in found if node in (None, log.node)}
            for label, node_log in wanted.items():
                offset = offsets.get(node_log.info.name, 0)
                data = await read_log(store, node_log.parts, offset)
                if data:
                    for line in data.decode(errors="replace").splitlines():
                        print(f"[{label}] {line}" if len(wanted) > 1 or follow else line, flush=True)
                    offsets[node_log.info.name] = offset + len(data)
            pipeline = (await client.pipelines(store, target, name)).get(name)
            finished = pipeline is not None and pipeline.state in ("done", "error")
            if not follow or finished:
                if not wanted:
                    print(f"no logs for {name} under {target.url()}", file=sys.stderr)
                    return 1
                return 0
            await asyncio.sleep(1.0)


# -- entry point --------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poltergust", description="Run Poltergust nodes; submit and watch pipelines.")
    commands = parser.add_subparsers(dest="command", required=True)
    # Listed here for --help only: main() hands `poltergust node ...` to the node's own parser.
    commands.add_parser("node", add_help=False, help="run one node (its flags: poltergust node --help)")

    def with_path(command: argparse.ArgumentParser) -> None:
        command.add_argument("--path", required=True, metavar="URL",
                             help="pipeline prefix the nodes watch: gs://BUCKET/PREFIX or a local directory")

    command = commands.add_parser("submit", help="validate a pipeline config (and its environment) and upload it")
    command.add_argument("config", type=Path)
    with_path(command)
    command.add_argument("--name", help="pipeline name (default: from the file name)")
    command.add_argument("--wait", action="store_true", help="show progress until done (exit 0) or error (exit 1)")

    command = commands.add_parser("status", help="one line per pipeline: state, nodes, age, reason")
    with_path(command)
    command.add_argument("name", nargs="?")

    command = commands.add_parser("logs", help="print the nodes' logs of a pipeline")
    command.add_argument("name")
    with_path(command)
    command.add_argument("--node", help="only this node's log")
    command.add_argument("--follow", action="store_true", help="keep printing until the pipeline finishes")

    command = commands.add_parser("validate", help="check pipeline configs and environment files")
    command.add_argument("files", nargs="+", type=Path)

    command = commands.add_parser("demo", help="run the Top Artists example on two local nodes and a local luigid")
    command.add_argument("--keep", action="store_true", help="keep nodes, luigid and dashboard up until Ctrl-C")

    command = commands.add_parser("dashboard", help="serve a read-only web view of pipelines, runs, logs and nodes")
    command.add_argument("--path", action="append", required=True, metavar="URL",
                         help="pipeline prefix the nodes watch: gs://BUCKET/PREFIX or a local directory; repeatable")
    command.add_argument("--scheduler-url", default="", metavar="URL",
                         help="luigid, to link each pipeline's task graph")
    command.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    command.add_argument("--port", type=int, default=8090, help="port to listen on (default: %(default)s)")
    command.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                         help="a name the dashboard is reached by besides loopback and --host (the Host header "
                              "of other names is refused); repeatable")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["node"]:
        from poltergust.async_worker import main as run_node

        return run_node(argv[1:], prog="poltergust node")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(message)s")  # failures are reported below, once
    try:
        if args.command == "validate":
            problems = [problem for path in args.files for problem in client.validate_file(path)]
            for problem in problems:
                print(problem, file=sys.stderr)
            if not problems:
                print(f"{len(args.files)} file(s) valid")
            return 1 if problems else 0
        if args.command == "demo":
            from poltergust.demo import run_demo

            return run_demo(args.keep)
        if args.command == "dashboard":
            from poltergust.dashboard import serve

            return asyncio.run(serve(args.path, args.scheduler_url, args.host, args.port, args.allowed_host)) or 0
        target = Location.parse(args.path)
        if args.command == "submit":
            return asyncio.run(submit(args.config, target, args.name, args.wait))
        if args.command == "status":
            return asyncio.run(status(target, args.name))
        return asyncio.run(logs(target, args.name, args.node, args.follow))
    except (UsageError, ValueError) as exc:
        print(f"poltergust {args.command}: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"poltergust {args.command}: {args.path}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
