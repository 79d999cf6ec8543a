"""Where things are: pipeline locations, run keys, and the name of every object and local file.

Pure functions only, so that the node, the CLI and the dashboard agree on
names without importing each other. The bucket holds:

    PREFIX/NAME.config.yaml                           submitted by the user (the trigger)
    PREFIX/NAME.done.yaml, PREFIX/NAME.error.yaml     the result
    _poltergust/logs/PREFIX/NAME/GENERATION/NODE.log.txt   one node's log of one run
    _poltergust/runs/PREFIX/NAME/GENERATION/start    which node started a run (and helper-W-I: who joined)
    _poltergust/nodes/NODE.json                       a node's heartbeat
    ENVDIR/ENV.yaml, ENVDIR/ENV.env/KEY.tar.gz        an environment and its shared archives

Only configs and results live under the notified prefix: every write there
reaches every node's subscription. Whatever the nodes write for themselves
goes under `_poltergust/`, which no notification filter passes.
"""
from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

CONFIG_SUFFIX = ".config.yaml"
RESULT_SUFFIXES = {"done": ".done.yaml", "error": ".error.yaml"}
INTERNAL = "_poltergust/"
"""Everything nodes write for themselves lives below this bucket-level prefix."""
LOGS = INTERNAL + "logs/"
RUNS = INTERNAL + "runs/"
HEARTBEATS = INTERNAL + "nodes/"


@dataclass(frozen=True)
class Location:
    """A pipeline prefix: `gs://bucket/pipeline`, or a local `file:///dir/pipeline` (or plain path).

    A local directory's parent plays the bucket, so environment files beside
    the pipeline directory resolve as they would in a bucket.
    """

    bucket: str
    """Bucket URL: `gs://NAME`, or `file:///ABSOLUTE/DIR`."""
    prefix: str
    """Object-name prefix, always ending in `/` (or empty for a bucket root)."""

    @classmethod
    def parse(cls, url: str) -> "Location":
        bucket, name = split_url(url)
        name = name.strip("/")
        return cls(bucket, f"{name}/" if name else "")

    @property
    def is_gcs(self) -> bool:
        return self.bucket.startswith("gs://")

    @property
    def bucket_path(self) -> str:
        """The directory of a local bucket."""
        return self.bucket[len("file://"):]

    @property
    def bucket_name(self) -> str:
        """The bare bucket name of a `gs://` location."""
        return self.bucket[len("gs://"):]

    def url(self, name: str = "") -> str:
        return f"{self.bucket}/{name or self.prefix}".rstrip("/")

    def config(self, pipeline: str) -> str:
        return f"{self.prefix}{pipeline}{CONFIG_SUFFIX}"


def split_url(url: str) -> tuple[str, str]:
    """Split an object URL into bucket URL and object name; plain paths are local files."""
    parsed = urlparse(url)
    if parsed.scheme == "gs":
        if not parsed.netloc:
            raise ValueError(f"{url}: expected gs://BUCKET/PATH")
        return f"gs://{parsed.netloc}", parsed.path.lstrip("/")
    if parsed.scheme not in ("", "file"):
        raise ValueError(f"{url}: expected gs://BUCKET/PATH, file:///PATH or a local path")
    path = Path(parsed.path if parsed.scheme else url).expanduser().resolve()
    return f"file://{path.parent}", path.name


def under_prefix(url: str, prefix: str) -> bool:
    """True when `url` lies under `prefix`: the same bucket exactly, and the object path on a `/` boundary.

    `gs://corp-envs` admits `gs://corp-envs/x.yaml`, never `gs://corp-envs-evil/x.yaml`;
    `gs://b/envs` admits `gs://b/envs/x.yaml`, never `gs://b/envs-evil/x.yaml`.
    """
    full, allowed = _normalised(url), _normalised(prefix).rstrip("/")
    return full == allowed or full.startswith(allowed + "/")


def _normalised(url: str) -> str:
    bucket, name = split_url(url)
    return f"{bucket}/{name}"


class RunKey(NamedTuple):
    """One run: a config object's generation. Events and scans for the same key are the same run."""

    bucket: str
    name: str
    generation: int

    def url(self) -> str:
        return f"{self.bucket}/{self.name}"


def is_config_name(name: str, prefix: str) -> bool:
    """True for `PREFIX/NAME.config.yaml` directly under the prefix (no subfolders)."""
    rest = name[len(prefix):] if name.startswith(prefix) else ""
    return bool(rest) and "/" not in rest and rest.endswith(CONFIG_SUFFIX) and len(rest) > len(CONFIG_SUFFIX)


def pipeline_name(config_name: str) -> str:
    """`pipeline/NAME.config.yaml` -> `NAME`."""
    return config_name.rsplit("/", 1)[-1][: -len(CONFIG_SUFFIX)]


def result_name(config_name: str, outcome: str) -> str:
    """`pipeline/NAME.config.yaml` -> `pipeline/NAME.done.yaml` (or `.error.yaml`)."""
    return config_name[: -len(CONFIG_SUFFIX)] + RESULT_SUFFIXES[outcome]


def split_pipeline_object(name: str, prefix: str) -> tuple[str, str] | None:
    """`(NAME, state)` for a config or result object directly under `prefix`; state is config, done or error."""
    rest = name[len(prefix):] if name.startswith(prefix) else ""
    if not rest or "/" in rest:
        return None
    for state, suffix in (("config", CONFIG_SUFFIX), *RESULT_SUFFIXES.items()):
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return rest[: -len(suffix)], state
    return None


def log_prefix(config_name: str, generation: int | None = None) -> str:
    """Where the logs of a pipeline (or of one generation of it) are: `_poltergust/logs/PREFIX/NAME/[GEN/]`."""
    base = f"{LOGS}{config_name[: -len(CONFIG_SUFFIX)]}/"
    return base if generation is None else f"{base}{generation}/"


def log_name(config_name: str, generation: int, node: str) -> str:
    """One node's log of one run: `_poltergust/logs/PREFIX/NAME/GENERATION/NODE.log.txt`."""
    return f"{log_prefix(config_name, generation)}{safe_name(node)}.log.txt"


def run_tag(key: "RunKey") -> str:
    """A short tag naming one run (config URL and generation), as carried by its luigi workers' ids."""
    return hashlib.sha256(f"{key.url()}#{key.generation}".encode()).hexdigest()[:12]


def run_marker(config_name: str, generation: int, marker: str) -> str:
    """`_poltergust/runs/PREFIX/NAME/GENERATION/MARKER`: small objects that decide who takes part in a run."""
    return f"{RUNS}{config_name[: -len(CONFIG_SUFFIX)]}/{generation}/{marker}"


def heartbeat_name(node: str) -> str:
    return f"{HEARTBEATS}{safe_name(node)}.json"


def archive_name(environment_object: str, key: str) -> str:
    """`environment/NAME.yaml` -> `environment/NAME.env/KEY.tar.gz`: beside its file, one per key."""
    directory, base = posixpath.split(environment_object)
    stem = base
    for suffix in (".yaml", ".yml"):
        if stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    return posixpath.join(directory, f"{stem}.env", f"{key}.tar.gz")


def safe_name(name: str) -> str:
    """A name made safe as a single local file or object-path segment (object names may hold anything)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"
    if cleaned == name and len(name) <= 100:
        return name
    return f"{cleaned[:100]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
