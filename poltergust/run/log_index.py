"""Finding the nodes' run logs of a pipeline in a bucket, by generation and node.

Each node uploads its log of a run to `layout.log_name(CONFIG, GENERATION, NODE)`,
outside the notified prefix. A generation is one submission of the config, so
the logs of the current config's generation say which nodes run it now, and
older generations are the pipeline's earlier runs.
"""
from __future__ import annotations

from dataclasses import dataclass

from poltergust import layout
from poltergust.storage import ObjectInfo, ObjectStore

LOG_SUFFIX = ".log.txt"


@dataclass(frozen=True)
class NodeLog:
    """One node's log of one generation of a pipeline."""

    node: str
    generation: int
    info: ObjectInfo


async def node_logs(store: ObjectStore, config_name: str, generation: int | None = None) -> list[NodeLog]:
    """The logs of `config_name` (`PREFIX/NAME.config.yaml`), of one generation or of all, oldest first."""
    base = layout.log_prefix(config_name)
    prefix = layout.log_prefix(config_name, generation)
    found = []
    for info in await store.list(prefix, recursive=True):
        parts = info.name[len(base):].split("/")
        if len(parts) == 2 and parts[0].isdigit() and parts[1].endswith(LOG_SUFFIX):
            found.append(NodeLog(parts[1][: -len(LOG_SUFFIX)], int(parts[0]), info))
    return sorted(found, key=lambda log: (log.generation, log.node))


def latest(logs: list[NodeLog]) -> list[NodeLog]:
    """The logs of the newest generation among `logs`."""
    newest = max((log.generation for log in logs), default=None)
    return [log for log in logs if log.generation == newest]
