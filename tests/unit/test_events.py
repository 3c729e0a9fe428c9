"""The event bus: numbering, the ring buffer, replay after an id, and subscriber queues."""

import asyncio
import json
import logging
import re

import pytest

from voxanode.events import (
    Event,
    EventBus,
    EventBusClosed,
    EventType,
    MalformedEventId,
    SubscriberTooSlow,
    UnknownEventId,
    parse_event_id,
)

NODE_ID = "node-1a2b3c4d5e6f"
OTHER_NODE_ID = "node-9f8e7d6c5b4a"
EVENT_ID_PATTERN = re.compile(r"evt-1a2b3c4d5e6f-\d{16}")


def make_bus(**options) -> EventBus:
    options.setdefault("first_sequence", 1)
    return EventBus(NODE_ID, **options)


def publish_joins(bus: EventBus, count: int) -> list[Event]:
    return [
        bus.publish(EventType.NODE_JOINED, {"node_id": f"node-{index:012x}"})
        for index in range(count)
    ]


async def take(subscription, count: int) -> list[Event]:
    """Return the next `count` events of the subscription, failing after a second."""
    events = []
    async with asyncio.timeout(1):
        for _ in range(count):
            events.append(await anext(subscription))
    return events


def ids(events) -> list[str]:
    return [event.event_id for event in events]


# --- events and their ids ------------------------------------------------------------


def test_publish_numbers_events_in_order():
    bus = make_bus()
    events = publish_joins(bus, 3)

    assert ids(events) == [
        "evt-1a2b3c4d5e6f-0000000000000001",
        "evt-1a2b3c4d5e6f-0000000000000002",
        "evt-1a2b3c4d5e6f-0000000000000003",
    ]
    assert bus.last_event_id == events[-1].event_id


def test_event_ids_sort_across_restart():
    first_run = EventBus(NODE_ID)
    before = first_run.publish("node_joined", {"node_id": OTHER_NODE_ID})
    second_run = EventBus(NODE_ID)
    after = second_run.publish("node_joined", {"node_id": OTHER_NODE_ID})

    assert EVENT_ID_PATTERN.fullmatch(before.event_id)
    assert EVENT_ID_PATTERN.fullmatch(after.event_id)
    assert after.event_id > before.event_id


def test_publish_fills_event_fields():
    bus = make_bus()
    event = bus.publish(
        "node_left", {"node_id": OTHER_NODE_ID}, {"reason": "failed", "address": "127.0.0.3:9999"}
    )

    assert event.type is EventType.NODE_LEFT
    assert event.node_id == NODE_ID
    assert event.subject == {"node_id": OTHER_NODE_ID}
    assert event.data == {"reason": "failed", "address": "127.0.0.3:9999"}
    assert isinstance(event.timestamp, float)


def test_event_to_json_shape():
    event = Event(
        event_id="evt-1a2b3c4d5e6f-0000000000000042",
        type=EventType.APP_FAILED,
        timestamp=1750593600.75,
        node_id=NODE_ID,
        subject={"app_id": "app-12345", "node_id": OTHER_NODE_ID},
        data={"reason": "image not found"},
    )

    assert event.to_json() == {
        "event_id": "evt-1a2b3c4d5e6f-0000000000000042",
        "type": "app_failed",
        "timestamp": "2025-06-22T12:00:00Z",
        "source_node_id": NODE_ID,
        "app_id": "app-12345",
        "node_id": OTHER_NODE_ID,
        "data": {"reason": "image not found"},
    }
    assert json.loads(event.json_text) == event.to_json()


def test_publish_copies_subject_and_data():
    bus = make_bus()
    subject = {"node_id": OTHER_NODE_ID}
    data = {"address": "127.0.0.3:9999"}
    event = bus.publish("node_joined", subject, data)
    subject["node_id"] = "changed"
    data["address"] = "changed"

    assert event.subject == {"node_id": OTHER_NODE_ID}
    assert event.data == {"address": "127.0.0.3:9999"}


@pytest.mark.parametrize(
    "event_type, subject, data, error",
    [
        ("node_exploded", {"node_id": OTHER_NODE_ID}, None, ValueError),
        ("node_joined", {"node": OTHER_NODE_ID}, None, ValueError),
        ("node_joined", {"event_id": "evt-x-1"}, None, ValueError),
        ("node_joined", {"source_node_id": NODE_ID}, None, ValueError),
        ("node_joined", {"node_id": 42}, None, TypeError),
        ("node_joined", {"node_id": OTHER_NODE_ID}, {"when": object()}, TypeError),
    ],
    ids=[
        "unknown type",
        "key without _id",
        "event_id key",
        "source key",
        "int id",
        "non-JSON data",
    ],
)
def test_publish_rejects_bad_event(event_type, subject, data, error):
    bus = make_bus()
    with pytest.raises(error):
        bus.publish(event_type, subject, data)

    assert bus.recent() == []
    assert bus.last_event_id is None


