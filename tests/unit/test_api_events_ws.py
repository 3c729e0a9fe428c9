"""`/ws/network/events` over a real aiohttp server on 127.0.0.1, fed by a real EventBus."""

import asyncio
import json
import logging
import struct
from pathlib import Path

import aiohttp
import pytest

from stopped_reader import CLOSE_OPCODE, TEXT_OPCODE, StoppedReader, upgrade_headers
from test_api_fakes import FakeNode, serve_api  # noqa: F401 - fixtures are used by name
from voxanode.api.app import start_api
from voxanode.api.routes import events as events_routes
from voxanode.events import DEFAULT_CLIENT_QUEUE_SIZE, EventBus, EventType

EVENTS_PATH = "/ws/network/events"
WAIT_SECONDS = 5.0
# Room for the events that a stopped client has not read, besides its queue. Linux
# doubles the socket's send buffer but fills it with its bookkeeping too. The write
# buffer counts twice, for one frame over its limit and the client's receive buffer.
MAX_UNREAD_BYTES = 2 * events_routes.SEND_BUFFER_BYTES + 2 * events_routes.WRITE_BUFFER_BYTES
# A test gives up after this many events. Without the bounds on the node's buffers,
# a client that stopped reading was still open after 30,000 events.
MAX_SLOW_TEST_EVENTS = 5000


class EventsNode(FakeNode):
    """The fake API node with a real event bus."""

    def __init__(self, data_dir: Path, **bus_options):
        super().__init__(data_dir)
        self.events = EventBus(self.node_id, **bus_options)


@pytest.fixture
def events_node(tmp_path: Path) -> EventsNode:
    return EventsNode(tmp_path / "data")


@pytest.fixture
async def client(serve_api, events_node: EventsNode) -> aiohttp.ClientSession:
    return await serve_api(events_node)


async def wait_until(predicate, message: str) -> None:
    """Poll `predicate` every 10 ms. Fail with `message` after WAIT_SECONDS."""
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(message)
        await asyncio.sleep(0.01)


async def receive_events(websocket, count: int) -> list[dict]:
    events = []
    for _ in range(count):
        message = await websocket.receive(timeout=WAIT_SECONDS)
        assert message.type is aiohttp.WSMsgType.TEXT, message
        events.append(json.loads(message.data))
    return events


def publish_joins(bus: EventBus, count: int, **data) -> list:
    return [
        bus.publish(EventType.NODE_JOINED, {"node_id": f"node-{index:012x}"}, data)
        for index in range(count)
    ]


def ids(events) -> list[str]:
    return [event["event_id"] if isinstance(event, dict) else event.event_id for event in events]


async def publish_until_dropped(bus: EventBus, reader) -> list:
    """Publish member events one at a time until a subscription is dropped.

    `reader`, a client that keeps up, receives each event before the next one is
    published, which also gives the server time to write to the other sockets.
    """
    published = []
    subscribers = bus.subscriber_count
    while bus.subscriber_count == subscribers and len(published) < MAX_SLOW_TEST_EVENTS:
        published += publish_joins(bus, 1, address="127.0.0.3:9999")
        assert ids(await receive_events(reader, 1)) == ids(published[-1:])
    assert bus.subscriber_count == subscribers - 1, f"no client dropped after {len(published)} events"
    return published


async def serve_events(node: "EventsNode") -> tuple:
    """Start the API for `node`; return the runner, its host and port, and a session."""
    runner = await start_api(node)
    host, port = runner.addresses[0][:2]
    return runner, host, port, aiohttp.ClientSession(base_url=f"http://{host}:{port}")


# --- streaming ---------------------------------------------------------------------------


async def test_events_ws_streams_live_events(client, events_node):
    async with client.ws_connect(EVENTS_PATH) as websocket:
        published = publish_joins(events_node.events, 5, address="127.0.0.3:9999")

        received = await receive_events(websocket, 5)

    assert received == [event.to_json() for event in published]


async def test_events_ws_since_replays_without_gap(client, events_node):
    bus = events_node.events
    before = publish_joins(bus, 4)

    async with client.ws_connect(EVENTS_PATH, params={"since": before[1].event_id}) as websocket:
        after = publish_joins(bus, 2)
        received = await receive_events(websocket, 4)

    assert ids(received) == ids(before[2:] + after)


async def test_events_ws_types_filter(client, events_node):
    bus = events_node.events
    params = {"types": "node_left,app_failed"}
    async with client.ws_connect(EVENTS_PATH, params=params) as websocket:
        bus.publish("node_joined", {"node_id": "node-000000000001"})
        left = bus.publish("node_left", {"node_id": "node-000000000001"}, {"reason": "left"})
        bus.publish("app_deployed", {"app_id": "app-1"})
        failed = bus.publish("app_failed", {"app_id": "app-1"}, {"reason": "image not found"})

        received = await receive_events(websocket, 2)

    assert ids(received) == [left.event_id, failed.event_id]


