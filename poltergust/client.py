"""What a person can do with a bucket the nodes watch: submit, wait, and read states, results and logs.

The CLI, the demo and the dashboard all go through here, with the same
storage code and object names as the nodes, so what they show is exactly
what the nodes see.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from poltergust.config import ConfigError, PipelineConfig, load_yaml, parse_environment, parse_pipeline
from poltergust.errors import PoltergustError
from poltergust.layout import CONFIG_SUFFIX, Location, split_pipeline_object, split_url
from poltergust.run.log_index import node_logs
from poltergust.storage import NotFound, ObjectInfo, ObjectStore, StorageError, open_store

CLI_RETRY_SECONDS = 5.0
"""A person is waiting: report an unreachable bucket quickly."""


class UsageError(PoltergustError):
    """Bad input on the command line; printed as one line, exit code 2."""


@dataclass
class Pipeline:
    """What the bucket says about one pipeline name: its current config and its latest results."""

    name: str
    objects: dict[str, ObjectInfo] = field(default_factory=dict)
    """By state: "config", "done", "error"."""

    @property
    def state(self) -> str:
        """queued or running (a config is waiting), else the newer of done and error."""
        if "config" in self.objects:
            return "config"
        results = [state for state in ("done", "error") if state in self.objects]
        return max(results, key=lambda state: self.objects[state].updated) if results else "unknown"


# -- validating -------------------------------------------------------------

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


# -- submitting -------------------------------------------------------------

def pipeline_name_of(path: Path) -> str:
    base = path.name
    for suffix in (CONFIG_SUFFIX, ".yaml", ".yml"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


async def submit(config_path: Path, target: Location, name: str, say: Callable[[str], None]) -> ObjectInfo:
    """Check a local config (and its environment, uploading a local one), then upload the config."""
    try:
        data = config_path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{config_path}: cannot read: {exc.strerror}") from None
    config = parse_pipeline(data, target.url(target.config(name)))
    await _upload_environment(config_path, config, say)
    async with open_store(target.bucket, CLI_RETRY_SECONDS) as store:
        return await store.write(target.config(name), data, content_type="application/yaml")


async def _upload_environment(config_path: Path, config: PipelineConfig, say: Callable[[str], None]) -> None:
    """Check the environment the config names; a relative one found beside the local config is uploaded."""
    reference = config.document["environment"].strip()
    local = (config_path.parent / reference).resolve() if "://" not in reference else None
    bucket, env_name = split_url(config.environment)
    async with open_store(bucket, CLI_RETRY_SECONDS) as store:
        if local is not None and local.exists():
            data = local.read_bytes()
            parse_environment(data, str(local))
            await store.write(env_name, data, content_type="application/yaml")
            say(f"uploaded environment {local} to {config.environment}")
            return
        try:
            parse_environment((await store.read(env_name)).data, config.environment)
        except NotFound:
            raise ConfigError(str(config_path), f"{config.environment} does not exist"
                              + (f" (nor does {local})" if local else ""), "environment") from None


async def wait(store: ObjectStore, target: Location, name: str, generation: int,
               say: Callable[[str], None]) -> tuple[str, dict[str, Any]]:
    """Follow one submission until its result appears; returns the outcome and the result's `poltergust:` section."""
    shown = ""
    seen: dict[str, int] = {}
    while True:
        pipeline = (await pipelines(store, target, name)).get(name, Pipeline(name))
        for outcome in ("done", "error"):
            info = pipeline.objects.get(outcome)
            if info is not None and seen.get(outcome) != info.generation:
                seen[outcome] = info.generation
                section = await result_section(store, info)
                if section.get("generation") == generation:
                    return outcome, section
        nodes = await running_nodes(store, target.config(name), generation)
        state = f"{name}: running on {', '.join(nodes)}" if nodes else f"{name}: queued"
        if state != shown:
            say(state)
            shown = state
        await asyncio.sleep(0.5)


# -- reading ------------------------------------------------------------------

async def pipelines(store: ObjectStore, target: Location, only: str | None = None) -> dict[str, Pipeline]:
    """Every pipeline under the prefix (configs and results only: a narrow listing), by name."""
    found: dict[str, Pipeline] = {}
    glob = f"{only}.*.yaml" if only else "*.yaml"
    async for page in store.pages(target.prefix, glob=glob):
        for info in page:
            parsed = split_pipeline_object(info.name, target.prefix)
            if parsed is not None and (only is None or parsed[0] == only):
                found.setdefault(parsed[0], Pipeline(parsed[0])).objects[parsed[1]] = info
    return found


async def result_section(store: ObjectStore, info: ObjectInfo) -> dict[str, Any]:
    """The `poltergust:` section of a result file (empty if it cannot be read)."""
    try:
        section = yaml.safe_load((await store.read(info.name)).data).get("poltergust", {})
    except (StorageError, yaml.YAMLError, AttributeError, RecursionError):
        return {}
    return section if isinstance(section, dict) else {}


async def running_nodes(store: ObjectStore, config_name: str, generation: int) -> list[str]:
    """Nodes that have started a log for this generation of the config."""
    return [log.node for log in await node_logs(store, config_name, generation)]
