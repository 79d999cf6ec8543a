"""Bucket notifications, delivered to each node through its own Pub/Sub subscription.

Every node must see every config upload (they all run the pipeline), so each
has its own subscription rather than sharing one. Events are hints: the node
acks them at once and re-reads the bucket, and the periodic rescan covers
anything a lost message would have said.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol

# Nodes fork luigi while gRPC threads stream messages; gRPC's fork handlers
# are not needed by the children and only print warnings.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from google.api_core import exceptions as gexc  # noqa: E402
from google.cloud import pubsub_v1  # noqa: E402

from .storage import Location  # noqa: E402

log = logging.getLogger(__name__)

CONFIG_SUFFIX = ".config.yaml"
SUBSCRIPTION_TTL_SECONDS = 7 * 24 * 3600
"""Unused subscriptions of scaled-down nodes are deleted by Pub/Sub after this long."""


@dataclass(frozen=True)
class Event:
    """A change to one generation of one pipeline config."""

    kind: str  # "finalize" or "delete"
    bucket: str
    """Bucket URL, as in `Location.bucket`."""
    name: str
    generation: int
    replaced_by: int | None = None
    """For a delete caused by an overwrite: the generation that replaced this one."""


class EventSource(Protocol):
    """Where a node hears about config changes: Pub/Sub for GCS, the file system for local directories."""

    async def attach(self) -> None: ...

    async def get(self) -> Event: ...

    @property
    def broken(self) -> BaseException | None: ...

    async def close(self) -> None: ...


def parse_notification(attributes: Mapping[str, str], locations: Iterable[Location]) -> Event | None:
    """Turn GCS notification attributes into an `Event`, or None if it is not for us."""
    kind = {"OBJECT_FINALIZE": "finalize", "OBJECT_DELETE": "delete"}.get(attributes.get("eventType", ""))
    bucket, name = "gs://" + attributes.get("bucketId", ""), attributes.get("objectId", "")
    if kind is None or not name.endswith(CONFIG_SUFFIX):
        return None
    if not any(loc.bucket == bucket and is_config_name(name, loc.prefix) for loc in locations):
        return None
    try:
        generation = int(attributes["objectGeneration"])
        replaced = attributes.get("overwrittenByGeneration")
        return Event(kind, bucket, name, generation, int(replaced) if replaced else None)
    except (KeyError, ValueError):
        log.warning("ignoring malformed notification for %s: %r", name, dict(attributes))
        return None


def is_config_name(name: str, prefix: str) -> bool:
    """True for `PREFIX/NAME.config.yaml` directly under the prefix (no subfolders)."""
    rest = name[len(prefix):] if name.startswith(prefix) else None
    return bool(rest) and "/" not in rest and rest.endswith(CONFIG_SUFFIX) and len(rest) > len(CONFIG_SUFFIX)


def default_subscription(node_name: str) -> str:
    """A valid subscription id derived from the node name."""
    cleaned = re.sub(r"[^A-Za-z0-9._~+%-]", "-", node_name).strip("-") or "node"
    return f"poltergust-{cleaned}"[:255]


class PubSubEvents:
    """A node's subscription, bridged from the client's callback threads into asyncio."""

    def __init__(self, project: str, topic: str, subscription: str, locations: list[Location]) -> None:
        self._locations = locations
        self._subscriber: pubsub_v1.SubscriberClient | None = None
        self.topic = topic if topic.startswith("projects/") else f"projects/{project}/topics/{topic}"
        self.subscription = (
            subscription if subscription.startswith("projects/")
            else pubsub_v1.SubscriberClient.subscription_path(project, subscription)
        )
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._future: pubsub_v1.subscriber.futures.StreamingPullFuture | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def attach(self) -> None:
        """Create the subscription if needed and start receiving.

        Returns once the stream is open, so a scan started afterwards cannot
        miss an upload that happened in between.
        """
        self._loop = asyncio.get_running_loop()
        self._subscriber = pubsub_v1.SubscriberClient()
        await asyncio.to_thread(self._ensure_subscription)
        self._future = self._subscriber.subscribe(self.subscription, callback=self._on_message)
        log.info("listening on %s", self.subscription)

    def _ensure_subscription(self) -> None:
        prefixes = " OR ".join(
            f'(attributes.bucketId = "{loc.bucket[len("gs://"):]}" AND hasPrefix(attributes.objectId, "{loc.prefix}"))'
            for loc in self._locations
        )
        request = {
            "name": self.subscription,
            "topic": self.topic,
            "filter": prefixes,
            "ack_deadline_seconds": 30,
            "expiration_policy": {"ttl": {"seconds": SUBSCRIPTION_TTL_SECONDS}},
            "message_retention_duration": {"seconds": 600},
        }
        try:
            assert self._subscriber is not None
            self._subscriber.create_subscription(request=request)
            log.info("created subscription %s on %s", self.subscription, self.topic)
        except gexc.AlreadyExists:
            log.info("using existing subscription %s", self.subscription)

    def _on_message(self, message: pubsub_v1.subscriber.message.Message) -> None:
        # Runs on a client thread: hand over to the loop and return at once.
        event = parse_notification(message.attributes, self._locations)
        if event is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        message.ack()

    async def get(self) -> Event:
        return await self._queue.get()

    @property
    def broken(self) -> BaseException | None:
        """The error that ended the stream, if it has ended."""
        if self._future is not None and self._future.done():
            return self._future.exception() or RuntimeError("subscription stream closed")
        return None

    async def close(self) -> None:
        if self._future is not None:
            self._future.cancel()
            # Blocks until the client's threads have stopped; a broken stream's error was already reported.
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._future.result)
            self._future = None
        if self._subscriber is not None:
            await asyncio.to_thread(self._subscriber.close)
            self._subscriber = None
