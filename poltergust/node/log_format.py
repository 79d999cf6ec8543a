"""The node's own log: JSON lines for Cloud Logging, or readable lines on a terminal.

Messages about a run carry which pipeline and generation they concern, taken
from the run's context, so they can be filtered without parsing the text.
Luigi's output never comes here: it goes to the run's log object.
"""
from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import datetime, timezone

CURRENT_RUN: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar("run", default=None)
"""(config URL, generation) of the run the current asyncio task works on."""

SEVERITY = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARNING", "ERROR": "ERROR", "CRITICAL": "CRITICAL"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with Cloud Logging's field names."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "severity": SEVERITY.get(record.levelname, "DEFAULT"),
            "message": record.getMessage(),
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "logger": record.name,
            "node": self.node,
        }
        run = CURRENT_RUN.get()
        if run is not None:
            entry["pipeline"], entry["generation"] = run[0], str(run[1])
        if record.exc_info:
            entry["message"] += "\n" + self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        run = CURRENT_RUN.get()
        line = super().format(record)
        return f"{line} [{run[0]}#{run[1]}]" if run is not None and run[0] not in record.getMessage() else line


def configure(level: str, node: str, fmt: str = "auto") -> None:
    """Log to stderr: JSON unless stderr is a terminal (or `fmt` says otherwise)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(node) if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
