"""Finishing a run: the claim, the result file, and removing the config.

All nodes running a pipeline finish it, but exactly one may write its result.
The winner is the node whose conditional rewrite of `NAME.config.yaml`
(ifGenerationMatch on the generation the run started from) succeeds; everyone
else gets HTTP 412 and stops quietly. The rewritten config already holds the
result document and says which outcome it is, so if the winner dies before
writing `NAME.done.yaml` / `NAME.error.yaml`, any node that later finds the
claimed config can complete the move without knowing anything else.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping

import yaml

from .config import ConfigError, load_yaml
from .events import CONFIG_SUFFIX
from .storage import Blob, NotFound, ObjectInfo, ObjectStore, PreconditionFailed

OUTCOME_KEY = "poltergust-outcome"
NODE_KEY = "poltergust-node"
YAML_TYPE = "application/yaml"


@dataclass(frozen=True)
class Result:
    outcome: str  # "done" or "error"
    node: str
    started: datetime
    finished: datetime
    reason: str = ""
    log_tail: str = ""
    submitted: datetime | None = None
    """When the config was uploaded (its object's time), for pickup latency."""


def pipeline_name(config_name: str) -> str:
    """`pipeline/NAME.config.yaml` -> `NAME`."""
    return config_name.rsplit("/", 1)[-1][: -len(CONFIG_SUFFIX)]


def sibling(config_name: str, suffix: str) -> str:
    """`pipeline/NAME.config.yaml` -> `pipeline/NAME` + suffix."""
    return config_name[: -len(CONFIG_SUFFIX)] + suffix


def log_name(config_name: str, node: str) -> str:
    return sibling(config_name, f".{node}.log.txt")


def result_document(original: bytes, result: Result) -> bytes:
    """The user's config, keys unchanged, plus a `poltergust:` section.

    A config that is not a YAML mapping is kept verbatim under `original_config`.
    """
    try:
        document: dict[str, Any] = load_yaml(original, "config")
    except ConfigError:
        document = {"original_config": original.decode("utf-8", errors="replace")}
    section: dict[str, Any] = {
        "outcome": result.outcome,
        "node": result.node,
        **({"submitted": result.submitted.isoformat()} if result.submitted else {}),
        "started": result.started.isoformat(),
        "finished": result.finished.isoformat(),
        "duration_seconds": round((result.finished - result.started).total_seconds(), 3),
    }
    if result.outcome == "error":
        section["reason"] = " ".join(result.reason.split())
        section["log_tail"] = result.log_tail
    document["poltergust"] = section
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=1000).encode()


async def claim(store: ObjectStore, config: Blob, body: bytes, outcome: str, node: str) -> ObjectInfo | None:
    """Try to become the one node that finishes `config`'s generation; None if another did (HTTP 412)."""
    try:
        return await store.write(
            config.info.name, body, if_generation_match=config.info.generation,
            metadata={OUTCOME_KEY: outcome, NODE_KEY: node}, content_type=YAML_TYPE,
        )
    except PreconditionFailed:
        return None


async def complete(store: ObjectStore, claimed: ObjectInfo, body: bytes) -> None:
    """Write the result file of a claimed config, then remove the config."""
    outcome = claimed.metadata[OUTCOME_KEY]
    await store.write(sibling(claimed.name, f".{outcome}.yaml"), body, content_type=YAML_TYPE)
    # GCS enforces ifGenerationMatch on delete; its emulator does not, so look
    # first: a config re-uploaded meanwhile is a new submission and must stay.
    try:
        if (await store.stat(claimed.name)).generation != claimed.generation:
            return
        await store.delete(claimed.name, if_generation_match=claimed.generation)
    except (NotFound, PreconditionFailed):
        pass


def claimed_outcome(metadata: Mapping[str, str]) -> str | None:
    outcome = metadata.get(OUTCOME_KEY)
    return outcome if outcome in ("done", "error") else None
