"""Bucket notifications from GCS, delivered to each node through its own Pub/Sub subscription.

Every node must see every config upload (they all run the pipeline), so each
has its own subscription rather than sharing one. Events are hints: the node
acks them at once and re-reads the bucket, and the periodic rescan covers
anything a lost message would have said.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
from typing import Iterable, Mapping

# Nodes fork luigi while gRPC threads stream messages; gRPC's fork handlers
# are not needed by the children and only print warnings.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from google.api_core import exceptions as gexc  # noqa: E402
from google.cloud import pubsub_v1  # noqa: E402

from poltergust.errors import PoltergustError
from poltergust.events.base import ClosingSource, Event, EventKind  # noqa: E402
from poltergust.layout import CONFIG_SUFFIX, Location, is_config_name  # noqa: E402
from poltergust.node import metrics  # noqa: E402
from poltergust.storage.base import ObjectInfo  # noqa: E402
from poltergust.storage.gcs import object_info  # noqa: E402

log = logging.getLogger(__name__)

SUBSCRIPTION_TTL_SECONDS = 24 * 3600
"""Subscriptions of nodes that died without deleting theirs are removed by Pub/Sub after a day unused."""
MAX_FILTER_BYTES = 256
"""Pub/Sub refuses longer filters; a node then filters by bucket only (it filters every message itself too)."""
HELP = "POLTERGUST_HELP"
"""A node's call for help, published on the notification topic so that it reaches every node's subscription."""
EVENT_KINDS: dict[str, EventKind] = {
    "OBJECT_FINALIZE": "finalize", "OBJECT_DELETE": "delete", "OBJECT_ARCHIVE": "delete", HELP: "help",
}
"""In a versioned bucket an overwritten or deleted config is archived, not deleted: the same to a node."""


class SubscriptionMismatch(PoltergustError):
    """An existing subscription of that name listens to another topic or with another filter."""


def parse_notification(attributes: Mapping[str, str], locations: Iterable[Location], data: bytes = b"") -> Event | None:
    """Turn a GCS notification into an `Event`, or None; an upload's JSON_API_V1 payload gives its `info`."""
    kind = EVENT_KINDS.get(attributes.get("eventType", ""))
    bucket, name = "gs://" + attributes.get("bucketId", ""), attributes.get("objectId", "")
    if kind is None or not name.endswith(CONFIG_SUFFIX):
        return None
    if not any(loc.bucket == bucket and is_config_name(name, loc.prefix) for loc in locations):
        return None
    try:
        generation = int(attributes["objectGeneration"])
        replaced = attributes.get("overwrittenByGeneration")
        return Event(kind, bucket, name, generation, int(replaced) if replaced else None,
                     wanted=int(attributes.get("poltergustWanted", 0)), wave=int(attributes.get("poltergustWave", 0)),
                     info=_payload_info(attributes, data, name, generation) if kind == "finalize" else None)
    except (KeyError, ValueError):
        log.warning("ignoring malformed notification for %s: %r", name, dict(attributes))
        return None


def _payload_info(attributes: Mapping[str, str], data: bytes, name: str, generation: int) -> ObjectInfo | None:
    """The object a JSON_API_V1 payload describes, if it is the one the attributes name; else None."""
    if attributes.get("payloadFormat") != "JSON_API_V1" or not data:
        return None
    try:
        info = object_info(json.loads(data))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return info if info.name == name and info.generation == generation else None


def delivery_labels(attributes: Mapping[str, str], locations: Iterable[Location]) -> tuple[str, str]:
    """(kind, scope) of a delivered message, for counting what a node's subscription costs it."""
    bucket, name = attributes.get("bucketId", ""), attributes.get("objectId", "")
    watched = any(loc.bucket_name == bucket and name.startswith(loc.prefix) for loc in locations)
    return EVENT_KINDS.get(attributes.get("eventType", ""), "other"), "watched" if watched else "outside"


def subscription_filter(locations: Iterable[Location]) -> str:
    """The narrowest filter Pub/Sub accepts for these locations: by bucket and prefix, else by bucket only."""
    locations = list(locations)
    exact = " OR ".join(
        f'(attributes.bucketId = "{loc.bucket_name}" AND hasPrefix(attributes.objectId, "{loc.prefix}"))'
        for loc in locations
    )
    if len(exact.encode()) <= MAX_FILTER_BYTES:
        return exact
    names = sorted({loc.bucket_name for loc in locations})
    buckets = " OR ".join(f'attributes.bucketId = "{bucket}"' for bucket in names)
    return buckets if len(buckets.encode()) <= MAX_FILTER_BYTES else ""


