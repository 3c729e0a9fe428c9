"""Datagram frames of the peer protocol: encoding, decoding, authentication and limits.

Two frame forms exist. A signed frame carries the sender's Ed25519 public key and an
Ed25519 signature; it is how two nodes first talk:

    b"VX1" | msgpack([kind, msg_id, sender_key, session_key, peer_hint, sent_ms,
                      method, payload]) | signature (64 bytes)

`session_key` is the sender's X25519 public key for this process run, and
`peer_hint` is the first 8 bytes of the SHA-256 of the receiver's X25519 key as the
sender knows it (empty when it knows none). Once each side has shown the other that
it knows its current X25519 key, both switch to session frames, authenticated with
HMAC-SHA256 under a key derived from the X25519 exchange:

    b"VX2" | sender_id (20 bytes) | msgpack([kind, msg_id, sent_ms, method, payload])
           | tag (16 bytes)

An Ed25519 verification costs about 150 microseconds here and an HMAC about two, and
every RPC is two frames, so session frames keep the cost of authentication off the
request path. `kind` is 0 for a request, 1 for a response and 2 for a one-way notification; `msg_id` is 16 random
bytes that a response repeats; `sent_ms` lets the receiver reject stale or replayed
requests. Responses carry `method` as an empty string and a payload of
`[ok, result]`.
"""

import enum
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from voxanode.identity import (
    DHT_ID_BYTES,
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Identity,
    dht_id_for,
    verify_signature,
)

MAGIC_SIGNED = b"VX1"
MAGIC_SESSION = b"VX2"
MAGIC_BYTES = 3
MSG_ID_BYTES = 16
SESSION_PUBLIC_KEY_BYTES = 32
PEER_HINT_BYTES = 8
SESSION_TAG_BYTES = 16
SESSION_KEY_INFO = b"voxanode peer session v1"
KIND_REQUEST = 0
KIND_RESPONSE = 1
# A one-way message: handled like a request, but no response is sent.
KIND_NOTIFY = 2
MAX_METHOD_NAME_CHARS = 32
# Upper bound on items in any list or map of a payload; the largest legitimate one is a
# batch of record versions, far below this.
MAX_CONTAINER_ITEMS = 512
# Bytes of a frame that are not payload data: magic, envelope fields and signature.
FRAME_OVERHEAD_BYTES = 320
MIN_FRAME_BYTES = MAGIC_BYTES + 8 + SESSION_TAG_BYTES


class DropReason(str, enum.Enum):
    """The reason an incoming datagram was dropped; the values label the drop counters."""

    OVERSIZED = "oversized"
    TRUNCATED = "truncated"
    BAD_MAGIC = "bad_magic"
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_SESSION = "unknown_session"
    STALE = "stale"
    REPLAYED = "replayed"
    UNKNOWN_METHOD = "unknown_method"
    BAD_REQUEST = "bad_request"
    UNEXPECTED_RESPONSE = "unexpected_response"
    WRONG_SENDER = "wrong_sender"
    OVERLOADED = "overloaded"
    OWN_MESSAGE = "own_message"
    UNSEALED = "unsealed"


class FrameError(ValueError):
    """A datagram that cannot be accepted; `reason` names the check that failed."""

    def __init__(self, reason: DropReason, detail: str = "", sender_id: bytes | None = None):
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        # Set for session frames whose tag could not be checked, so the receiver can
        # tell the sender to start over with a signed frame.
        self.sender_id = sender_id


class MessageTooLarge(ValueError):
    """An outgoing message would not fit in one datagram."""


@dataclass(frozen=True)
class Frame:
    """A decoded datagram whose signature or session tag has been checked.

    `sender_key`, `session_public` and `peer_hint` are set only for signed frames.
    """

    kind: int
    msg_id: bytes
    sender_id: bytes
    sent_ms: int
    method: str
    payload: Any
    sender_key: bytes | None = None
    session_public: bytes | None = None
    peer_hint: bytes = b""

    @property
    def signed(self) -> bool:
        return self.sender_key is not None


