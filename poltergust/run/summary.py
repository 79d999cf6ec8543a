"""A result's summary as custom metadata on its result object, so that a listing alone shows the overview.

The overview needs, per finished pipeline, its outcome, node, times, duration
and the first line of its reason. Written as custom metadata on
`NAME.done.yaml` / `NAME.error.yaml`, that arrives with every listing (GCS
returns metadata in objects.list; the local backend reads its side files), so
the dashboard never reads a result file to draw the overview. A result object
without these keys (written before them) is read as before.

`summary_metadata` and `summary_from_metadata` are each other's inverse on
what they keep; the reason they get is already masked (the node masks it
before writing the result document).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Mapping

import yaml

PREFIX = "poltergust-result-"
OUTCOME, NODE, REASON, DURATION = (f"{PREFIX}{key}" for key in ("outcome", "node", "reason", "duration"))
TIMES = ("submitted", "started", "finished")
"""The section's time keys, each kept as `PREFIX + key` in ISO 8601 (UTC)."""
REASON_CHARS = 200
"""A row's reason is one line; the whole reason is on the pipeline's own page. 200 characters of UTF-8 stay far
below GCS's 8 KiB for all custom metadata of an object."""
NODE_CHARS = 200
SECTION_LIMIT = 64 * 1024
"""The largest `poltergust:` section (without its log tail) parsed when writing a result."""
FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def summary_metadata(section: Mapping[str, Any]) -> dict[str, str]:
    """Custom metadata for a result object, from its document's `poltergust:` section; {} if that has no outcome."""
    outcome = section.get("outcome")
    if outcome not in ("done", "error"):
        return {}
    metadata = {OUTCOME: str(outcome), NODE: _bounded(str(section.get("node") or "?"), NODE_CHARS)}
    for key in TIMES:
        when = moment(section.get(key))
        if when is not None:
            metadata[PREFIX + key] = when.isoformat()
    duration = section.get("duration_seconds")
    if isinstance(duration, (int, float)) and not isinstance(duration, bool):
        metadata[DURATION] = repr(float(duration))
    reason = first_line(str(section.get("reason") or ""))
    if reason:
        metadata[REASON] = reason
    return metadata


def summary_from_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The summary a result object carries, shaped like its `poltergust:` section; {} if it carries none."""
    outcome = metadata.get(OUTCOME)
    if outcome not in ("done", "error"):
        return {}
    section: dict[str, Any] = {"outcome": outcome, "node": _bounded(metadata.get(NODE) or "?", NODE_CHARS)}
    for key in TIMES:
        when = moment(metadata.get(PREFIX + key))
        if when is not None:
            section[key] = when
    try:
        section["duration_seconds"] = float(metadata[DURATION])
    except (KeyError, ValueError):
        pass
    reason = first_line(metadata.get(REASON) or "")
    if reason:
        section["reason"] = reason
    return section


def document_summary(body: bytes) -> dict[str, str]:
    """`summary_metadata` of a result document as `run.claim.result_document` writes it; {} if it has no section.

    That function writes the section last and its log tail last in it, so only
    that slice is parsed: a node finishing a run does not parse the user's
    config or the log again.
    """
    start = body.rfind(b"\npoltergust:\n")
    if start < 0:
        return {}
    end = body.find(b"\n  log_tail:", start)
    piece = body[start + 1:end if end > 0 else None]
    try:
        document = yaml.load(piece, Loader=FAST_LOADER) if len(piece) <= SECTION_LIMIT else None
    except (yaml.YAMLError, RecursionError):
        return {}
    section = document.get("poltergust") if isinstance(document, dict) else None
    return summary_metadata(section) if isinstance(section, dict) else {}


def first_line(text: str) -> str:
    """The first non-blank line of `text`, printable characters only, at most `REASON_CHARS` long."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return _bounded("".join(char for char in line if char.isprintable()), REASON_CHARS)


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def moment(value: object) -> datetime | None:
    """A time as ISO text or a YAML timestamp, in UTC (a time without a zone is taken as UTC)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