def backlog_filter(locations: Iterable[Location]) -> str:
    """Only uploads under these locations: the backlog must not wake nodes for deletes or calls for help.

    Pub/Sub filters have no suffix match, so other uploads under a prefix (result
    files) pass too; the backlog acks them at once.
    """
    finalize = 'attributes.eventType = "OBJECT_FINALIZE"'
    where = subscription_filter(locations)
    where = f"({where})" if " OR " in where else where
    combined = f"{finalize} AND {where}" if where else finalize
    return combined if len(combined.encode()) <= MAX_FILTER_BYTES else finalize


def default_subscription(node_name: str, topic: str, locations: Iterable[Location]) -> str:
    """A subscription id of its own for this node, topic and set of prefixes.

    Another topic or `--path` gives another subscription rather than reusing
    one that delivers the wrong messages.
    """
    cleaned = re.sub(r"[^A-Za-z0-9._~+%-]", "-", node_name).strip("-") or "node"
    what = "\n".join([topic, *sorted(loc.url() for loc in locations)])
    return f"poltergust-{cleaned[:200]}-{hashlib.sha256(what.encode()).hexdigest()[:8]}"


class PubSubEvents(ClosingSource):
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
        self._publisher: pubsub_v1.PublisherClient | None = None
        self._future: pubsub_v1.subscriber.futures.StreamingPullFuture | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ours = False
        """Whether the subscription is this node's (created by it, or matching what it needs): only then delete it."""

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
        assert self._subscriber is not None
        wanted = subscription_filter(self._locations)
        request = {
            "name": self.subscription,
            "topic": self.topic,
            "filter": wanted,
            "ack_deadline_seconds": 30,
            "expiration_policy": {"ttl": {"seconds": SUBSCRIPTION_TTL_SECONDS}},
            "message_retention_duration": {"seconds": 600},
        }
        try:
            self._subscriber.create_subscription(request=request)
            self._ours = True
            log.info("created subscription %s on %s%s", self.subscription, self.topic,
                     f" filtered by {wanted}" if wanted else " (unfiltered: the paths make too long a filter)")
            return
        except gexc.AlreadyExists:
            pass
        existing = self._subscriber.get_subscription(request={"subscription": self.subscription})
        if existing.topic != self.topic or existing.filter != wanted:
            raise SubscriptionMismatch(
                f"subscription {self.subscription} exists on {existing.topic} with filter {existing.filter!r}, "
                f"but this node needs {self.topic} with filter {wanted!r}: delete it, or pick another "
                "--subscription"
            )
        self._ours = True
        log.info("using existing subscription %s", self.subscription)

    def _on_message(self, message: pubsub_v1.subscriber.message.Message) -> None:
        # Runs on a client thread: hand over to the loop and return at once.
        metrics.EVENTS_RECEIVED.labels(*delivery_labels(message.attributes, self._locations)).inc()
        event = parse_notification(message.attributes, self._locations, message.data)
        if event is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        message.ack()

    async def get(self) -> Event:
        return await self._queue.get()

    async def call_for_help(self, bucket: str, name: str, generation: int, wanted: int, wave: int) -> None:
        if self._publisher is None:
            self._publisher = pubsub_v1.PublisherClient()
        future = self._publisher.publish(
            self.topic, b"", eventType=HELP, bucketId=bucket[len("gs://"):], objectId=name,
            objectGeneration=str(generation), poltergustWanted=str(wanted), poltergustWave=str(wave),
        )
        await asyncio.wrap_future(future)

    @property
    def broken(self) -> BaseException | None:
        """The error that ended the stream, if it has ended."""
        if self._future is not None and self._future.done():
            return self._future.exception() or RuntimeError("subscription stream closed")
        return None

    async def close(self, delete: bool = False) -> None:
        """Stop receiving; with `delete`, also remove the subscription (a clean shutdown leaves nothing behind)."""
        if self._future is not None:
            self._future.cancel()
            # Blocks until the client's threads have stopped; a broken stream's error was already reported.
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._future.result)
            self._future = None
        if delete and self._ours:
            await asyncio.to_thread(self._delete_subscription)
        if self._subscriber is not None:
            await asyncio.to_thread(self._subscriber.close)
            self._subscriber = None
        if self._publisher is not None and delete:
            await asyncio.to_thread(self._publisher.stop)
            self._publisher = None

    def _delete_subscription(self) -> None:
        subscriber = self._subscriber or pubsub_v1.SubscriberClient()
        try:
            subscriber.delete_subscription(request={"subscription": self.subscription}, timeout=10)
            log.info("deleted subscription %s", self.subscription)
        except gexc.NotFound:
            pass
        except Exception as exc:  # noqa: BLE001 -- its TTL removes it anyway
            log.warning("could not delete subscription %s (its TTL will): %s", self.subscription, exc)
        finally:
            if subscriber is not self._subscriber:
                subscriber.close()
