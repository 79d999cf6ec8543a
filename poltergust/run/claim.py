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

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Literal, Mapping

import yaml

from poltergust.config import ConfigError, load_yaml
from poltergust.layout import RunKey, pipeline_name, result_name
from poltergust.node import metrics
from poltergust.node.notify import Notifier
from poltergust.run.log import RunLog
from poltergust.run.summary import document_summary
from poltergust.storage import Blob, NotFound, ObjectInfo, ObjectStore, PreconditionFailed, StorageError

log = logging.getLogger(__name__)

ResultOutcome = Literal["done", "error"]

OUTCOME_KEY = "poltergust-outcome"
NODE_KEY = "poltergust-node"
TOKEN_KEY = "poltergust-claim"
"""A token unique to one claim attempt: a retried claim whose first try went through finds its own token."""
YAML_TYPE = "application/yaml"


@dataclass(frozen=True)
class Result:
    outcome: ResultOutcome
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


async def claim(store: ObjectStore, config: Blob, body: bytes, outcome: ResultOutcome, node: str) -> ObjectInfo | None:
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
    # The overview's columns ride along as metadata, so that the dashboard draws it from a listing.
    await store.write(result_name(claimed.name, outcome), body, metadata=document_summary(body), content_type=YAML_TYPE)
    # GCS enforces ifGenerationMatch on delete; its emulator does not, so look
    # first: a config re-uploaded meanwhile is a new submission and must stay.
    try:
        if (await store.stat(claimed.name)).generation != claimed.generation:
            return False
        await store.delete(claimed.name, if_generation_match=claimed.generation)
        return True
    except (NotFound, PreconditionFailed):
        return False


def claimed_outcome(metadata: Mapping[str, str]) -> ResultOutcome | None:
    outcome = metadata.get(OUTCOME_KEY)
    if outcome == "done" or outcome == "error":
        return outcome
    return None


class Finish:
    """This node's end of one run: claim it and write its result, refuse a config, or complete another's claim.

    While it writes, the run is `finishing`: the claim's own notifications
    (the config rewritten, then deleted) must not stop it halfway.
    """

    def __init__(self, key: RunKey, store: ObjectStore, node: str, claim_grace: float, notifier: Notifier,
                 finishing_here: Callable[[RunKey], bool]) -> None:
        self.key = key
        self.store = store
        self.node = node
        self.claim_grace = claim_grace
        self.notifier = notifier
        self.finishing_here = finishing_here
        """Whether one of this node's runs of the same config is writing its result right now."""
        self.finishing = False

    async def finish(self, config: Blob, result: Result, runlog: RunLog) -> None:
        """Claim the run and write its result, unless another node did so first."""
        key = self.key
        self.finishing = True
        try:
            won = await finish(self.store, config, result)
            if not won:
                runlog.note("another node finished this run first (claim got HTTP 412); nothing to write")
                log.info("%s: claim lost (HTTP 412): another node finished generation %d", key.url(), key.generation)
                return
            runlog.note(f"claimed the run; wrote {pipeline_name(key.name)}.{result.outcome}.yaml")
            self._claimed(result)
        except StorageError as exc:
            runlog.note(f"could not write the result: {exc}; the config stays for the next scan")
            log.error("%s: could not finish: %s", key.url(), exc)

    async def refuse(self, config: Blob, reason: str) -> None:
        """End a run that cannot even start (its config cannot be read) as an error, without running anything."""
        now = datetime.now(timezone.utc)
        result = Result("error", self.node, now, now, reason=reason, generation=self.key.generation)
        log.error("%s", reason)
        self.finishing = True
        try:
            if await finish(self.store, config, result):
                self._claimed(result)
        except StorageError as exc:
            log.error("%s: could not write the error result: %s", self.key.url(), exc)

    async def complete_claim(self, config: Blob) -> None:
        """Complete a run another node claimed but did not finish (it may have crashed)."""
        key = self.key
        if self.finishing_here(key):
            return  # this node's own claim, being completed right now
        info = config.info
        claimer = info.metadata.get(NODE_KEY, "?")
        age = (datetime.now(timezone.utc) - info.updated).total_seconds()
        if claimer != self.node and age < self.claim_grace:
            return  # the claimer is most likely writing the result right now
        log.info("%s: completing the run claimed by %s %.0fs ago", key.url(), claimer, age)
        try:
            if not await complete(self.store, info, config.data):
                return  # the claimer (or another node) completed it meanwhile
        except StorageError as exc:
            log.error("%s: could not complete the claimed run: %s", key.url(), exc)
            return
        result = Result.from_document(config.data, info.metadata)
        if result is not None:
            self._claimed(result)

    def _claimed(self, result: Result) -> None:
        metrics.RUNS_CLAIMED.labels(result.outcome).inc()
        log.info("%s: %s (claimed by this node)", self.key.url(), result.outcome)
        self.notifier.send({
            "pipeline_url": self.key.url(), "outcome": result.outcome, "node": result.node,
            "started": result.started.isoformat(), "finished": result.finished.isoformat(), "reason": result.reason,
        })
