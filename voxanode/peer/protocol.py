"""The peer protocol: Kademlia RPCs over authenticated UDP datagrams.

`PeerProtocol` subclasses the `kademlia` package's protocol, so its routing table and
node lookups work unchanged, and it replaces the `rpcudp` transport layer underneath.
Every datagram is signed or carries a session tag (see `framing`). It is checked
against size limits before it is parsed, and dropped with a counted reason when
anything is wrong, so no datagram can crash the node or flood its log. Requests are
dispatched to a fixed set of `rpc_*` handlers with a bound on how many run at once.

Records larger than one datagram travel in chunks: `store_chunk` sends a record in
pieces that the receiver reassembles and checks against its SHA-256, and `fetch_chunk`
reads a large record from a holder piece by piece.
"""

import asyncio
import hashlib
import ipaddress
import logging
import os
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

from kademlia.node import Node
from kademlia.protocol import KademliaProtocol

from voxanode.identity import DHT_ID_BYTES, Identity, readable_node_id
from voxanode.peer.framing import (
    FRAME_OVERHEAD_BYTES,
    KIND_NOTIFY,
    KIND_REQUEST,
    KIND_RESPONSE,
    MSG_ID_BYTES,
    DropReason,
    Frame,
    FrameError,
    SessionKeys,
    decode_frame,
    encode_session_frame,
    encode_signed_frame,
    peek_request_id,
    session_hint,
)
from voxanode.peer.sealing import Keyring, SealError

MAX_CONCURRENT_REQUESTS = 256
MAX_CHUNK_TRANSFERS_PER_PEER = 4
MAX_CHUNK_TRANSFERS = 64
CHUNK_TRANSFER_TIMEOUT_SECONDS = 30.0
CHUNK_CONCURRENCY = 4
CHUNK_ATTEMPTS = 2
REPLAY_CACHE_ENTRIES = 100_000
MAX_PEERS_COUNTED = 100_000
DROP_WARNING_INTERVAL_SECONDS = 60.0
SHA256_BYTES = 32
MAX_SESSIONS = 10_000
# Signed "session expired" replies to session frames that cannot be checked. They are
# rate-limited because the requests they reply to are unauthenticated.
SESSION_RESETS_PER_SECOND = 50
SESSION_EXPIRED = "session_expired"
QUIET_DROP_REASONS = frozenset({DropReason.OWN_MESSAGE, DropReason.UNEXPECTED_RESPONSE})

logger = logging.getLogger(__name__)


class PeerRequestError(Exception):
    """A peer's request has arguments of the wrong type or out of range."""


class RecordHolder(Protocol):
    """The interface of the component that keeps records, as the protocol calls it."""

    def accept_envelope(self, envelope: bytes, sender_id: bytes) -> tuple[bool, str]: ...

    def envelope_for(self, dht_key: bytes) -> bytes | None: ...

    def has_versions(self, items: list[tuple[bytes, int, bytes]]) -> list[bool]: ...

    def on_new_peer(self, node: Node) -> None: ...


@dataclass
class PeerStats:
    """Traffic figures of the peer socket since the node started.

    `connected_peers` counts the routing table's contacts here; the node replaces it
    with the members it reaches, and `routing_table_peers` keeps the table's size.
    """

    connected_peers: int
    total_connections: int
    bytes_sent: int
    bytes_received: int
    datagrams_sent: int
    datagrams_received: int
    datagrams_dropped: dict[str, int]
    bytes_sent_by_method: dict[str, int] = field(default_factory=dict)
    routing_table_peers: int = 0


@dataclass
class _PeerSession:
    """A peer's X25519 session key and the key derived from it."""

    public: bytes
    key: bytes
    # The peer has proved that it has this node's current X25519 key, so it can check
    # session frames sent to it.
    knows_ours: bool


class _RetrySigned:
    """Marks a call whose session frame the peer could not check."""


RETRY_SIGNED = _RetrySigned()


@dataclass
class _ChunkTransfer:
    total_size: int
    deadline: float
    buffer: bytearray
    pieces: dict[int, int] = field(default_factory=dict)

    @property
    def received(self) -> int:
        return sum(self.pieces.values())


