"""Finishing a run: the claim, the result file, and removing the config.

All nodes running a pipeline finish it, but exactly one may write its result.
The winner is the node that creates the run's `claim` marker
(`_poltergust/runs/PREFIX/NAME/GENERATION/claim`, create-if-absent) first;
everyone else gets HTTP 412 and stops quietly. The marker holds the result
document and says which outcome it is. The winner then writes `NAME.done.yaml`
or `NAME.error.yaml` and deletes the config generation. The config is never
rewritten: under the notified prefix a finished pipeline costs each node three
messages (the upload, the result, the delete) and nothing more.

If the winner dies between its claim and the config's removal, the run is
still waiting: a node that takes it over (see `membership`) reaches its own
claim, finds the old one, and, once it is older than the claim grace, writes
that claim's result on the dead winner's behalf. A winner whose answer was
lost is still the winner: the store's retry recognises its own marker, and its
own removal of the config (see `storage.base`).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Literal, Mapping

import yaml

from poltergust.config import ConfigError, load_yaml
from poltergust.layout import RunKey, pipeline_name, result_name, run_marker
from poltergust.node import metrics
from poltergust.node.notify import Notifier
from poltergust.run.summary import document_summary
from poltergust.storage import Blob, NotFound, ObjectInfo, ObjectStore, PreconditionFailed, StorageError

log = logging.getLogger(__name__)

ResultOutcome = Literal["done", "error"]

OUTCOME_KEY = "poltergust-outcome"
NODE_KEY = "poltergust-node"
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
        """The result a claim marker holds (to report a claim completed on another node's behalf)."""
        try:
            section = yaml.safe_load(body).get("poltergust", {})
            outcome = claimed_outcome(metadata)
            if outcome is None:
                return None
            return cls(outcome=outcome, node=metadata.get(NODE_KEY, "?"),
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


async def claim(store: ObjectStore, key: RunKey, body: bytes, outcome: ResultOutcome, node: str) -> ObjectInfo | None:
    """Try to become the one node that finishes `key`'s run; None if another did (HTTP 412)."""
    try:
        return await store.write(claim_marker(key), body, if_generation_match=0,
                                 metadata={OUTCOME_KEY: outcome, NODE_KEY: node}, content_type=YAML_TYPE)
    except PreconditionFailed:
        return None


async def complete(store: ObjectStore, key: RunKey, outcome: str, body: bytes) -> bool:
    """Write the result file of `key`'s claimed run, then remove that generation of the config.

    True when this call removed it: a slow claimer and a node completing its
    claim on its behalf may both write the (same) result, but only one of them
    reports the run as finished.
    """
    # The overview's columns ride along as metadata, so that the dashboard draws it from a listing.
    await store.write(result_name(key.name, outcome), body, metadata=document_summary(body), content_type=YAML_TYPE)
    # GCS enforces ifGenerationMatch on delete; its emulator does not, so look
    # first: a config re-uploaded meanwhile is a new submission and must stay.
    try:
        if (await store.stat(key.name)).generation != key.generation:
            return False
        await store.delete(key.name, if_generation_match=key.generation)
        return True
    except (NotFound, PreconditionFailed):
        return False


def claim_marker(key: RunKey) -> str:
    return run_marker(key.name, key.generation, "claim")


def claimed_outcome(metadata: Mapping[str, str]) -> ResultOutcome | None:
    outcome = metadata.get(OUTCOME_KEY)
    if outcome == "done":
        return "done"
    if outcome == "error":
        return "error"
    return None


class Finish:
    """This node's end of one run: claim it and write its result, refuse a config, or complete another's claim.

    While it writes, the run is `finishing`: the config's removal, which it
    causes itself, must not stop it halfway.
    """

    def __init__(self, key: RunKey, store: ObjectStore, node: str, claim_grace: float, notifier: Notifier) -> None:
        self.key = key
        self.store = store
        self.node = node
        self.claim_grace = claim_grace
        self.notifier = notifier
        self.finishing = False

    async def finish(self, config: Blob, result: Result, note: Callable[[str], None] = lambda line: None,
                     responsible: bool = True) -> None:
        """Claim the run and write its result, unless another node did so first; `note` tells the run's log.

        The node `responsible` for the run (its starter) also makes sure that a claim which beat its own is
        completed: should the claimer die, nobody else might.
        """
        key = self.key
        self.finishing = True
        try:
            body = result_document(config.data, result)
            if await claim(self.store, key, body, result.outcome, result.node) is None:
                if not await self._complete_stale_claim(wait=responsible):
                    note("another node finished this run first (claim got HTTP 412); nothing to write")
                    log.info("%s: claim lost (HTTP 412): another node finished generation %d", key.url(),
                             key.generation)
                return
            removed = await complete(self.store, key, result.outcome, body)
            note(f"claimed the run; wrote {pipeline_name(key.name)}.{result.outcome}.yaml")
            if removed:
                self._claimed(result)
            else:  # completed on this node's behalf meanwhile, or the config was submitted again
                log.info("%s: claimed; its config was removed or replaced meanwhile", key.url())
        except StorageError as exc:
            note(f"could not write the result: {exc}; the config stays for the next scan")
            log.error("%s: could not finish: %s", key.url(), exc)

    async def refuse(self, config: Blob, reason: str) -> None:
        """End a run that cannot even start (its config cannot be read) as an error, without running anything."""
        now = datetime.now(timezone.utc)
        log.error("%s", reason)
        # Every node refuses it: none waits on another's claim, a rescan completes one left behind.
        await self.finish(config, Result("error", self.node, now, now, reason=reason, generation=self.key.generation),
                          responsible=False)

    async def _complete_stale_claim(self, wait: bool) -> bool:
        """Complete the claim that beat this node's, if its claimer left it unfinished for the claim grace.

        The config generation is still here (this node's run would have been
        stopped otherwise), so its claimer may have died before removing it.
        With `wait`, a younger claim is given the rest of its grace and looked
        at again. True when this node completed it.
        """
        key = self.key
        try:
            existing = await self.store.read(claim_marker(key))
        except NotFound:
            return False
        info = existing.info
        claimer = info.metadata.get(NODE_KEY, "?")
        age = (datetime.now(timezone.utc) - info.updated).total_seconds()
        if age < self.claim_grace:
            if not wait:
                return False  # the claimer is most likely writing the result right now
            await asyncio.sleep(self.claim_grace - age)
            try:
                if (await self.store.stat(key.name)).generation != key.generation:
                    return False  # the claimer finished
            except NotFound:
                return False
            age = self.claim_grace
        outcome = claimed_outcome(info.metadata)
        if outcome is None or not await complete(self.store, key, outcome, existing.data):
            return False  # not a claim this node can read, or completed meanwhile
        log.info("%s: completed the run claimed by %s %.0fs ago", key.url(), claimer, age)
        completed = Result.from_document(existing.data, info.metadata)
        if completed is not None:
            self._claimed(completed)
        return True

    def _claimed(self, result: Result) -> None:
        metrics.RUNS_CLAIMED.labels(result.outcome).inc()
        log.info("%s: %s (claimed by this node)", self.key.url(), result.outcome)
        self.notifier.send({
            "pipeline_url": self.key.url(), "outcome": result.outcome, "node": result.node,
            "started": result.started.isoformat(), "finished": result.finished.isoformat(), "reason": result.reason,
        })