def test_publish_logs_one_debug_line(caplog):
    bus = make_bus()
    with caplog.at_level(logging.DEBUG, logger="voxanode.events"):
        event = bus.publish("node_joined", {"node_id": OTHER_NODE_ID})

    records = [record for record in caplog.records if record.name == "voxanode.events"]
    assert len(records) == 1
    assert records[0].levelno == logging.DEBUG
    assert event.event_id in records[0].getMessage()
    assert "type=node_joined" in records[0].getMessage()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "evt-",
        "evt-1a2b3c4d5e6f",
        "evt-1a2b3c4d5e6f-",
        "evt-1a2b-3c4d-1",
        "event-1a2b-1",
        "evt-1a2b-12x",
        "evt-1a2b-" + "1" * 21,
    ],
)
def test_parse_event_id_rejects_malformed(text):
    with pytest.raises(MalformedEventId):
        parse_event_id(text)


def test_parse_event_id_splits_parts():
    assert parse_event_id("evt-1a2b3c4d5e6f-0000000000000042") == ("1a2b3c4d5e6f", 42)


@pytest.mark.parametrize(
    "options",
    [
        {"buffer_size": 0},
        {"client_queue_size": 0},
        {"first_sequence": 0},
    ],
)
def test_event_bus_rejects_bad_options(options):
    with pytest.raises(ValueError):
        make_bus(**options)


def test_event_bus_rejects_bad_node_id():
    with pytest.raises(ValueError):
        EventBus("node-has-dashes")


# --- the ring buffer and replay ----------------------------------------------------------


def test_ring_buffer_keeps_newest_events():
    bus = make_bus(buffer_size=3)
    events = publish_joins(bus, 5)

    assert ids(bus.recent()) == ids(events[2:])


def test_recent_after_id_returns_later_events():
    bus = make_bus()
    events = publish_joins(bus, 5)

    assert ids(bus.recent(events[1].event_id)) == ids(events[2:])
    assert bus.recent(events[-1].event_id) == []


def test_recent_after_dropped_neighbour_id():
    # The event just before the oldest buffered one is gone, but every event after it
    # is still buffered, so the replay has no gap.
    bus = make_bus(buffer_size=3)
    events = publish_joins(bus, 5)

    assert ids(bus.recent(events[1].event_id)) == ids(events[2:])


def test_recent_expired_id():
    bus = make_bus(buffer_size=3)
    events = publish_joins(bus, 5)

    with pytest.raises(UnknownEventId) as raised:
        bus.recent(events[0].event_id)

    assert raised.value.expired is True
    assert raised.value.event_id == events[0].event_id
    assert "no longer buffered" in raised.value.message


def test_recent_id_from_before_restart():
    first_run = make_bus(first_sequence=1)
    old = publish_joins(first_run, 3)
    second_run = make_bus(first_sequence=100)
    publish_joins(second_run, 3)

    with pytest.raises(UnknownEventId) as raised:
        second_run.recent(old[-1].event_id)

    assert raised.value.expired is True
    assert "older than this node's current run" in raised.value.message
    assert "no longer buffered" not in raised.value.message


def test_recent_id_never_published():
    bus = make_bus()
    publish_joins(bus, 2)

    with pytest.raises(UnknownEventId) as raised:
        bus.recent("evt-1a2b3c4d5e6f-0000000000000099")

    assert raised.value.expired is False
    assert "never published" in raised.value.message


def test_recent_id_of_other_node():
    bus = make_bus()
    publish_joins(bus, 2)

    with pytest.raises(UnknownEventId) as raised:
        bus.recent("evt-9f8e7d6c5b4a-0000000000000001")

    assert raised.value.expired is False
    assert "not published by this node" in raised.value.message


def test_recent_malformed_id():
    bus = make_bus()
    with pytest.raises(MalformedEventId):
        bus.recent("evt-nonsense")


# --- subscriptions ---------------------------------------------------------------------


async def test_subscription_receives_live_events_in_order():
    bus = make_bus()
    subscription = bus.subscribe()
    events = publish_joins(bus, 4)

    assert ids(await take(subscription, 4)) == ids(events)


