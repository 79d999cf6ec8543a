"""The `poltergust` command: submit, status, logs, validate, demo, dashboard.

It talks to the same bucket or directory the nodes watch, through the same
storage code, so what it shows is exactly what the nodes see.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Sequence

import yaml

from .config import ConfigError, PipelineConfig, load_yaml, parse_environment, parse_pipeline
from .events import CONFIG_SUFFIX
from .layout import split_pipeline_object
from .runlogs import latest, node_logs
from .storage import Location, NotFound, ObjectInfo, ObjectStore, StorageError, open_store, split_url


CLI_RETRY_SECONDS = 5.0
"""A person is waiting: report an unreachable bucket quickly."""


class UsageError(Exception):
    """Bad input on the command line; printed as one line, exit code 2."""


# -- validate ---------------------------------------------------------------

def validate_file(path: Path) -> list[str]:
    """Problems in one local pipeline config or environment file (empty when valid)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [f"{path}: cannot read: {exc.strerror}"]
    try:
        if _is_pipeline(data, str(path)):
            config = parse_pipeline(data, path.resolve().as_uri())
            local = _local_environment(config)
            if local is not None:
                return validate_file(local) if local.exists() else [
                    f"{path}: environment: {local} does not exist"]
        else:
            parse_environment(data, str(path))
    except ConfigError as exc:
        return [str(exc)]
    return []


def _is_pipeline(data: bytes, source: str) -> bool:
    document = load_yaml(data, source)
    return "task" in document or "environment" in document


def _local_environment(config: PipelineConfig) -> Path | None:
    bucket, name = split_url(config.environment)
    return Path(bucket[len("file://"):]) / name if bucket.startswith("file://") else None


# -- submit -----------------------------------------------------------------

