"""Network events: their types, the `Event` record, and the `EventBus` that fans them out.

Membership and the app controller call `EventBus.publish` when they learn that a node
joined, left or became suspect, or that an app was deployed, failed or was rebalanced.
The bus numbers each event, keeps the last `buffer_size` events in a ring buffer for
clients that reconnect, and copies each event into the bounded queue of every
subscription. The websocket route `/ws/network/events` is one such subscriber.

Event ids are `evt-<node id without "node-">-<sequence>`, with the sequence as 16
zero-padded decimal digits, for example `evt-1a2b3c4d5e6f-1767225600000042`. The node
part makes ids unique across the network. The sequence goes up by one per event and
starts at the node's start time in microseconds, so ids from one node sort in
publication order, also across restarts, as strings and as numbers.

`Event.to_json()` is the JSON object sent to clients. The subject's ids sit at the top
level next to the fixed fields:

    {
      "event_id": "evt-1a2b3c4d5e6f-1767225600000042",
      "type": "node_left",
      "timestamp": "2026-01-01T00:00:00Z",
      "source_node_id": "node-1a2b3c4d5e6f",
      "node_id": "node-9f8e7d6c5b4a",
      "data": {"reason": "failed", "address": "127.0.0.3:9999"}
    }

`source_node_id` is the node that observed and published the event. The subject keys
(here `node_id`, or `app_id` for app events) name what the event is about. `timestamp`
is UTC in whole seconds, and `event_id` gives the exact order.

The bus is not thread-safe: call `publish` on the event loop's thread. Code running in
an executor thread hands its events over with `loop.call_soon_threadsafe`.
"""

import asyncio
import json
import logging
import re
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from itertools import islice
from typing import Any

from voxanode.api.timestamps import isoformat_utc

DEFAULT_BUFFER_SIZE = 1000
DEFAULT_CLIENT_QUEUE_SIZE = 256
EVENT_ID_PREFIX = "evt-"
NODE_ID_PREFIX = "node-"
SEQUENCE_DIGITS = 16
NANOSECONDS_PER_MICROSECOND = 1000
EVENT_ID_PATTERN = re.compile(r"evt-([0-9A-Za-z]{1,64})-([0-9]{1,20})")
EVENT_ID_EXAMPLE = "evt-1a2b3c4d5e6f-1767225600000042"
SOURCE_PATTERN = re.compile(r"[0-9A-Za-z]{1,64}")
SUBJECT_KEY_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,62}_id")
# Top-level keys of Event.to_json() that a subject key must not replace.
RESERVED_JSON_KEYS = frozenset(
    {"event_id", "type", "timestamp", "source_node_id", "data"}
)

logger = logging.getLogger(__name__)


class EventType(StrEnum):
    """Kind of a network event. Its values are the `type` strings that clients receive."""

    NODE_JOINED = "node_joined"
    NODE_LEFT = "node_left"
    NODE_SUSPECTED = "node_suspected"
    APP_DEPLOYED = "app_deployed"
    APP_FAILED = "app_failed"
    LOAD_REBALANCED = "load_rebalanced"


class EventBusError(Exception):
    """Base of the errors that the event bus raises."""


class MalformedEventId(EventBusError, ValueError):
    """A text that is not an event id of the form `evt-<node>-<sequence>`."""

    def __init__(self, text: str):
        super().__init__(f"not an event id like {EVENT_ID_EXAMPLE}")
        self.text = text


class UnknownEventId(EventBusError):
    """An event id whose successors the bus cannot replay.

    `expired` is True when the event is older than the ring buffer, or was published
    before the node last started. It is False when this node never published an event
    with that id.
    """

    def __init__(self, event_id: str, message: str, *, expired: bool):
        super().__init__(message)
        self.event_id = event_id
        self.message = message
        self.expired = expired


class SubscriberTooSlow(EventBusError):
    """A subscription's queue was full when an event arrived, so the bus dropped it."""

    def __init__(self, subscription_id: str, queue_size: int):
        super().__init__(
            f"subscription {subscription_id} fell behind: its queue of {queue_size}"
            " events was full"
        )
        self.subscription_id = subscription_id
        self.queue_size = queue_size


class EventBusClosed(EventBusError):
    """The bus was closed because the node is stopping, so it takes no subscribers."""