async def test_events_ws_ignores_client_frames(client, events_node):
    async with client.ws_connect(EVENTS_PATH) as websocket:
        await websocket.send_str("hello")
        await websocket.send_str("{not json")
        await websocket.send_bytes(b"\x00\xff binary")
        published = publish_joins(events_node.events, 1)

        received = await receive_events(websocket, 1)

    assert ids(received) == ids(published)


async def test_events_ws_oversized_client_frame_closes(client, events_node):
    websocket = await client.ws_connect(EVENTS_PATH)
    await websocket.send_str("x" * (events_routes.MAX_CLIENT_FRAME_BYTES + 1))

    message = await websocket.receive(timeout=WAIT_SECONDS)

    assert message.type is aiohttp.WSMsgType.CLOSE
    assert message.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    await websocket.close()
    await wait_until(
        lambda: events_node.events.subscriber_count == 0, "the subscription stayed open"
    )


async def test_events_ws_client_close_ends_subscription(client, events_node):
    websocket = await client.ws_connect(EVENTS_PATH)
    assert events_node.events.subscriber_count == 1

    await websocket.close()

    await wait_until(
        lambda: events_node.events.subscriber_count == 0, "the subscription stayed open"
    )


async def test_events_ws_stopped_reader_closed_4008(events_node):
    bus = events_node.events
    runner, host, port, session = await serve_events(events_node)
    stopped = None
    try:
        stopped = await StoppedReader.connect(host, port, EVENTS_PATH)
        reader = await session.ws_connect(EVENTS_PATH)
        await wait_until(lambda: bus.subscriber_count == 2, "a client was not subscribed")

        # Ordinary events, while one client reads nothing and the other reads each one.
        loop = asyncio.get_running_loop()
        started = loop.time()
        published = await publish_until_dropped(bus, reader)
        publishing_seconds = loop.time() - started

        # Events went into the socket before the queue filled, but only a bounded number.
        count, event_bytes = len(published), len(published[0].json_text)
        assert count > DEFAULT_CLIENT_QUEUE_SIZE
        assert count <= DEFAULT_CLIENT_QUEUE_SIZE + MAX_UNREAD_BYTES // event_bytes, (
            f"4008 after {count} events of {event_bytes} bytes"
        )
        assert publishing_seconds < WAIT_SECONDS

        later = publish_joins(bus, 3)
        assert ids(await receive_events(reader, 3)) == ids(later)

        # The stopped client now reads: the events sent before the close, then 4008.
        received = []
        async with asyncio.timeout(events_routes.CLOSE_TIMEOUT_SECONDS):
            opcode, payload = await stopped.read_frame()
            while opcode == TEXT_OPCODE:
                received.append(json.loads(payload))
                opcode, payload = await stopped.read_frame()

        assert opcode == CLOSE_OPCODE
        assert struct.unpack("!H", payload[:2])[0] == events_routes.SLOW_CLIENT_CLOSE_CODE
        assert payload[2:].decode() == (
            f"client too slow: event queue of {DEFAULT_CLIENT_QUEUE_SIZE} full"
        )
        # Every event up to the one that overflowed the queue, in order.
        assert ids(received) == ids(published[:-1])

        more = publish_joins(bus, 1)
        assert ids(await receive_events(reader, 1)) == ids(more)
        await reader.close()
    finally:
        if stopped is not None:
            stopped.close()
        await session.close()
        await runner.cleanup()


async def test_events_ws_stuck_client_disconnected(events_node, monkeypatch):
    monkeypatch.setattr(events_routes, "CLOSE_TIMEOUT_SECONDS", 0.2)
    bus = events_node.events
    runner, host, port, session = await serve_events(events_node)
    streams = runner.app[events_routes.EVENT_STREAMS_KEY]
    stuck = None
    try:
        stuck = await StoppedReader.connect(host, port, EVENTS_PATH)
        reader = await session.ws_connect(EVENTS_PATH)
        await wait_until(lambda: bus.subscriber_count == 2, "a client was not subscribed")

        await publish_until_dropped(bus, reader)

        # The stuck client never reads, so neither its queued events nor the close
        # frame can be sent. The server gives up and resets the connection, which
        # also discards what the kernel still held for the client.
        await wait_until(
            lambda: len(streams.open) == 1, "the server kept the stuck client's stream"
        )
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(WAIT_SECONDS):
                await stuck.read_until_closed()

        later = publish_joins(bus, 1)
        assert ids(await receive_events(reader, 1)) == ids(later)
        await reader.close()
    finally:
        if stuck is not None:
            stuck.close()
        await session.close()
        await runner.cleanup()