class SessionKeys:
    """This process's X25519 key pair, from which session keys with peers are derived."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public: bytes = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.hint: bytes = session_hint(self.public)

    def derive(self, own_id: bytes, peer_id: bytes, peer_public: bytes) -> bytes | None:
        """Return the 32-byte key shared with a peer, or None for an unusable peer key."""
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError:
            return None
        low, high = sorted((own_id, peer_id))
        return HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=SESSION_KEY_INFO + low + high
        ).derive(shared)


def session_hint(session_public: bytes) -> bytes:
    """Return the short fingerprint of an X25519 key that signed frames carry."""
    return hashlib.sha256(session_public).digest()[:PEER_HINT_BYTES]


def _session_tag(key: bytes, authenticated: bytes) -> bytes:
    return hmac.new(key, authenticated, hashlib.sha256).digest()[:SESSION_TAG_BYTES]


def _check_size(length: int, method: str, max_datagram_bytes: int) -> None:
    if length > max_datagram_bytes:
        raise MessageTooLarge(
            f"{method or 'response'} message of {length} bytes"
            f" exceeds the datagram limit of {max_datagram_bytes} bytes"
        )


def encode_signed_frame(
    identity: Identity,
    session_public: bytes,
    peer_hint: bytes,
    kind: int,
    msg_id: bytes,
    sent_ms: int,
    method: str,
    payload: Any,
    max_datagram_bytes: int,
) -> bytes:
    """Return a frame signed with the node key; raise MessageTooLarge past the limit."""
    body = MAGIC_SIGNED + msgpack.packb(
        [kind, msg_id, identity.public_key, session_public, peer_hint, sent_ms, method, payload],
        use_bin_type=True,
    )
    _check_size(len(body) + SIGNATURE_BYTES, method, max_datagram_bytes)
    return body + identity.sign(body)


def encode_session_frame(
    sender_id: bytes,
    key: bytes,
    kind: int,
    msg_id: bytes,
    sent_ms: int,
    method: str,
    payload: Any,
    max_datagram_bytes: int,
) -> bytes:
    """Return a frame authenticated with a session key; raise MessageTooLarge past the limit."""
    body = (
        MAGIC_SESSION
        + sender_id
        + msgpack.packb([kind, msg_id, sent_ms, method, payload], use_bin_type=True)
    )
    _check_size(len(body) + SESSION_TAG_BYTES, method, max_datagram_bytes)
    return body + _session_tag(key, body)


def decode_frame(
    datagram: bytes,
    max_datagram_bytes: int,
    session_key_for: Callable[[bytes], bytes | None],
) -> Frame:
    """Parse and authenticate a datagram, raising FrameError with the reason to drop it.

    `session_key_for(sender_id)` returns the session key shared with that sender, or
    None when there is none.
    """
    if len(datagram) > max_datagram_bytes:
        raise FrameError(DropReason.OVERSIZED, f"{len(datagram)} bytes")
    if len(datagram) < MIN_FRAME_BYTES:
        raise FrameError(DropReason.TRUNCATED, f"{len(datagram)} bytes")
    magic = datagram[:MAGIC_BYTES]
    if magic == MAGIC_SIGNED:
        return _decode_signed(datagram, max_datagram_bytes)
    if magic == MAGIC_SESSION:
        return _decode_session(datagram, max_datagram_bytes, session_key_for)
    raise FrameError(DropReason.BAD_MAGIC)


def _unpack(data: bytes, max_datagram_bytes: int) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_datagram_bytes,
            max_str_len=max_datagram_bytes,
            max_array_len=MAX_CONTAINER_ITEMS,
            max_map_len=MAX_CONTAINER_ITEMS,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as error:
        raise FrameError(DropReason.MALFORMED, type(error).__name__) from None


def _check_common(kind: Any, msg_id: Any, sent_ms: Any, method: Any) -> None:
    if kind not in (KIND_REQUEST, KIND_RESPONSE, KIND_NOTIFY) or isinstance(kind, bool):
        raise FrameError(DropReason.MALFORMED, "unknown kind")
    if not isinstance(msg_id, bytes) or len(msg_id) != MSG_ID_BYTES:
        raise FrameError(DropReason.MALFORMED, "bad message id")
    if not isinstance(sent_ms, int) or isinstance(sent_ms, bool):
        raise FrameError(DropReason.MALFORMED, "bad send time")
    if not isinstance(method, str) or len(method) > MAX_METHOD_NAME_CHARS:
        raise FrameError(DropReason.MALFORMED, "bad method name")


def _decode_signed(datagram: bytes, max_datagram_bytes: int) -> Frame:
    body, signature = datagram[:-SIGNATURE_BYTES], datagram[-SIGNATURE_BYTES:]
    fields = _unpack(body[MAGIC_BYTES:], max_datagram_bytes)
    if not isinstance(fields, list) or len(fields) != 8:
        raise FrameError(DropReason.MALFORMED, "signed envelope is not a list of 8 fields")
    kind, msg_id, sender_key, session_public, peer_hint, sent_ms, method, payload = fields
    _check_common(kind, msg_id, sent_ms, method)
    if not isinstance(sender_key, bytes) or len(sender_key) != PUBLIC_KEY_BYTES:
        raise FrameError(DropReason.MALFORMED, "bad sender key")
    if not isinstance(session_public, bytes) or len(session_public) != SESSION_PUBLIC_KEY_BYTES:
        raise FrameError(DropReason.MALFORMED, "bad session key")
    if not isinstance(peer_hint, bytes) or len(peer_hint) not in (0, PEER_HINT_BYTES):
        raise FrameError(DropReason.MALFORMED, "bad peer hint")
    if not verify_signature(sender_key, signature, body):
        raise FrameError(DropReason.BAD_SIGNATURE)
    return Frame(
        kind,
        msg_id,
        dht_id_for(sender_key),
        sent_ms,
        method,
        payload,
        sender_key=sender_key,
        session_public=session_public,
        peer_hint=peer_hint,
    )


def _decode_session(
    datagram: bytes,
    max_datagram_bytes: int,
    session_key_for: Callable[[bytes], bytes | None],
) -> Frame:
    header_end = MAGIC_BYTES + DHT_ID_BYTES
    sender_id = datagram[MAGIC_BYTES:header_end]
    body, tag = datagram[:-SESSION_TAG_BYTES], datagram[-SESSION_TAG_BYTES:]
    key = session_key_for(sender_id)
    if key is None or not hmac.compare_digest(_session_tag(key, body), tag):
        raise FrameError(DropReason.UNKNOWN_SESSION, sender_id=sender_id)
    fields = _unpack(body[header_end:], max_datagram_bytes)
    if not isinstance(fields, list) or len(fields) != 5:
        raise FrameError(DropReason.MALFORMED, "session envelope is not a list of 5 fields")
    kind, msg_id, sent_ms, method, payload = fields
    _check_common(kind, msg_id, sent_ms, method)
    return Frame(kind, msg_id, sender_id, sent_ms, method, payload)


def peek_request_id(datagram: bytes, max_datagram_bytes: int) -> bytes | None:
    """Return the message id of a session request without authenticating it.

    Used only to address a signed "session expired" reply to a sender whose session
    frame could not be checked. Nothing else from the datagram is trusted.
    """
    try:
        fields = msgpack.unpackb(
            datagram[MAGIC_BYTES + DHT_ID_BYTES : -SESSION_TAG_BYTES],
            raw=False,
            max_bin_len=max_datagram_bytes,
            max_str_len=max_datagram_bytes,
            max_array_len=MAX_CONTAINER_ITEMS,
            max_map_len=MAX_CONTAINER_ITEMS,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError):
        return None
    if isinstance(fields, list) and len(fields) == 5 and fields[0] == KIND_REQUEST:
        msg_id = fields[1]
        if isinstance(msg_id, bytes) and len(msg_id) == MSG_ID_BYTES:
            return msg_id
    return None
