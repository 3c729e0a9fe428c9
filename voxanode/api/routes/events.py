"""The network event stream: `GET /ws/network/events`, a websocket of node and app events.

The server sends each event as one JSON text frame, `Event.to_json()` (voxanode.events
describes its fields). Query parameters:

- `since=EVENT_ID` first replays the buffered events after that id, then sends live
  events, with no gap and no duplicate. A client that reconnects passes the id of the
  last event it received.
- `types=node_joined,node_left` sends only events of those types. The parameter may
  also be repeated.

A request that cannot become a stream gets the JSON error envelope before the upgrade:

- 400 INVALID_REQUEST without websocket upgrade headers, for a malformed `since`, or
  for an unknown type.
- 404 RESOURCE_NOT_FOUND when this node never published the `since` event.
- 410 RESOURCE_NOT_FOUND when the `since` event is no longer buffered.
- 503 SERVICE_UNAVAILABLE while the node shuts down.

The server ignores the text and binary frames that the client sends. When the client
has sent nothing for HEARTBEAT_SECONDS, the server pings it. If no pong arrives within
half that time, the server drops the connection without a close frame, resetting it
when events are still unsent, and logs the request id, the client's address and the
subscription id. Close codes the server sends:

- 1000: reply to the client's own close.
- 1001: the node is shutting down.
- 1009: the client sent a frame larger than MAX_CLIENT_FRAME_BYTES.
- 1011: sending failed inside the server.
- 4008: the client is too slow. Its queue of events filled up because it reads more
  slowly than events arrive. It may reconnect with `since` set to the last event it
  received.

Events that a client has not read wait in three bounded places on the node: the
socket's send buffer, set to SEND_BUFFER_BYTES (Linux doubles the value to cover its
bookkeeping and then no longer resizes the buffer), the connection's write buffer,
where the sender waits while it contains more than WRITE_BUFFER_BYTES, and the
subscription's queue of `client_queue_size` events (256 by default). The queue fills
only once both buffers are full, so the node keeps a bounded amount of data for a
client that stops reading, whatever its own kernel settings. The client's kernel
takes events into its receive buffer too, so the count before 4008 depends on that
buffer: measured on loopback with events of about 220 bytes, about 800 events with an
8 KiB buffer and 1,500 with a fixed 128 KiB one, and thousands when Linux lets the
buffer grow.

A client that does not take the close frame within CLOSE_TIMEOUT_SECONDS loses the
connection without one: the server resets it, discarding the data still unsent.
"""

import asyncio
import logging
import socket
import struct
from dataclasses import dataclass, field

from aiohttp import WSCloseCode, web
from aiohttp.abc import AbstractStreamWriter

from voxanode.api.errors import ApiError, ErrorCode, invalid_field
from voxanode.api.keys import NODE_KEY, request_id_of
from voxanode.api.response_headers import prepare_stream
from voxanode.api.routes import add_get
from voxanode.events import (
    EventBusClosed,
    EventType,
    MalformedEventId,
    SubscriberTooSlow,
    Subscription,
    UnknownEventId,
    parse_event_id,
)

EVENTS_PATH = "/ws/network/events"
# Interval of the server's pings. A client that sends nothing for this long and then
# does not reply to a ping with a pong within half of it is dropped as dead.
HEARTBEAT_SECONDS = 20.0
# Bounds on the unsent data of one stream, described in the module docstring. Without
# them Linux grows a socket's send buffer up to net.ipv4.tcp_wmem's maximum (4 MiB on
# the test machine). That is room for about 19,000 events of 220 bytes, by estimate, so
# the queue of a client that stopped reading would almost never fill. The send buffer also caps a stream at about its size
# per round trip, by estimate still over a thousand events a second over a 200 ms path.
SEND_BUFFER_BYTES = 64 * 1024
WRITE_BUFFER_BYTES = 16 * 1024
# struct linger {l_onoff = 1, l_linger = 0}: closing the socket resets the connection.
LINGER_ZERO = struct.pack("ii", 1, 0)
# Clients have nothing to send, so a small limit is enough for pings and close frames.
MAX_CLIENT_FRAME_BYTES = 4096
# Time for each closing step: a slow client taking its queued events, and the close
# handshake. After that the connection is aborted.
CLOSE_TIMEOUT_SECONDS = 5.0
SLOW_CLIENT_CLOSE_CODE = 4008
SHUTDOWN_CLOSE_REASON = "node shutting down"
MAX_TYPES_PARAMETER_CHARS = 1024

