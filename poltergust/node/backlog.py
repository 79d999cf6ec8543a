"""The backlog: a subscription all nodes share, holding one message per config not yet finished.

Its count of undelivered messages is "configs waiting or running", which the
autoscaler reads, so it must exist while no node runs (the deploy creates it;
a node creates it if missing). A node pulls at most --max-concurrent messages
at a time. Anything but a config upload under the node's prefixes is acked at
once; a config upload is held (the client library extends its lease) while the
node runs it exactly as for its own events, and acked only when that run has
ended here and the config generation is finished: it has a result, was deleted
or replaced. A stopping node nacks what it holds so that another node gets it;
a killed node's leases expire and Pub/Sub redelivers them.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from poltergust.backoff import Backoff
from poltergust.events.pubsub import backlog_filter, parse_notification
from poltergust.layout import Location, RunKey
from poltergust.settings import Settings
from poltergust.storage import NotFound, ObjectInfo, ObjectStore, StorageError

log = logging.getLogger(__name__)

RETENTION_SECONDS = 7 * 24 * 3600
"""A config waits up to a week for a node: the longest Pub/Sub keeps a message."""
RETRY_SECONDS = 10.0
"""A run that ended here with its config unfinished is handed back after this pause (no tight redelivery loop)."""


class RunTable(Protocol):
    """What the backlog needs of a node (see `lifecycle.Node`)."""

    stopping: asyncio.Event

    def schedule(self, key: RunKey, found_at_start: bool = False, info: ObjectInfo | None = None) -> bool: ...

    def task(self, key: RunKey) -> asyncio.Task[None] | None: ...

    def store(self, bucket: str) -> ObjectStore: ...


def ensure_subscription(subscriber: pubsub_v1.SubscriberClient, subscription: str, topic: str,
                        locations: list[Location], ack_deadline: int) -> None:
    """Create the backlog subscription if missing: never expiring, keeping messages as long as Pub/Sub allows.

    Only config uploads belong in it (`backlog_filter`); an existing one with another filter is used but named in
    the log, because Pub/Sub cannot change a subscription's filter.
    """
    request = {
        "name": subscription,
        "topic": topic,
        "filter": backlog_filter(locations),
        "ack_deadline_seconds": ack_deadline,
        "expiration_policy": {},
        "message_retention_duration": {"seconds": RETENTION_SECONDS},
    }
    try:
        subscriber.create_subscription(request=request)
        log.info("created backlog subscription %s on %s", subscription, topic)
    except gexc.AlreadyExists:
        existing = subscriber.get_subscription(request={"subscription": subscription}).filter
        if existing != request["filter"]:
            log.warning("backlog subscription %s has filter %r, not %r: it wakes nodes for events that are no "
                        "config upload; terraform apply replaces it, or delete it and run deploy/gcloud/create.sh "
                        "again", subscription, existing, request["filter"])
        log.info("using backlog subscription %s", subscription)


async def finished(store: ObjectStore, key: RunKey) -> bool:
    """Whether the config generation needs no more work: its result is claimed, or it was deleted or replaced."""
    try:
        info = await store.stat(key.name)
    except NotFound:
        return True
    return info.generation != key.generation


class Backlog:
    """This node's share of the backlog subscription, bridged from the client's threads into asyncio."""

    def __init__(self, settings: Settings, node: RunTable) -> None:
        self.settings = settings
        self.node = node
        project = settings.project
        topic = settings.topic
        self.topic = topic if topic.startswith("projects/") else f"projects/{project}/topics/{topic}"
        name = settings.backlog_subscription
        self.subscription = name if name.startswith("projects/") else f"projects/{project}/subscriptions/{name}"
        self._held: dict[RunKey, list[Any]] = {}
        """Messages held per run key (a redelivery while the first is held joins it)."""
        self._watchers: set[asyncio.Task[None]] = set()
        self._subscriber: pubsub_v1.SubscriberClient | None = None
        self._future: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._closing = False

    async def __aenter__(self) -> "Backlog":
        self._loop = asyncio.get_running_loop()
        self._keeper = asyncio.create_task(self._keep_attached())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _keep_attached(self, check_every: float = 5.0) -> None:
        """Subscribe, and subscribe again whenever the stream breaks (held messages are simply redelivered)."""
        backoff = Backoff(first=1.0, cap=30.0)
        while True:
            if self._future is None or self._future.done():
                try:
                    await self._attach()
                    backoff.reset()
                except Exception as exc:  # noqa: BLE001 -- any failure here is worth another try
                    delay = backoff.next()
                    log.error("cannot attach the backlog subscription (%s); trying again in %.0fs", exc, delay)
                    await asyncio.sleep(delay)
                    continue
            await asyncio.sleep(check_every)

    async def _attach(self) -> None:
        if self._subscriber is None:
            self._subscriber = pubsub_v1.SubscriberClient()
        await asyncio.to_thread(ensure_subscription, self._subscriber, self.subscription, self.topic,
                                self.settings.locations, self.settings.backlog_ack_deadline)
        flow = pubsub_v1.types.FlowControl(
            max_messages=self.settings.max_concurrent,
            max_lease_duration=self.settings.backlog_max_lease,
            max_duration_per_lease_extension=self.settings.backlog_ack_deadline,
        )
        self._future = self._subscriber.subscribe(self.subscription, callback=self._on_message, flow_control=flow)
        log.info("pulling the backlog from %s, at most %d at a time", self.subscription, self.settings.max_concurrent)

    def _on_message(self, message: Any) -> None:
        # Runs on a client thread: a message that is not a config upload for us is done with at once.
        event = parse_notification(message.attributes, self.settings.locations, message.data)
        if event is None or event.kind != "finalize" or self._loop is None:
            message.ack()
            return
        self._loop.call_soon_threadsafe(self._hold, RunKey(event.bucket, event.name, event.generation), message,
                                        event.info)

    def _stopping(self) -> bool:
        return self._closing or self.node.stopping.is_set()

    def _hold(self, key: RunKey, message: Any, info: ObjectInfo | None = None) -> None:
        if key in self._held or self._stopping():
            # A redelivery joins the held one. While stopping, `close` hands it back once the stream stopped:
            # a nack now could come straight back to this node.
            self._held.setdefault(key, []).append(message)
            return
        self._held[key] = [message]
        # As if found by a first scan: a redelivered message may be one this node's earlier self held (see
        # `membership.take_start`); the run is taken back only if its start marker names this node.
        self.node.schedule(key, True, info)
        log.info("backlog: holding %s#%d", key.url(), key.generation)
        task = asyncio.create_task(self._release_when_done(key))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _release_when_done(self, key: RunKey) -> None:
        """Ack the key's messages once its run ended here and the config is finished; else hand them back."""
        done = False
        try:
            run = self.node.task(key)
            if run is not None:
                await asyncio.wait({run})
            if not self._stopping():
                done = await finished(self.node.store(key.bucket), key)
                if not done:
                    log.info("backlog: %s#%d ended here unfinished; handing it back in %.0fs",
                             key.url(), key.generation, RETRY_SECONDS)
                    await asyncio.sleep(RETRY_SECONDS)
        except StorageError as exc:
            log.warning("backlog: cannot check %s#%d (%s); handing it back", key.url(), key.generation, exc)
        finally:
            if done or not self._stopping():
                for message in self._held.pop(key, []):
                    if done:
                        message.ack()
                    else:
                        message.nack()
            if done:
                log.info("backlog: %s#%d finished, acknowledged", key.url(), key.generation)

    async def close(self) -> None:
        """Stop pulling, then hand back every held message at once (a nack each) so that other nodes get them."""
        self._closing = True
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if self._future is not None:
            self._future.cancel()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._future.result)
            self._future = None
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        ack_ids = [message.ack_id for messages in self._held.values() for message in messages]
        self._held.clear()
        if self._subscriber is not None:
            if ack_ids:
                try:
                    await asyncio.to_thread(self._subscriber.modify_ack_deadline, request={
                        "subscription": self.subscription, "ack_ids": ack_ids, "ack_deadline_seconds": 0})
                    log.info("backlog: handed back %d message(s)", len(ack_ids))
                except Exception as exc:  # noqa: BLE001 -- their leases run out instead
                    log.warning("backlog: could not hand back %d message(s) (their leases run out): %s",
                                len(ack_ids), exc)
            await asyncio.to_thread(self._subscriber.close)
            self._subscriber = None