@dataclass(frozen=True)
class Event:
    """One network event, as published by the node `node_id`.

    `timestamp` is a Unix time in seconds. `subject` maps id names such as `node_id`
    or `app_id` to the ids the event is about, and `data` contains the details.
    """

    event_id: str
    type: EventType
    timestamp: float
    node_id: str
    subject: dict[str, str] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object sent to clients, in the shape the module docstring shows."""
        return {
            "event_id": self.event_id,
            "type": str(self.type),
            "timestamp": isoformat_utc(self.timestamp),
            "source_node_id": self.node_id,
            **self.subject,
            "data": self.data,
        }

    @cached_property
    def json_text(self) -> str:
        """The compact JSON text of `to_json()`, encoded once and shared by all clients."""
        return json.dumps(self.to_json(), separators=(",", ":"))


def parse_event_id(text: str) -> tuple[str, int]:
    """Split an event id into its node part and its sequence number.

    Raises MalformedEventId when `text` does not have the form `evt-<node>-<sequence>`.
    """
    match = EVENT_ID_PATTERN.fullmatch(text)
    if match is None:
        raise MalformedEventId(text)
    return match.group(1), int(match.group(2))


class Subscription:
    """A subscriber's view of the bus: an async iterator of events in publication order.

    It first yields the replayed events that `EventBus.subscribe` copied from the ring
    buffer, then live events from a queue of at most `queue_size` events. When an event
    arrives while that queue is full, the bus marks the subscription overflowed and
    stops delivering to it. The iterator then yields the events still queued and
    raises SubscriberTooSlow. After `close()`, iteration ends with StopAsyncIteration and the
    events still queued are dropped.

    A subscription has one consumer: concurrent `__anext__` calls are not supported.
    """

    def __init__(
        self,
        bus: "EventBus",
        subscription_id: str,
        queue_size: int,
        types: frozenset[EventType] | None,
        replay: Iterable[Event],
    ):
        self.subscription_id = subscription_id
        self.queue_size = queue_size
        self.types = types
        self.overflowed = False
        self.closed = False
        self._bus = bus
        # The replay is bounded by the ring buffer, so it never counts against
        # queue_size: a client may reconnect with a long backlog.
        self._replay: deque[Event] = deque(replay)
        self._queue: deque[Event] = deque()
        self._ready = asyncio.Event()
        self._ended = asyncio.Event()

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> Event:
        while True:
            if self.closed:
                raise StopAsyncIteration
            if self._replay:
                return self._replay.popleft()
            if self._queue:
                return self._queue.popleft()
            if self.overflowed:
                raise SubscriberTooSlow(self.subscription_id, self.queue_size)
            self._ready.clear()
            await self._ready.wait()

    @property
    def ended(self) -> bool:
        """Whether the bus stopped delivering live events: overflowed or closed."""
        return self._ended.is_set()

    async def wait_ended(self) -> None:
        """Wait until the subscription overflows or is closed."""
        await self._ended.wait()

    def close(self) -> None:
        """Remove the subscription from the bus and end its iteration. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self._bus._remove(self)
        self._replay.clear()
        self._queue.clear()
        self._ready.set()
        self._ended.set()

    def accepts(self, event: Event) -> bool:
        """Return whether the subscription's type filter lets `event` through."""
        return self.types is None or event.type in self.types

    def _deliver(self, event: Event) -> bool:
        """Queue a live event without waiting. Return False when the queue was full."""
        if len(self._queue) >= self.queue_size:
            self.overflowed = True
            self._ready.set()
            self._ended.set()
            return False
        self._queue.append(event)
        self._ready.set()
        return True