async def test_events_ws_heartbeat_drops_silent_client(
    serve_api, events_node, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger=events_routes.__name__)
    monkeypatch.setattr(events_routes, "HEARTBEAT_SECONDS", 0.2)
    client = await serve_api(events_node)
    # Without autoping the client never replies to the server's pings.
    request_id = "silent-client-1"
    websocket = await client.ws_connect(
        EVENTS_PATH, autoping=False, headers={"X-Request-ID": request_id}
    )

    message = await websocket.receive(timeout=WAIT_SECONDS)
    assert message.type is aiohttp.WSMsgType.PING

    def dropped() -> list[str]:
        return [
            record.getMessage()
            for record in caplog.records
            if record.levelno == logging.INFO and "sent no pong" in record.getMessage()
        ]

    await wait_until(lambda: dropped(), "the server kept a client that sends no pongs")
    assert events_node.events.subscriber_count == 0
    [line] = dropped()
    assert f"request_id={request_id}" in line
    assert "remote=127.0.0.1" in line
    assert "subscription=sub-1" in line
    # No close frame: the server dropped the connection.
    message = await websocket.receive(timeout=WAIT_SECONDS)
    assert message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR), message
    await websocket.close()


# --- closing from the node side ------------------------------------------------------------


async def test_events_ws_shutdown_closes_1001(events_node):
    runner = await start_api(events_node)
    host, port = runner.addresses[0][:2]
    session = aiohttp.ClientSession()
    try:
        websocket = await session.ws_connect(f"http://{host}:{port}{EVENTS_PATH}")
        cleanup = asyncio.create_task(runner.cleanup())

        message = await websocket.receive(timeout=WAIT_SECONDS)

        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == aiohttp.WSCloseCode.GOING_AWAY
        assert message.extra == "node shutting down"
        async with asyncio.timeout(WAIT_SECONDS):
            await cleanup
        assert events_node.events.subscriber_count == 0
    finally:
        await session.close()
        await runner.cleanup()


async def test_events_ws_bus_closed_closes_1001(client, events_node):
    websocket = await client.ws_connect(EVENTS_PATH)

    events_node.events.close()
    message = await websocket.receive(timeout=WAIT_SECONDS)

    assert message.type is aiohttp.WSMsgType.CLOSE
    assert message.data == aiohttp.WSCloseCode.GOING_AWAY
    await websocket.close()

    async with client.get(EVENTS_PATH, headers=upgrade_headers()) as response:
        body = await response.json()
    assert response.status == 503
    assert body["error"]["code"] == "SERVICE_UNAVAILABLE"


# --- rejected requests ---------------------------------------------------------------------


async def test_events_plain_get_needs_upgrade(client):
    async with client.get(EVENTS_PATH) as response:
        body = await response.json()

    assert response.status == 400
    assert body["success"] is False
    assert body["error"]["code"] == "INVALID_REQUEST"
    assert "websocket" in body["error"]["message"]
    assert body["error"]["details"]["field"] == "Upgrade"
    assert body["request_id"] == response.headers["X-Request-ID"]


@pytest.mark.parametrize(
    "params, status, code, field",
    [
        ({"since": "evt-nonsense"}, 400, "INVALID_REQUEST", "since"),
        ({"since": "evt-9f8e7d6c5b4a-0000000000000001"}, 404, "RESOURCE_NOT_FOUND", "since"),
        ({"types": "node_joined,node_exploded"}, 400, "INVALID_REQUEST", "types"),
        ({"types": ","}, 400, "INVALID_REQUEST", "types"),
    ],
    ids=["malformed since", "since of other node", "unknown type", "empty types"],
)
async def test_events_ws_rejects_bad_query(client, events_node, params, status, code, field):
    publish_joins(events_node.events, 1)
    async with client.get(EVENTS_PATH, params=params, headers=upgrade_headers()) as response:
        body = await response.json()

    assert response.status == status
    assert body["error"]["code"] == code
    assert body["error"]["details"]["field"] == field
    assert events_node.events.subscriber_count == 0


async def test_events_ws_unknown_type_named(client):
    params = {"types": "node_joined,node_exploded"}
    async with client.get(EVENTS_PATH, params=params, headers=upgrade_headers()) as response:
        body = await response.json()

    assert "node_exploded" in body["error"]["message"]
    assert body["error"]["details"]["value"] == "node_exploded"


async def test_events_ws_since_never_published(client, events_node):
    published = publish_joins(events_node.events, 1)
    source, sequence = published[0].event_id.rsplit("-", 1)
    future_id = f"{source}-{int(sequence) + 10:016d}"

    async with client.get(
        EVENTS_PATH, params={"since": future_id}, headers=upgrade_headers()
    ) as response:
        body = await response.json()

    assert response.status == 404
    assert body["error"]["code"] == "RESOURCE_NOT_FOUND"
    assert body["error"]["details"]["event_id"] == future_id
    assert "never published" in body["error"]["message"]


async def test_events_ws_since_expired_410(serve_api, tmp_path):
    node = EventsNode(tmp_path / "data", buffer_size=2)
    client = await serve_api(node)
    published = publish_joins(node.events, 5)

    async with client.get(
        EVENTS_PATH, params={"since": published[0].event_id}, headers=upgrade_headers()
    ) as response:
        body = await response.json()

    assert response.status == 410
    assert body["error"]["code"] == "RESOURCE_NOT_FOUND"
    assert body["error"]["details"]["field"] == "since"
    assert "no longer buffered" in body["error"]["details"]["issue"]
