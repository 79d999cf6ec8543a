"""How a node hears about configs: GCS notifications through Pub/Sub (`pubsub`), or a watched directory (`local`).

Events are hints: the node re-reads the bucket for each, and its periodic
rescan covers anything a lost event would have said.
"""
from __future__ import annotations

from poltergust.events.base import Event, EventSource
from poltergust.events.local import LocalEvents
from poltergust.events.pubsub import PubSubEvents, default_subscription
from poltergust.layout import Location

__all__ = ["Event", "EventSource", "LocalEvents", "PubSubEvents", "open_events"]


def open_events(locations: list[Location], node_name: str, project: str, topic: str,
                subscription: str = "") -> EventSource:
    """The event source for the node's locations (all in buckets, or all local directories)."""
    if locations[0].is_gcs:
        return PubSubEvents(project, topic, subscription or default_subscription(node_name, topic, locations),
                            locations)
    return LocalEvents(locations)