logger = logging.getLogger(__name__)


@dataclass
class EventStreams:
    """The open event websockets of one API app, closed together when the node stops."""

    open: dict[web.WebSocketResponse, web.Request] = field(default_factory=dict)
    shutting_down: bool = False


EVENT_STREAMS_KEY = web.AppKey("event_streams", EventStreams)


def add_routes(app: web.Application) -> None:
    app[EVENT_STREAMS_KEY] = EventStreams()
    app.on_shutdown.append(close_event_streams)
    add_get(app, EVENTS_PATH, network_events)


async def network_events(request: web.Request) -> web.StreamResponse:
    """Stream the node's network events to a websocket client until one side closes."""
    websocket = web.WebSocketResponse(
        heartbeat=HEARTBEAT_SECONDS, max_msg_size=MAX_CLIENT_FRAME_BYTES
    )
    # The parameters are checked before the upgrade, so that a client whose upgrade
    # was refused can repeat the request as a plain GET to read the error envelope.
    since = _since_parameter(request)
    types = _types_parameter(request)
    streams = request.app[EVENT_STREAMS_KEY]
    if streams.shutting_down:
        raise _shutting_down_error()

    try:
        subscription = request.app[NODE_KEY].events.subscribe(since=since, types=types)
    except UnknownEventId as error:
        raise _unknown_since_error(error) from error
    except EventBusClosed as error:
        raise _shutting_down_error() from error
    if not websocket.can_prepare(request).ok:
        subscription.close()
        raise _upgrade_required_error()

    try:
        bound_unsent_data(request)
        writer = await prepare_stream(request, websocket)
        assert writer is not None, "a prepared websocket has a writer"
        streams.open[websocket] = request
        logger.debug(
            "event stream opened request_id=%s remote=%s subscription=%s since=%s",
            request_id_of(request),
            request.remote,
            subscription.subscription_id,
            since,
        )
        sent_close_code = await _stream_events(request, websocket, writer, subscription)
    finally:
        subscription.close()
        streams.open.pop(websocket, None)

    if sent_close_code is None and _missed_pong(websocket):
        logger.info(
            "event stream dropped, client sent no pong within %.1f s request_id=%s"
            " remote=%s subscription=%s",
            HEARTBEAT_SECONDS / 2,
            request_id_of(request),
            request.remote,
            subscription.subscription_id,
        )
        # aiohttp only closed the transport, which keeps the connection open until its
        # buffered events are sent, and a client that sends no pongs reads none of them.
        abort_connection(request)

    logger.debug(
        "event stream closed request_id=%s subscription=%s sent_close_code=%s"
        " close_code=%s",
        request_id_of(request),
        subscription.subscription_id,
        sent_close_code,
        websocket.close_code,
    )
    return websocket


async def close_event_streams(app: web.Application) -> None:
    """Close every open event websocket with 1001, as the app's on_shutdown step."""
    streams = app[EVENT_STREAMS_KEY]
    streams.shutting_down = True
    closing = [
        close_socket(request, websocket, WSCloseCode.GOING_AWAY, SHUTDOWN_CLOSE_REASON)
        for websocket, request in list(streams.open.items())
    ]
    if closing:
        logger.debug("closing %d event streams for shutdown", len(closing))
        await asyncio.gather(*closing)