async def submit(config_path: Path, target: Location, name: str | None, wait: bool) -> int:
    try:
        data = config_path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{config_path}: cannot read: {exc.strerror}") from None
    name = name or _pipeline_name(config_path)
    config_name = f"{target.prefix}{name}{CONFIG_SUFFIX}"
    try:
        config = parse_pipeline(data, target.url(config_name))
        await _upload_environment(config_path, config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    store = open_store(target.bucket, CLI_RETRY_SECONDS)
    try:
        before = {info.name: info.generation for info in await store.list(f"{target.prefix}{name}.")}
        uploaded = await store.write(config_name, data, content_type="application/yaml")
        print(f"submitted {target.url(config_name)} (generation {uploaded.generation})", flush=True)
        if not wait:
            return 0
        return await _wait(store, target, name, before, uploaded.generation)
    finally:
        await store.close()


def _pipeline_name(path: Path) -> str:
    base = path.name
    for suffix in (CONFIG_SUFFIX, ".yaml", ".yml"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


async def _upload_environment(config_path: Path, config: PipelineConfig) -> None:
    """Check the environment the config names; a relative one found beside the local config is uploaded."""
    reference = config.document["environment"].strip()
    local = (config_path.parent / reference).resolve() if "://" not in reference else None
    bucket, env_name = split_url(config.environment)
    store = open_store(bucket, CLI_RETRY_SECONDS)
    try:
        if local is not None and local.exists():
            data = local.read_bytes()
            parse_environment(data, str(local))
            await store.write(env_name, data, content_type="application/yaml")
            print(f"uploaded environment {local} to {config.environment}")
            return
        try:
            parse_environment((await store.read(env_name)).data, config.environment)
        except NotFound:
            raise ConfigError(str(config_path), f"{config.environment} does not exist"
                              + (f" (nor does {local})" if local else ""), "environment") from None
    finally:
        await store.close()


async def _wait(store: ObjectStore, target: Location, name: str, before: dict[str, int], generation: int) -> int:
    """Show progress until this submission's result file appears; exit status 0 for done, 1 for error."""
    shown = ""
    while True:
        kinds = _by_pipeline(await store.list(f"{target.prefix}{name}."), target.prefix).get(name, {})
        for outcome in ("done", "error"):
            info = kinds.get(f"{outcome}.yaml")
            if info and info.generation != before.get(info.name):
                document = yaml.safe_load((await store.read(info.name)).data)
                section = document.get("poltergust", {})
                print(f"{name}: {outcome} on {section.get('node')} in {section.get('duration_seconds')}s"
                      + (f": {section.get('reason')}" if outcome == "error" else ""))
                print(f"result: {target.url(info.name)}")
                return 0 if outcome == "done" else 1
        nodes = [log.node for log in await node_logs(store, f"{target.prefix}{name}{CONFIG_SUFFIX}", generation)]
        state = f"{name}: running on {', '.join(nodes)}" if nodes else f"{name}: queued"
        if state != shown:
            print(state, flush=True)
            shown = state
        await asyncio.sleep(0.5)


# -- status -----------------------------------------------------------------

async def status(target: Location, only: str | None) -> int:
    store = open_store(target.bucket, CLI_RETRY_SECONDS)
    try:
        pipelines = _by_pipeline(await store.list(target.prefix), target.prefix)
        if only:
            pipelines = {name: kinds for name, kinds in pipelines.items() if name == only}
        if not pipelines:
            print(f"no pipelines under {target.url()}" + (f" named {only}" if only else ""))
            return 1 if only else 0
        for name in sorted(pipelines):
            print(await _status_line(store, name, pipelines[name]))
        return 0
    finally:
        await store.close()


def _by_pipeline(objects: Iterable[ObjectInfo], prefix: str) -> dict[str, dict[str, ObjectInfo]]:
    """Group configs and results by pipeline name: {NAME: {"config.yaml": ..., "done.yaml": ...}}.

    Names may contain dots, so objects are matched by their suffix.
    """
    pipelines: dict[str, dict[str, ObjectInfo]] = {}
    for info in objects:
        found = split_pipeline_object(info.name, prefix)
        if found is not None:
            pipelines.setdefault(found[0], {})[f"{found[1]}.yaml"] = info
    return pipelines


async def _status_line(store: ObjectStore, name: str, kinds: dict[str, ObjectInfo]) -> str:
    now = datetime.now(timezone.utc)
    config = kinds.get("config.yaml")
    if config is not None:
        nodes = [log.node for log in await node_logs(store, config.name, config.generation)]
        state = f"running on {', '.join(nodes)}" if nodes else "queued"
        return f"{name:30} {state:40} submitted {_age(now - config.updated)} ago"
    for outcome in ("done", "error"):
        info = kinds.get(f"{outcome}.yaml")
        if info is not None:
            try:
                section = yaml.safe_load((await store.read(info.name)).data).get("poltergust", {})
            except (StorageError, yaml.YAMLError, AttributeError):
                section = {}
            line = (f"{name:30} {outcome:40} took {section.get('duration_seconds', '?')}s on "
                    f"{section.get('node', '?')}, {_age(now - info.updated)} ago")
            return line + (f": {section.get('reason')}" if outcome == "error" else "")
    return f"{name:30} logs only"


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# -- logs -------------------------------------------------------------------

async def logs(target: Location, name: str, node: str | None, follow: bool) -> int:
    store = open_store(target.bucket, CLI_RETRY_SECONDS)
    offsets: dict[str, int] = {}
    try:
        while True:
            kinds = _by_pipeline(await store.list(f"{target.prefix}{name}."), target.prefix).get(name, {})
            found = latest(await node_logs(store, f"{target.prefix}{name}{CONFIG_SUFFIX}"))
            wanted = {log.node: log.info for log in found if node in (None, log.node)}
            for label, info in wanted.items():
                data = (await store.read(info.name)).data
                offset = offsets.get(info.name, 0)
                if len(data) > offset:
                    for line in data[offset:].decode(errors="replace").splitlines():
                        print(f"[{label}] {line}" if len(wanted) > 1 or follow else line, flush=True)
                    offsets[info.name] = len(data)
            finished = ("done.yaml" in kinds or "error.yaml" in kinds) and "config.yaml" not in kinds
            if not follow or finished:
                if not wanted:
                    print(f"no logs for {name} under {target.url()}", file=sys.stderr)
                    return 1
                return 0
            await asyncio.sleep(1.0)
    finally:
        await store.close()


# -- entry point --------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poltergust", description="Submit and watch Poltergust pipelines.")
    commands = parser.add_subparsers(dest="command", required=True)

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
    command.add_argument("--scheduler-url", default="", metavar="URL", help="luigid, to link each pipeline's task graph")
    command.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    command.add_argument("--port", type=int, default=8090, help="port to listen on (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(message)s")  # failures are reported below, once
    try:
        if args.command == "validate":
            problems = [problem for path in args.files for problem in validate_file(path)]
            for problem in problems:
                print(problem, file=sys.stderr)
            if not problems:
                print(f"{len(args.files)} file(s) valid")
            return 1 if problems else 0
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args.keep)
        if args.command == "dashboard":
            from .dashboard import serve

            return asyncio.run(serve(args.path, args.scheduler_url, args.host, args.port)) or 0
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