async def test_subscribe_since_replays_then_streams():
    bus = make_bus()
    before = publish_joins(bus, 4)
    subscription = bus.subscribe(since=before[1].event_id)
    after = publish_joins(bus, 2)

    received = await take(subscription, 4)

    assert ids(received) == ids(before[2:] + after)


async def test_subscribe_since_replay_exceeds_queue_size():
    bus = make_bus(buffer_size=50, client_queue_size=2)
    before = publish_joins(bus, 20)
    subscription = bus.subscribe(since=before[0].event_id)
    after = publish_joins(bus, 2)

    received = await take(subscription, 21)

    assert ids(received) == ids(before[1:] + after)
    assert subscription.overflowed is False


def test_subscribe_unknown_since_registers_nothing():
    bus = make_bus()
    with pytest.raises(UnknownEventId):
        bus.subscribe(since="evt-1a2b3c4d5e6f-0000000000000007")

    assert bus.subscriber_count == 0


async def test_subscription_type_filter():
    bus = make_bus()
    first = bus.publish("node_joined", {"node_id": OTHER_NODE_ID})
    bus.publish("node_left", {"node_id": OTHER_NODE_ID}, {"reason": "left"})
    replayed = bus.publish("node_joined", {"node_id": OTHER_NODE_ID})
    subscription = bus.subscribe(
        since=first.event_id, types=["node_joined", EventType.APP_DEPLOYED]
    )
    bus.publish("node_suspected", {"node_id": OTHER_NODE_ID})
    live = bus.publish("app_deployed", {"app_id": "app-1"})

    assert ids(await take(subscription, 2)) == [replayed.event_id, live.event_id]


def test_subscribe_rejects_unknown_type():
    bus = make_bus()
    with pytest.raises(ValueError):
        bus.subscribe(types=["node_exploded"])


async def test_overflow_marks_only_slow_subscriber():
    bus = make_bus(client_queue_size=3)
    slow = bus.subscribe()
    fast = bus.subscribe()
    published = []
    for _ in range(5):
        published += publish_joins(bus, 1)
        assert ids(await take(fast, 1)) == ids(published[-1:])

    assert slow.overflowed is True
    assert slow.ended is True
    assert fast.overflowed is False
    assert bus.subscriber_count == 1

    later = publish_joins(bus, 2)
    assert ids(await take(fast, 2)) == ids(later)


async def test_overflowed_subscription_delivers_queue_then_raises():
    bus = make_bus(client_queue_size=3)
    slow = bus.subscribe()
    published = publish_joins(bus, 5)

    assert ids(await take(slow, 3)) == ids(published[:3])
    with pytest.raises(SubscriberTooSlow) as raised:
        await take(slow, 1)
    assert raised.value.queue_size == 3


def test_publish_never_waits_for_full_queue():
    # publish is synchronous: with no consumer running at all it still returns.
    bus = make_bus(client_queue_size=1)
    subscription = bus.subscribe()
    events = publish_joins(bus, 100)

    assert len(events) == 100
    assert subscription.overflowed is True
    assert len(bus.recent()) == 100


async def test_close_removes_subscription():
    bus = make_bus()
    first = bus.subscribe()
    second = bus.subscribe()
    assert bus.subscriber_count == 2

    first.close()
    first.close()

    assert bus.subscriber_count == 1
    assert first.closed is True
    assert first.ended is True
    publish_joins(bus, 1)
    with pytest.raises(StopAsyncIteration):
        await anext(first)
    assert len(await take(second, 1)) == 1


async def test_close_wakes_waiting_consumer():
    bus = make_bus()
    subscription = bus.subscribe()

    async def consume():
        return [event async for event in subscription]

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0)
    publish_joins(bus, 1)
    await asyncio.sleep(0)
    subscription.close()

    async with asyncio.timeout(1):
        received = await consumer
    assert len(received) == 1


async def test_wait_ended_returns_on_overflow():
    bus = make_bus(client_queue_size=1)
    subscription = bus.subscribe()
    waiter = asyncio.create_task(subscription.wait_ended())
    await asyncio.sleep(0)
    assert not waiter.done()

    publish_joins(bus, 2)

    async with asyncio.timeout(1):
        await waiter
    assert subscription.overflowed is True


async def test_bus_close_ends_subscriptions():
    bus = make_bus()
    subscription = bus.subscribe()
    bus.close()

    assert bus.subscriber_count == 0
    with pytest.raises(StopAsyncIteration):
        await anext(subscription)
    with pytest.raises(EventBusClosed):
        bus.subscribe()

    event = bus.publish("node_left", {"node_id": OTHER_NODE_ID}, {"reason": "left"})
    assert bus.recent()[-1] == event
