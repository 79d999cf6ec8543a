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

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping

import yaml

from .config import ConfigError, load_yaml
from .layout import result_name
from .storage import Blob, NotFound, ObjectInfo, ObjectStore, PreconditionFailed

OUTCOME_KEY = "poltergust-outcome"
NODE_KEY = "poltergust-node"
TOKEN_KEY = "poltergust-claim"
"""A token unique to one claim attempt: a retried claim whose first try went through finds its own token."""
YAML_TYPE = "application/yaml"


@dataclass(frozen=True)
class Result:
    outcome: str  # "done" or "error"
    node: str
    started: datetime
    finished: datetime
    reason: str = ""
    log_tail: str = ""
    generation: int = 0
    """The config generation this is the result of."""
    submitted: datetime | None = None
    """When the config was uploaded (its object's time), for pickup latency."""
    logs: str = ""
    """URL of the folder holding every node's log of this run."""

    @classmethod
    def from_document(cls, body: bytes, metadata: Mapping[str, str]) -> "Result | None":
        """The result a claimed config holds (to report a claim completed on another node's behalf)."""
        try:
            section = yaml.safe_load(body).get("poltergust", {})
            return cls(outcome=metadata[OUTCOME_KEY], node=metadata.get(NODE_KEY, "?"),
                       started=datetime.fromisoformat(section["started"]),
                       finished=datetime.fromisoformat(section["finished"]), reason=section.get("reason", ""),
                       generation=int(section.get("generation", 0)))
        except (yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError, RecursionError):
            return None


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
        "generation": result.generation,
        "node": result.node,
        **({"submitted": result.submitted.isoformat()} if result.submitted else {}),
        "started": result.started.isoformat(),
        "finished": result.finished.isoformat(),
        "duration_seconds": round((result.finished - result.started).total_seconds(), 3),
    }
    if result.logs:
        section["logs"] = result.logs
    if result.outcome == "error":
        section["reason"] = " ".join(result.reason.split())
        section["log_tail"] = result.log_tail
    document["poltergust"] = section
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=1000).encode()


async def finish(store: ObjectStore, config: Blob, result: Result) -> bool:
    """Claim `config`'s generation with `result` and write the result file; False if another node won."""
    body = result_document(config.data, result)
    claimed = await claim(store, config, body, result.outcome, result.node)
    if claimed is None:
        return False
    return await complete(store, claimed, body)


async def claim(store: ObjectStore, config: Blob, body: bytes, outcome: str, node: str) -> ObjectInfo | None:
    """Try to become the one node that finishes `config`'s generation; None if another did (HTTP 412)."""
    token = uuid.uuid4().hex
    try:
        return await store.write(
            config.info.name, body, if_generation_match=config.info.generation,
            metadata={OUTCOME_KEY: outcome, NODE_KEY: node, TOKEN_KEY: token}, content_type=YAML_TYPE,
        )
    except PreconditionFailed:
        # A retried request whose first attempt went through also ends here: then the claim is ours.
        try:
            current = await store.stat(config.info.name)
        except NotFound:
            return None
        return current if current.metadata.get(TOKEN_KEY) == token else None


async def complete(store: ObjectStore, claimed: ObjectInfo, body: bytes) -> bool:
    """Write the result file of a claimed config, then remove the config.

    True when this call removed it: a slow claimer and a node completing its
    claim on its behalf may both write the (same) result, but only one of them
    reports the run as finished.
    """
    outcome = claimed.metadata[OUTCOME_KEY]
    await store.write(result_name(claimed.name, outcome), body, content_type=YAML_TYPE)
    # GCS enforces ifGenerationMatch on delete; its emulator does not, so look
    # first: a config re-uploaded meanwhile is a new submission and must stay.
    try:
        if (await store.stat(claimed.name)).generation != claimed.generation:
            return False
        await store.delete(claimed.name, if_generation_match=claimed.generation)
        return True
    except (NotFound, PreconditionFailed):
        return False


def claimed_outcome(metadata: Mapping[str, str]) -> str | None:
    outcome = metadata.get(OUTCOME_KEY)
    return outcome if outcome in ("done", "error") else None
