"""Object storage: the few operations the claim protocol needs, on GCS (`gcs`) or a local directory (`local`).

Every object carries a generation, and writes and deletes can be made
conditional on it. That is what lets many nodes race to finish a run with
exactly one winner (see `results`). `open_store` picks the backend from the
bucket URL; stores are async context managers.
"""
from __future__ import annotations

from pathlib import Path

from poltergust.storage.base import (
    Blob,
    ClosingStore,
    NotFound,
    ObjectInfo,
    ObjectStore,
    PreconditionFailed,
    StorageError,
    TooLarge,
)
from poltergust.storage.gcs import GcsStore
from poltergust.storage.local import LocalStore

__all__ = ["Blob", "ClosingStore", "NotFound", "ObjectInfo", "ObjectStore", "PreconditionFailed", "StorageError",
           "TooLarge", "open_store"]


def open_store(bucket: str, retry_for: float = 60.0) -> ObjectStore:
    """The store for a bucket URL (`gs://NAME` or `file:///DIR`, as in `Location.bucket`).

    `retry_for` bounds how long transient GCS faults are retried: long for
    nodes, which must ride out outages, short for the interactive CLI.
    """
    if bucket.startswith("gs://"):
        return GcsStore(bucket[len("gs://"):], retry_for=retry_for)
    return LocalStore(Path(bucket[len("file://"):]))