async def close_socket(
    request: web.Request, websocket: web.WebSocketResponse, code: int, reason: str
) -> None:
    """Close `websocket` with `code` and `reason`, or abort the connection after the timeout."""
    try:
        await asyncio.wait_for(
            websocket.close(code=code, message=reason.encode()), CLOSE_TIMEOUT_SECONDS
        )
    except TimeoutError:
        logger.debug(
            "close handshake timed out, aborting request_id=%s remote=%s code=%d",
            request_id_of(request),
            request.remote,
            code,
        )
        abort_connection(request)


def abort_connection(request: web.Request) -> None:
    """Drop the connection at once, discarding the data that the client has not taken.

    A plain abort only closes the socket: the kernel keeps the data that a client
    which does not read has not taken, and the connection with it. Lingering for zero
    seconds makes the kernel discard the data and reset the connection.
    """
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
        except OSError:
            pass  # The connection is already gone.
    transport.abort()


async def _stream_events(
    request: web.Request,
    websocket: web.WebSocketResponse,
    writer: AbstractStreamWriter,
    subscription: Subscription,
) -> int | None:
    """Run the sender and the reader until the subscription ends, then close if needed.

    Returns the close code that the server sent, or None when it sent none because the
    client closed first or the connection broke.

    The subscription ends when the client closes or disconnects (the reader closes it),
    when the sender stops, when it overflows, or when the bus is closed. The handler
    waits on that end rather than on the sender, because a sender blocked on a client
    that stopped reading would never notice the overflow.
    """
    name = subscription.subscription_id
    sender = asyncio.create_task(
        _send_events(websocket, writer, subscription), name=f"events-send-{name}"
    )
    reader = asyncio.create_task(
        _discard_client_frames(websocket, subscription), name=f"events-read-{name}"
    )
    try:
        await subscription.wait_ended()

        if subscription.overflowed:
            await _close_slow_client(request, websocket, subscription, sender)
            return SLOW_CLIENT_CLOSE_CODE
        # NOTE: no test reaches this branch, because publish already rejects events
        # that do not encode, so only a bug elsewhere would end the sender this way.
        if sender.done() and not sender.cancelled() and sender.exception() is not None:
            logger.error(
                "sending events failed request_id=%s subscription=%s",
                request_id_of(request),
                name,
                exc_info=sender.exception(),
            )
            await close_socket(
                request, websocket, WSCloseCode.INTERNAL_ERROR, "internal error"
            )
            return WSCloseCode.INTERNAL_ERROR
        if request.app[NODE_KEY].events.closed and not websocket.closed:
            await close_socket(
                request, websocket, WSCloseCode.GOING_AWAY, SHUTDOWN_CLOSE_REASON
            )
            return WSCloseCode.GOING_AWAY
        return None
    finally:
        for task in (sender, reader):
            task.cancel()
        await asyncio.gather(sender, reader, return_exceptions=True)


async def _send_events(
    websocket: web.WebSocketResponse,
    writer: AbstractStreamWriter,
    subscription: Subscription,
) -> None:
    """Send each event as a text frame until the subscription or the connection ends.

    After each frame it waits while the write buffer is above WRITE_BUFFER_BYTES, so
    that the events a client does not take stay in the subscription's queue.
    Unexpected errors propagate to the task, which the handler inspects.
    """
    try:
        async for event in subscription:
            await websocket.send_str(event.json_text)
            # send_str itself waits for the transport only after a large amount of
            # output (256 KiB in aiohttp 3.14), which would hide a stopped client.
            await writer.drain()
    except SubscriberTooSlow:
        pass  # Every queued event was sent. The handler sends the close frame.
    except ConnectionResetError:
        pass  # The connection is closing. The reader sees that too.
    finally:
        subscription.close()


async def _discard_client_frames(
    websocket: web.WebSocketResponse, subscription: Subscription
) -> None:
    """Read and ignore the client's frames, so pings, pongs and close frames are handled.

    Iteration ends when the connection closes, for whatever reason. The subscription
    then ends with it.
    """
    try:
        async for _message in websocket:
            pass
    finally:
        subscription.close()