def peer_label(address: tuple) -> str:
    """Return `host:port` for log lines."""
    return f"{address[0]}:{address[1]}"


def _require_bytes(value: Any, length: int, name: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != length:
        raise PeerRequestError(f"{name} must be {length} bytes")
    return value


def _require_int(value: Any, low: int, high: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise PeerRequestError(f"{name} must be an integer from {low} to {high}")
    return value


def parse_contact(item: Any) -> Node | None:
    """Return a Node from a peer's `[id, ip, port]` entry, or None if it is malformed."""
    if not isinstance(item, (list, tuple)) or len(item) != 3:
        return None
    node_id, ip, port = item
    if not isinstance(node_id, bytes) or len(node_id) != DHT_ID_BYTES:
        return None
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        return None
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return None
    return Node(node_id, ip, port)


class PeerProtocol(KademliaProtocol):
    """Kademlia over signed datagrams, with chunked transfer of large records."""

    def __init__(
        self,
        identity: Identity,
        holder: RecordHolder,
        *,
        ksize: int,
        max_datagram_bytes: int,
        rpc_timeout_seconds: float,
        clock_skew_seconds: float,
        max_record_bytes: int,
        keyring: Keyring | None = None,
    ):
        KademliaProtocol.__init__(self, Node(identity.dht_id), None, ksize)
        # Frames are sealed after they are encoded, so the limit for encoding and
        # decoding frames leaves room for the sealing overhead. datagram_received checks
        # a sealed datagram against the full limit before it opens it.
        self.keyring = keyring if keyring is not None else Keyring(None, [])
        self.max_sealed_bytes = max_datagram_bytes
        max_datagram_bytes -= self.keyring.overhead
        self._wait_timeout = rpc_timeout_seconds
        self.identity = identity
        self.holder = holder
        self.max_datagram_bytes = max_datagram_bytes
        self.chunk_bytes = max_datagram_bytes - FRAME_OVERHEAD_BYTES
        self.max_record_bytes = max_record_bytes
        self.clock_skew_ms = int(clock_skew_seconds * 1000)

        self.session_keys = SessionKeys()
        self._sessions: OrderedDict[bytes, _PeerSession] = OrderedDict()
        self._session_resets_left = SESSION_RESETS_PER_SECOND
        self._session_resets_second = 0
        self._outstanding: dict[bytes, tuple[asyncio.Future, asyncio.TimerHandle, tuple, bytes | None]] = {}
        self._handlers: set[asyncio.Task] = set()
        self._recent_requests: OrderedDict[tuple[bytes, bytes], int] = OrderedDict()
        self._inbound_chunks: dict[tuple[bytes, bytes], _ChunkTransfer] = {}
        self._handler_methods = {
            "ping": self.rpc_ping,
            "find_node": self.rpc_find_node,
            "find_value": self.rpc_find_value,
            "store": self.rpc_store,
            "store_chunk": self.rpc_store_chunk,
            "fetch_chunk": self.rpc_fetch_chunk,
            "has_records": self.rpc_has_records,
        }

        self.bytes_sent = 0
        self.bytes_received = 0
        self.datagrams_sent = 0
        self.datagrams_received = 0
        self.dropped: Counter[str] = Counter()
        # Requests and their responses both count under the request's method.
        self.bytes_sent_by_method: Counter[str] = Counter()
        # Requests and notifications by method: sent by this node, accepted from peers
        # for handling, rejected by the peer with an error reply, and unanswered
        # within the timeout. A retry after "session expired" counts as a second request.
        self.requests_sent: Counter[str] = Counter()
        self.requests_received: Counter[str] = Counter()
        self.requests_failed: Counter[str] = Counter()
        self.requests_timed_out: Counter[str] = Counter()
        self._dropped_reported: Counter[str] = Counter()
        self._next_drop_warning = 0.0
        self._peers_seen: set[bytes] = set()

    def register_handler(self, method: str, handler) -> None:
        """Serve `method` with `handler(sender, sender_id, *args)`, sync or async."""
        if method in self._handler_methods:
            raise ValueError(f"peer method {method!r} already has a handler")
        self._handler_methods[method] = handler

    def __getattr__(self, name: str) -> Any:
        # rpcudp turns any unknown attribute into a remote call; a typo here must fail.
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # -- transport ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.bytes_received += len(data)
        self.datagrams_received += 1
        if self.keyring.enabled:
            if len(data) > self.max_sealed_bytes:
                self._drop(DropReason.OVERSIZED, addr, f"{len(data)} bytes")
                return
            try:
                data = self.keyring.open(data)
            except SealError as error:
                self._drop(DropReason.UNSEALED, addr, str(error))
                return
        try:
            frame = decode_frame(data, self.max_datagram_bytes, self._session_key_for)
        except FrameError as error:
            self._drop(error.reason, addr, str(error))
            if error.reason is DropReason.UNKNOWN_SESSION:
                self._answer_session_expired(data, addr)
            return
        if frame.sender_id == self.identity.dht_id:
            self._drop(DropReason.OWN_MESSAGE, addr)
            return

        if frame.kind == KIND_RESPONSE:
            self._accept_response(frame, addr)
        else:
            self._accept_request(frame, addr)

    def error_received(self, exc: Exception) -> None:
        logger.debug("peer socket error: %s", exc)

    # -- sessions ----------------------------------------------------------------

    def _session_key_for(self, peer_id: bytes) -> bytes | None:
        session = self._sessions.get(peer_id)
        return session.key if session is not None else None

    def _note_session(self, frame: Frame) -> None:
        """Record a peer's session key from a signed frame, or that it has ours."""
        session = self._sessions.get(frame.sender_id)
        if not frame.signed:
            # A session frame whose tag checked out proves the peer has our current key.
            session.knows_ours = True
            self._sessions.move_to_end(frame.sender_id)
            return

        knows_ours = frame.peer_hint == self.session_keys.hint
        if session is None or session.public != frame.session_public:
            key = self.session_keys.derive(
                self.identity.dht_id, frame.sender_id, frame.session_public
            )
            if key is None:
                return
            session = _PeerSession(frame.session_public, key, knows_ours)
            self._sessions[frame.sender_id] = session
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        else:
            session.knows_ours = knows_ours
        self._sessions.move_to_end(frame.sender_id)

    def _encode(
        self, peer_id: bytes | None, kind: int, msg_id: bytes, method: str, payload: Any
    ) -> bytes:
        """Encode a frame for a peer: a session frame when it can check one, else signed."""
        sent_ms = int(time.time() * 1000)
        session = self._sessions.get(peer_id) if peer_id is not None else None
        if session is not None and session.knows_ours:
            return encode_session_frame(
                self.identity.dht_id,
                session.key,
                kind,
                msg_id,
                sent_ms,
                method,
                payload,
                self.max_datagram_bytes,
            )
        return encode_signed_frame(
            self.identity,
            self.session_keys.public,
            session_hint(session.public) if session is not None else b"",
            kind,
            msg_id,
            sent_ms,
            method,
            payload,
            self.max_datagram_bytes,
        )

    def _answer_session_expired(self, datagram: bytes, addr: tuple) -> None:
        """Tell a sender whose session frame could not be checked to send a signed one.

        This happens after this node restarted with a new session key, while the
        peer still uses the old one.
        """
        second = int(time.monotonic())
        if second != self._session_resets_second:
            self._session_resets_second = second
            self._session_resets_left = SESSION_RESETS_PER_SECOND
        if self._session_resets_left <= 0:
            return
        msg_id = peek_request_id(datagram, self.max_datagram_bytes)
        if msg_id is None:
            return
        self._session_resets_left -= 1
        reply = encode_signed_frame(
            self.identity,
            self.session_keys.public,
            b"",
            KIND_RESPONSE,
            msg_id,
            int(time.time() * 1000),
            "",
            [False, SESSION_EXPIRED],
            self.max_datagram_bytes,
        )
        self._send(reply, addr, "session_expired")

    def _send(self, datagram: bytes, address: tuple, method: str) -> None:
        """Seal and send a datagram; `method` names the RPC it belongs to in the counters."""
        if self.transport is None or self.transport.is_closing():
            return
        datagram = self.keyring.seal(datagram)
        self.transport.sendto(datagram, address)
        self.bytes_sent += len(datagram)
        self.datagrams_sent += 1
        self.bytes_sent_by_method[method] += len(datagram)

    def _drop(self, reason: DropReason, addr: tuple, detail: str = "") -> None:
        """Count a dropped datagram; log it at DEBUG and a summary WARNING at most once a minute."""
        self.dropped[reason.value] += 1
        logger.debug("dropped datagram from=%s reason=%s", peer_label(addr), detail or reason.value)
        now = time.monotonic()
        # Late replies to calls that timed out are normal under load: counted only.
        if reason in QUIET_DROP_REASONS or now < self._next_drop_warning:
            return
        self._next_drop_warning = now + DROP_WARNING_INTERVAL_SECONDS
        new = self.dropped - self._dropped_reported
        self._dropped_reported = self.dropped.copy()
        quiet = {reason.value for reason in QUIET_DROP_REASONS}
        summary = ", ".join(
            f"{name}={count}" for name, count in sorted(new.items()) if name not in quiet
        )
        logger.warning(
            "dropped invalid peer datagrams since last report: %s (latest from=%s)",
            summary,
            peer_label(addr),
        )

    # -- requests ----------------------------------------------------------------

    def _accept_request(self, frame, addr: tuple) -> None:
        now_ms = int(time.time() * 1000)
        if abs(now_ms - frame.sent_ms) > self.clock_skew_ms:
            self._drop(DropReason.STALE, addr, f"sent {now_ms - frame.sent_ms} ms ago")
            return
        replay_key = (frame.sender_id, frame.msg_id)
        if replay_key in self._recent_requests:
            self._drop(DropReason.REPLAYED, addr)
            return
        handler = self._handler_methods.get(frame.method)
        if handler is None:
            self._drop(DropReason.UNKNOWN_METHOD, addr, frame.method[:32])
            return
        if not isinstance(frame.payload, list):
            self._drop(DropReason.MALFORMED, addr, "arguments are not a list")
            return
        if len(self._handlers) >= MAX_CONCURRENT_REQUESTS:
            self._drop(DropReason.OVERLOADED, addr)
            return

        self._remember_request(replay_key, now_ms)
        self._note_session(frame)
        self.requests_received[frame.method] += 1
        if len(self._peers_seen) < MAX_PEERS_COUNTED:
            self._peers_seen.add(frame.sender_id)
        task = asyncio.get_running_loop().create_task(
            self._run_handler(handler, frame, addr)
        )
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    def _remember_request(self, replay_key: tuple[bytes, bytes], now_ms: int) -> None:
        # A request older than the clock skew bound is dropped as stale, so ids only
        # need remembering for twice that window.
        self._recent_requests[replay_key] = now_ms
        horizon = now_ms - 2 * self.clock_skew_ms
        while self._recent_requests:
            oldest_key, seen_ms = next(iter(self._recent_requests.items()))
            if seen_ms >= horizon and len(self._recent_requests) <= REPLAY_CACHE_ENTRIES:
                break
            del self._recent_requests[oldest_key]

    async def _run_handler(self, handler, frame, addr: tuple) -> None:
        try:
            result = handler(addr, frame.sender_id, *frame.payload)
            if asyncio.iscoroutine(result):
                result = await result
            if frame.kind == KIND_NOTIFY:
                return
            reply = [True, result]
        except (PeerRequestError, TypeError) as error:
            # TypeError: the peer sent the wrong number of arguments.
            self._drop(DropReason.BAD_REQUEST, addr, f"{frame.method}: {error}")
            if frame.kind == KIND_NOTIFY:
                return
            reply = [False, "invalid arguments"]
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception(
                "peer request failed method=%s from=%s", frame.method, peer_label(addr)
            )
            if frame.kind == KIND_NOTIFY:
                return
            reply = [False, "internal error"]
        try:
            datagram = self._encode(frame.sender_id, KIND_RESPONSE, frame.msg_id, "", reply)
        except ValueError as error:
            logger.error(
                "cannot send response method=%s to=%s: %s",
                frame.method,
                peer_label(addr),
                error,
            )
            return
        self._send(datagram, addr, frame.method)

    # -- responses and calls -------------------------------------------------------

    def _accept_response(self, frame, addr: tuple) -> None:
        pending = self._outstanding.get(frame.msg_id)
        if pending is None or pending[2][:2] != addr[:2]:
            self._drop(DropReason.UNEXPECTED_RESPONSE, addr)
            return
        future, timer, _, expected_id = pending
        if expected_id is not None and frame.sender_id != expected_id:
            self._drop(DropReason.WRONG_SENDER, addr)
            return
        payload = frame.payload
        if not isinstance(payload, list) or len(payload) != 2:
            self._drop(DropReason.MALFORMED, addr, "response is not [ok, result]")
            return
        del self._outstanding[frame.msg_id]
        timer.cancel()
        self._note_session(frame)
        if len(self._peers_seen) < MAX_PEERS_COUNTED:
            self._peers_seen.add(frame.sender_id)
        if not future.done():
            ok, result = payload
            if frame.signed and ok is False and result == SESSION_EXPIRED:
                future.set_result(RETRY_SIGNED)
            elif ok is True:
                future.set_result((True, result, frame.sender_id))
            else:
                logger.debug("peer rejected request from=%s: %.80s", peer_label(addr), result)
                future.set_result((False, None, frame.sender_id))

    def _expire_call(self, msg_id: bytes, method: str) -> None:
        pending = self._outstanding.pop(msg_id, None)
        if pending is not None and not pending[0].done():
            self.requests_timed_out[method] += 1
            pending[0].set_result((False, None, None))

    def notify(self, address: tuple, method: str, args: list, peer_id: bytes) -> None:
        """Send a one-way message to a known peer; nothing comes back."""
        datagram = self._encode(peer_id, KIND_NOTIFY, os.urandom(MSG_ID_BYTES), method, args)
        self._send(datagram, address, method)
        self.requests_sent[method] += 1

    async def call(
        self,
        address: tuple,
        method: str,
        args: list,
        expected_id: bytes | None = None,
        timeout: float | None = None,
    ) -> tuple[bool, Any, bytes | None]:
        """Send a request and wait for its response.

        Returns (ok, result, responder id); ok is False after a timeout or when the
        peer rejected the request. Raises MessageTooLarge if the request does not fit.
        A peer that could not check a session frame gets the request again, signed.
        """
        outcome = await self._call_once(address, method, args, expected_id, timeout)
        if outcome is RETRY_SIGNED:
            outcome = await self._call_once(address, method, args, expected_id, timeout)
        if outcome is RETRY_SIGNED:
            return (False, None, None)
        return outcome

    async def _call_once(
        self,
        address: tuple,
        method: str,
        args: list,
        expected_id: bytes | None,
        timeout: float | None = None,
    ) -> Any:
        msg_id = os.urandom(MSG_ID_BYTES)
        datagram = self._encode(expected_id, KIND_REQUEST, msg_id, method, args)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        timer = loop.call_later(
            timeout or self._wait_timeout, self._expire_call, msg_id, method
        )
        self._outstanding[msg_id] = (future, timer, address, expected_id)
        logger.debug("calling method=%s to=%s", method, peer_label(address))
        self._send(datagram, address, method)
        self.requests_sent[method] += 1
        try:
            outcome = await future
        finally:
            if self._outstanding.get(msg_id, (None,))[0] is future:
                timer.cancel()
                del self._outstanding[msg_id]
        # A reply with ok False and a responder id is the peer's rejection. Timeouts
        # and calls failed by close() carry no responder id.
        if outcome is not RETRY_SIGNED and outcome[0] is False and outcome[2] is not None:
            self.requests_failed[method] += 1
        return outcome

    async def _call_node(self, node: Node, method: str, args: list) -> tuple[bool, Any]:
        ok, result, _ = await self.call((node.ip, node.port), method, args, node.id)
        return ok, result

    async def call_ping(self, node_to_ask: Node) -> tuple[bool, Any]:
        result = await self._call_node(node_to_ask, "ping", [])
        return self.handle_call_response(result, node_to_ask)

    async def ping_address(self, address: tuple) -> Node | None:
        """Ping a host:port whose node id is not known yet; return its Node if it replies."""
        ok, _, responder_id = await self.call(address, "ping", [])
        if not ok or responder_id is None:
            return None
        node = Node(responder_id, address[0], address[1])
        self.welcome_if_new(node)
        return node

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        ok, result = await self._call_node(node_to_ask, "find_node", [node_to_find.id])
        if ok:
            result = self._parse_contacts(result)
        return self.handle_call_response((ok, result), node_to_ask)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        """Ask for a record; the result is a dict with `record`, `large` or `nodes`."""
        ok, result = await self._call_node(node_to_ask, "find_value", [node_to_find.id])
        if ok:
            result = self._parse_find_value_result(result)
            ok = result is not None
        return self.handle_call_response((ok, result), node_to_ask)

    async def call_store(self, node_to_ask: Node, key: bytes, value: bytes) -> tuple[bool, Any]:
        # Kept for kademlia code paths that call it; records go through call_store_record.
        stored, detail = await self.call_store_record(node_to_ask, value)
        return (stored, detail)

    async def call_has_records(
        self, node_to_ask: Node, items: list[tuple[bytes, int, bytes]]
    ) -> list[bool] | None:
        """Ask which record versions a peer has; return None if it did not reply."""
        ok, result = await self._call_node(
            node_to_ask, "has_records", [[list(item) for item in items]]
        )
        self.handle_call_response((ok, result), node_to_ask)
        if not ok or not isinstance(result, list) or len(result) != len(items):
            return None
        return [flag is True for flag in result]

    async def call_store_record(self, node: Node, envelope: bytes) -> tuple[bool, str]:
        """Store an encoded record on a peer; return (stored, detail)."""
        if len(envelope) <= self.chunk_bytes:
            ok, result = await self._call_node(node, "store", [envelope])
            self.handle_call_response((ok, result), node)
            return self._parse_store_result(ok, result)

        digest = hashlib.sha256(envelope).digest()
        semaphore = asyncio.Semaphore(CHUNK_CONCURRENCY)

        async def send_chunk(offset: int) -> Any:
            async with semaphore:
                piece = envelope[offset : offset + self.chunk_bytes]
                for _ in range(CHUNK_ATTEMPTS):
                    ok, result = await self._call_node(
                        node, "store_chunk", [digest, len(envelope), offset, piece]
                    )
                    if ok:
                        return result
                return None

        offsets = range(0, len(envelope), self.chunk_bytes)
        results = await asyncio.gather(*(send_chunk(offset) for offset in offsets))
        if any(result is None for result in results):
            self.handle_call_response((False, None), node)
            return False, "timed out sending record chunks"
        self.handle_call_response((True, None), node)
        finals = [result for result in results if result != "partial"]
        if len(finals) != 1:
            return False, "peer did not confirm the reassembled record"
        return self._parse_store_result(True, finals[0])

    async def call_fetch_record(
        self, node: Node, dht_key: bytes, size: int, digest: bytes
    ) -> bytes | None:
        """Read a large record from a holder chunk by chunk; None on failure or mismatch."""
        if not 0 < size <= self.max_record_bytes:
            return None
        semaphore = asyncio.Semaphore(CHUNK_CONCURRENCY)

        async def fetch_chunk(offset: int) -> bytes | None:
            async with semaphore:
                for _ in range(CHUNK_ATTEMPTS):
                    ok, result = await self._call_node(
                        node, "fetch_chunk", [dht_key, digest, offset]
                    )
                    if ok and isinstance(result, bytes):
                        return result
                return None

        offsets = range(0, size, self.chunk_bytes)
        pieces = await asyncio.gather(*(fetch_chunk(offset) for offset in offsets))
        if any(piece is None for piece in pieces):
            return None
        envelope = b"".join(pieces)
        if len(envelope) != size or hashlib.sha256(envelope).digest() != digest:
            logger.warning(
                "record chunks did not match their digest key=%s from=%s",
                dht_key.hex()[:12],
                node,
            )
            return None
        return envelope

    # -- handlers: peers asking this node ----------------------------------------

    def welcome_if_new(self, node: Node) -> None:
        """Add a node to the routing table; tell the record holder about new ones.

        Records are not pushed to the new node from here: the holder's republish pass
        hands them over, batched and chunked.
        """
        if not self.router.is_new_node(node):
            self.router.add_contact(node)
            return
        logger.info("new peer node=%s at=%s", readable_node_id(node.id), node)
        self.router.add_contact(node)
        self.holder.on_new_peer(node)

    def rpc_ping(self, sender: tuple, sender_id: bytes) -> bytes:
        self.welcome_if_new(Node(sender_id, sender[0], sender[1]))
        return self.source_node.id

    def rpc_find_node(self, sender: tuple, sender_id: bytes, target: Any) -> list:
        _require_bytes(target, DHT_ID_BYTES, "target")
        source = Node(sender_id, sender[0], sender[1])
        self.welcome_if_new(source)
        neighbors = self.router.find_neighbors(Node(target), exclude=source)
        return [[n.id, n.ip, n.port] for n in neighbors]

    def rpc_find_value(self, sender: tuple, sender_id: bytes, target: Any) -> dict:
        _require_bytes(target, DHT_ID_BYTES, "target")
        envelope = self.holder.envelope_for(target)
        if envelope is None:
            return {"nodes": self.rpc_find_node(sender, sender_id, target)}
        self.welcome_if_new(Node(sender_id, sender[0], sender[1]))
        if len(envelope) <= self.chunk_bytes:
            return {"record": envelope}
        return {"large": [len(envelope), hashlib.sha256(envelope).digest()]}

    def rpc_store(self, sender: tuple, sender_id: bytes, envelope: Any) -> list:
        if not isinstance(envelope, bytes):
            raise PeerRequestError("record must be bytes")
        self.welcome_if_new(Node(sender_id, sender[0], sender[1]))
        stored, detail = self.holder.accept_envelope(envelope, sender_id)
        return [stored, detail]

    def rpc_store_chunk(
        self,
        sender: tuple,
        sender_id: bytes,
        digest: Any,
        total_size: Any,
        offset: Any,
        piece: Any,
    ) -> Any:
        _require_bytes(digest, SHA256_BYTES, "digest")
        _require_int(total_size, 1, self.max_record_bytes, "total size")
        _require_int(offset, 0, total_size - 1, "offset")
        if not isinstance(piece, bytes) or not piece or offset + len(piece) > total_size:
            raise PeerRequestError("chunk must be non-empty bytes inside the record")

        transfer = self._chunk_transfer(sender_id, digest, total_size)
        if offset not in transfer.pieces:
            transfer.buffer[offset : offset + len(piece)] = piece
            transfer.pieces[offset] = len(piece)
        if transfer.received < total_size:
            return "partial"

        del self._inbound_chunks[(sender_id, digest)]
        envelope = bytes(transfer.buffer)
        if hashlib.sha256(envelope).digest() != digest:
            return [False, "reassembled record does not match its digest"]
        self.welcome_if_new(Node(sender_id, sender[0], sender[1]))
        stored, detail = self.holder.accept_envelope(envelope, sender_id)
        return [stored, detail]

    def rpc_fetch_chunk(
        self, sender: tuple, sender_id: bytes, dht_key: Any, digest: Any, offset: Any
    ) -> bytes:
        _require_bytes(dht_key, DHT_ID_BYTES, "key")
        _require_bytes(digest, SHA256_BYTES, "digest")
        _require_int(offset, 0, self.max_record_bytes, "offset")
        envelope = self.holder.envelope_for(dht_key)
        if envelope is None or hashlib.sha256(envelope).digest() != digest:
            raise PeerRequestError("record is no longer held in that version")
        return envelope[offset : offset + self.chunk_bytes]

    def rpc_has_records(self, sender: tuple, sender_id: bytes, items: Any) -> list[bool]:
        if not isinstance(items, list):
            raise PeerRequestError("items must be a list")
        versions = []
        for item in items:
            if not isinstance(item, list) or len(item) != 3:
                raise PeerRequestError("each item must be [key, created, publisher]")
            dht_key = _require_bytes(item[0], DHT_ID_BYTES, "key")
            created = _require_int(item[1], 0, 2**63 - 1, "created")
            publisher = _require_bytes(item[2], DHT_ID_BYTES, "publisher")
            versions.append((dht_key, created, publisher))
        self.welcome_if_new(Node(sender_id, sender[0], sender[1]))
        return self.holder.has_versions(versions)

    # -- helpers -----------------------------------------------------------------

    def _chunk_transfer(self, sender_id: bytes, digest: bytes, total_size: int) -> _ChunkTransfer:
        key = (sender_id, digest)
        transfer = self._inbound_chunks.get(key)
        if transfer is not None:
            if transfer.total_size != total_size:
                raise PeerRequestError("total size changed within one transfer")
            return transfer

        self.expire_chunk_transfers()
        per_peer = sum(1 for other, _ in self._inbound_chunks if other == sender_id)
        if per_peer >= MAX_CHUNK_TRANSFERS_PER_PEER or len(self._inbound_chunks) >= MAX_CHUNK_TRANSFERS:
            raise PeerRequestError("too many record transfers in progress")
        transfer = _ChunkTransfer(
            total_size=total_size,
            deadline=time.monotonic() + CHUNK_TRANSFER_TIMEOUT_SECONDS,
            buffer=bytearray(total_size),
        )
        self._inbound_chunks[key] = transfer
        return transfer

    def expire_chunk_transfers(self) -> int:
        """Forget incomplete inbound transfers past their deadline; return how many."""
        now = time.monotonic()
        expired = [key for key, t in self._inbound_chunks.items() if t.deadline < now]
        for key in expired:
            del self._inbound_chunks[key]
        return len(expired)

    def _parse_contacts(self, result: Any) -> list:
        if not isinstance(result, list):
            return []
        contacts = (parse_contact(item) for item in result[: self.router.ksize])
        return [tuple(node) for node in contacts if node is not None]

    def _parse_find_value_result(self, result: Any) -> dict | None:
        if not isinstance(result, dict) or len(result) != 1:
            return None
        if isinstance(result.get("record"), bytes):
            return result
        large = result.get("large")
        if isinstance(large, list) and len(large) == 2:
            size, digest = large
            if isinstance(size, int) and isinstance(digest, bytes) and len(digest) == SHA256_BYTES:
                return result
            return None
        if "nodes" in result:
            return {"nodes": self._parse_contacts(result["nodes"])}
        return None

    @staticmethod
    def _parse_store_result(ok: bool, result: Any) -> tuple[bool, str]:
        if not ok:
            return False, "no answer"
        if isinstance(result, list) and len(result) == 2 and isinstance(result[0], bool):
            return result[0], str(result[1])[:200]
        return False, "malformed answer"

    def stats(self) -> PeerStats:
        contacts = sum(len(bucket) for bucket in self.router.buckets)
        return PeerStats(
            connected_peers=contacts,
            routing_table_peers=contacts,
            total_connections=len(self._peers_seen),
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            datagrams_sent=self.datagrams_sent,
            datagrams_received=self.datagrams_received,
            datagrams_dropped=dict(self.dropped),
            bytes_sent_by_method=dict(self.bytes_sent_by_method),
        )

    async def close(self, timeout: float = 2.0) -> None:
        """Cancel running handlers and fail outstanding calls, then close the socket."""
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=timeout)
        for msg_id in list(self._outstanding):
            future, timer, _, _ = self._outstanding.pop(msg_id)
            timer.cancel()
            if not future.done():
                future.set_result((False, None, None))
        if self.transport is not None:
            self.transport.close()