class EventBus:
    """Numbers, buffers and fans out the network events published on one node.

    `buffer_size` is how many recent events the ring buffer keeps for replay, and
    `client_queue_size` how many undelivered live events each subscription may queue
    before it is dropped as too slow. `first_sequence` sets the first event's sequence
    number, and by default is the current time in microseconds.
    """

    def __init__(
        self,
        node_id: str,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        client_queue_size: int = DEFAULT_CLIENT_QUEUE_SIZE,
        *,
        first_sequence: int | None = None,
    ):
        source = node_id.removeprefix(NODE_ID_PREFIX)
        if not SOURCE_PATTERN.fullmatch(source):
            raise ValueError(
                f"node id {node_id!r} must be 'node-' and 1 to 64 letters or digits"
            )
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, not {buffer_size}")
        if client_queue_size < 1:
            raise ValueError(
                f"client_queue_size must be at least 1, not {client_queue_size}"
            )
        if first_sequence is None:
            # NOTE: a node restarted after its clock stepped back could reuse sequence
            # numbers of its previous run. Replays stay correct within one run.
            first_sequence = time.time_ns() // NANOSECONDS_PER_MICROSECOND
        if first_sequence < 1:
            raise ValueError(f"first_sequence must be at least 1, not {first_sequence}")

        self.node_id = node_id
        self.buffer_size = buffer_size
        self.client_queue_size = client_queue_size
        self.closed = False
        self._source = source
        self._first_sequence = first_sequence
        self._next_sequence = first_sequence
        self._buffer: deque[Event] = deque(maxlen=buffer_size)
        self._subscriptions: dict[str, Subscription] = {}
        self._subscription_count = 0

    @property
    def subscriber_count(self) -> int:
        """The number of subscriptions that still receive live events."""
        return len(self._subscriptions)

    @property
    def last_event_id(self) -> str | None:
        """The id of the newest published event, or None before the first one."""
        return self._buffer[-1].event_id if self._buffer else None

    def publish(
        self,
        event_type: EventType | str,
        subject: Mapping[str, str],
        data: Mapping[str, Any] | None = None,
    ) -> Event:
        """Number an event, keep it in the ring buffer and queue it for every subscriber.

        Never waits: a subscriber whose queue is full is marked overflowed and dropped.
        Raises ValueError for an unknown type or a subject key that is not `<name>_id`,
        and TypeError when subject or data cannot be encoded as JSON. The event keeps
        shallow copies of `subject` and `data`, and its JSON text is fixed here.
        """
        event = Event(
            event_id=self._format_event_id(self._next_sequence),
            type=EventType(event_type),
            timestamp=time.time(),
            node_id=self.node_id,
            subject=_checked_subject(subject),
            data=dict(data or {}),
        )
        # Encoding now rejects a value that is not JSON before the buffer keeps it.
        encoded_bytes = len(event.json_text.encode())
        self._next_sequence += 1
        self._buffer.append(event)

        for subscription in list(self._subscriptions.values()):
            if subscription.accepts(event) and not subscription._deliver(event):
                self._remove(subscription)
                logger.debug(
                    "subscription overflowed subscription=%s queue_size=%d event_id=%s",
                    subscription.subscription_id,
                    subscription.queue_size,
                    event.event_id,
                )

        logger.debug(
            "event published event_id=%s type=%s bytes=%d subscribers=%d",
            event.event_id,
            event.type,
            encoded_bytes,
            len(self._subscriptions),
        )
        return event

    def recent(self, since_event_id: str | None = None) -> list[Event]:
        """Return the buffered events, oldest first, or only those after `since_event_id`.

        Raises MalformedEventId for a text that is not an event id, and UnknownEventId
        when the events after it are no longer all buffered or it was never published here.
        """
        if since_event_id is None:
            return list(self._buffer)

        source, sequence = parse_event_id(since_event_id)
        last_sequence = self._next_sequence - 1
        oldest_sequence = self._next_sequence - len(self._buffer)
        if source != self._source:
            raise UnknownEventId(
                since_event_id,
                f"event {since_event_id} was not published by this node"
                f" ({self.node_id}): event ids are per node",
                expired=False,
            )
        if sequence > last_sequence:
            raise UnknownEventId(
                since_event_id,
                f"event {since_event_id} was never published by this node."
                f" The newest event is {self.last_event_id or 'none yet'}",
                expired=False,
            )
        if sequence < self._first_sequence:
            raise UnknownEventId(
                since_event_id,
                f"event {since_event_id} is older than this node's current run, whose event ids"
                f" start at {self._format_event_id(self._first_sequence)}; only events of the"
                " current run are replayed. Subscribe without since to receive new events",
                expired=True,
            )
        # The replay is complete when `sequence` is at most one below the oldest
        # buffered event, so the id that left the buffer last is still accepted.
        if sequence < oldest_sequence - 1:
            raise UnknownEventId(
                since_event_id,
                f"event {since_event_id} is no longer buffered: this node keeps the"
                f" last {self.buffer_size} events of its current run."
                " Subscribe without since to receive new events",
                expired=True,
            )
        return list(islice(self._buffer, sequence - oldest_sequence + 1, None))

    def subscribe(
        self,
        since: str | None = None,
        types: Iterable[EventType | str] | None = None,
    ) -> Subscription:
        """Register a subscription to live events, after replaying the events after `since`.

        `types` limits the subscription, replay included, to those event types. Raises
        MalformedEventId and UnknownEventId as `recent` does, ValueError for an unknown
        type, and EventBusClosed after `close()`.
        """
        if self.closed:
            raise EventBusClosed(f"the event bus of {self.node_id} is closed")
        type_filter = None if types is None else frozenset(EventType(t) for t in types)
        replay = self.recent(since) if since is not None else []

        self._subscription_count += 1
        subscription = Subscription(
            self,
            f"sub-{self._subscription_count}",
            self.client_queue_size,
            type_filter,
            (event for event in replay if type_filter is None or event.type in type_filter),
        )
        # Replay and registration happen without an await in between, so no event
        # published meanwhile can be missed or delivered twice.
        self._subscriptions[subscription.subscription_id] = subscription
        logger.debug(
            "subscribed subscription=%s since=%s replayed=%d",
            subscription.subscription_id,
            since,
            len(replay),
        )
        return subscription

    def close(self) -> None:
        """End every subscription and reject new ones. Publishing still fills the buffer."""
        self.closed = True
        for subscription in list(self._subscriptions.values()):
            subscription.close()

    def _remove(self, subscription: Subscription) -> None:
        self._subscriptions.pop(subscription.subscription_id, None)

    def _format_event_id(self, sequence: int) -> str:
        return f"{EVENT_ID_PREFIX}{self._source}-{sequence:0{SEQUENCE_DIGITS}d}"


def _checked_subject(subject: Mapping[str, str]) -> dict[str, str]:
    """Copy the subject, checking that each key is `<name>_id` and each value a string."""
    checked = {}
    for key, value in subject.items():
        if not isinstance(key, str) or not SUBJECT_KEY_PATTERN.fullmatch(key):
            raise ValueError(f"subject key {key!r} must be a lowercase name ending in _id")
        if key in RESERVED_JSON_KEYS:
            raise ValueError(f"subject key {key!r} is a reserved event field")
        if not isinstance(value, str):
            raise TypeError(f"subject {key} must be a string id, not {type(value).__name__}")
        checked[key] = value
    return checked