async def _close_slow_client(
    request: web.Request,
    websocket: web.WebSocketResponse,
    subscription: Subscription,
    sender: asyncio.Task,
) -> None:
    """Send the events still queued for the client, then close with 4008."""
    reason = f"client too slow: event queue of {subscription.queue_size} full"
    logger.warning(
        "closing event stream, client too slow request_id=%s remote=%s subscription=%s"
        " queue_size=%d",
        request_id_of(request),
        request.remote,
        subscription.subscription_id,
        subscription.queue_size,
    )
    # The sender stops by itself after the last queued event. A client that does not
    # read at all keeps it blocked, and then the close frame follows the sent data.
    await asyncio.wait({sender}, timeout=CLOSE_TIMEOUT_SECONDS)
    await close_socket(request, websocket, SLOW_CLIENT_CLOSE_CODE, reason)


def bound_unsent_data(request: web.Request) -> None:
    """Set the connection's send buffer and write buffer limit for a websocket stream.

    See SEND_BUFFER_BYTES. The event and log streams call it before the upgrade. The
    connection is not reused after the websocket, so the limits end with it.
    """
    transport = request.transport
    if transport is None:
        return
    transport.set_write_buffer_limits(high=WRITE_BUFFER_BYTES)
    sock = transport.get_extra_info("socket")
    try:
        if sock is None:
            raise OSError("the transport has no socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    except OSError as error:
        logger.warning(
            "setting the send buffer of a websocket stream failed, so a client that stops"
            " reading gets 4008 only after more data request_id=%s remote=%s error=%s",
            request_id_of(request),
            request.remote,
            error,
        )


def _missed_pong(websocket: web.WebSocketResponse) -> bool:
    """Return whether aiohttp dropped the connection because no pong followed its ping."""
    return websocket.close_code == WSCloseCode.ABNORMAL_CLOSURE and isinstance(
        websocket.exception(), asyncio.TimeoutError
    )


def _since_parameter(request: web.Request) -> str | None:
    since = request.query.get("since")
    if since is None:
        return None
    try:
        parse_event_id(since)
    except MalformedEventId as error:
        raise invalid_field("since", str(error)) from error
    return since


def _types_parameter(request: web.Request) -> frozenset[EventType] | None:
    values = request.query.getall("types", [])
    if not values:
        return None
    text = ",".join(values)
    if len(text) > MAX_TYPES_PARAMETER_CHARS:
        raise invalid_field(
            "types", f"must be at most {MAX_TYPES_PARAMETER_CHARS} characters long"
        )

    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise invalid_field("types", "must name at least one event type")
    known = [str(event_type) for event_type in EventType]
    for name in names:
        if name not in known:
            raise invalid_field(
                "types",
                f"unknown event type {name!r}. Known types: {', '.join(known)}",
                value=name,
                allowed=known,
            )
    return frozenset(EventType(name) for name in names)


def _upgrade_required_error() -> ApiError:
    return ApiError(
        400,
        ErrorCode.INVALID_REQUEST,
        f"{EVENTS_PATH} is a websocket endpoint: send a GET request with the headers"
        " Connection: Upgrade, Upgrade: websocket, Sec-WebSocket-Version: 13 and"
        " Sec-WebSocket-Key",
        {"field": "Upgrade", "issue": "a websocket upgrade is required"},
    )


def _unknown_since_error(error: UnknownEventId) -> ApiError:
    status = 410 if error.expired else 404
    return ApiError(
        status,
        ErrorCode.RESOURCE_NOT_FOUND,
        error.message,
        {"field": "since", "issue": error.message, "event_id": error.event_id},
    )


def _shutting_down_error() -> ApiError:
    return ApiError(
        503,
        ErrorCode.SERVICE_UNAVAILABLE,
        "the node is shutting down and opens no new event streams."
        " Connect to another node or retry after the restart",
    )
