"""Finding the nodes' run logs of a pipeline in a bucket, by generation and node, and reading them whole.

Each node uploads its log of a run to `layout.log_name(CONFIG, GENERATION, NODE)`,
outside the notified prefix. A generation is one submission of the config, so
the logs of the current config's generation say which nodes run it now, and
older generations are the pipeline's earlier runs.

A log is stored in parts of `PART_SIZE` bytes, so that refreshing a long log
rewrites only its last part (a rewritten object is kept for days by a bucket's
soft delete): `NODE.log.txt` holds the first part, and a short log whole;
`NODE.log.txt.part-0001`, `-0002`, ... the rest. Readers join them.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from poltergust import layout
from poltergust.storage import NotFound, ObjectInfo, ObjectStore

LOG_SUFFIX = ".log.txt"
PART_SIZE = 256 * 1024
"""Bytes per log part: what one refresh of a long log rewrites at most."""
PART_MARK = ".part-"


def part_name(name: str, index: int) -> str:
    """Part `index` of the log `name`: the first is `name` itself, the name users and older readers know."""
    return name if index == 0 else f"{name}{PART_MARK}{index:04d}"


@dataclass(frozen=True)
class NodeLog:
    """One node's log of one generation of a pipeline."""

    node: str
    generation: int
    info: ObjectInfo
    """Its first part, `NODE.log.txt`."""
    parts: tuple[ObjectInfo, ...] = ()
    """All its parts in order, the first included."""

    @property
    def updated(self) -> datetime:
        """When the node last wrote to it."""
        return max(part.updated for part in self.parts or (self.info,))


def _parts(first: ObjectInfo, listed: dict[str, ObjectInfo]) -> tuple[ObjectInfo, ...]:
    """`first` and the parts after it in `listed`, up to the first missing one."""
    parts = [first]
    while (part := listed.get(part_name(first.name, len(parts)))) is not None:
        parts.append(part)
    return tuple(parts)


async def node_logs(store: ObjectStore, config_name: str, generation: int | None = None) -> list[NodeLog]:
    """The logs of `config_name` (`PREFIX/NAME.config.yaml`), of one generation or of all, oldest first."""
    base = layout.log_prefix(config_name)
    prefix = layout.log_prefix(config_name, generation)
    listed = {info.name: info for info in await store.list(prefix, recursive=True)}
    found = []
    for info in listed.values():
        parts = info.name[len(base):].split("/")
        if len(parts) == 2 and parts[0].isdigit() and parts[1].endswith(LOG_SUFFIX):
            found.append(NodeLog(parts[1][: -len(LOG_SUFFIX)], int(parts[0]), info, _parts(info, listed)))
    return sorted(found, key=lambda log: (log.generation, log.node))


async def log_parts(store: ObjectStore, name: str) -> tuple[ObjectInfo, ...]:
    """The parts of the log `name` (its first part), in order; NotFound if it has none."""
    listed = {info.name: info for info in await store.list(name) if info.name.startswith(name)}
    if name not in listed:
        raise NotFound(f"no log {name}")
    return _parts(listed[name], listed)


async def read_log(store: ObjectStore, parts: tuple[ObjectInfo, ...], start: int = 0) -> bytes:
    """The log made of `parts`, joined, from byte `start` on; parts wholly before `start` are not read.

    Parts before the last are full and never change, so their listed sizes
    are exact; the last one is read as it is now, and may have grown.
    """
    chunks, offset = [], 0
    for index, part in enumerate(parts):
        if index < len(parts) - 1 and offset + part.size <= start:
            offset += part.size
            continue
        try:
            data = (await store.read(part.name)).data
        except NotFound:  # being rewritten by a node that restarted the run: the rest is not there yet
            break
        chunks.append(data[max(0, start - offset):])
        offset += len(data)
    return b"".join(chunks)


def latest(logs: list[NodeLog]) -> list[NodeLog]:
    """The logs of the newest generation among `logs`."""
    newest = max((log.generation for log in logs), default=None)
    return [log for log in logs if log.generation == newest]
