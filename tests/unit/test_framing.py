"""Peer datagram frames: signed and session forms, limits and every drop reason."""

import os

import msgpack
import pytest

from voxanode.identity import Identity
from voxanode.peer.framing import (
    KIND_REQUEST,
    KIND_RESPONSE,
    MAGIC_SIGNED,
    DropReason,
    FrameError,
    MessageTooLarge,
    SessionKeys,
    decode_frame,
    encode_session_frame,
    encode_signed_frame,
    peek_request_id,
    session_hint,
)

MAX_BYTES = 8192


def no_sessions(_sender_id):
    return None


@pytest.fixture(scope="module")
def identity():
    return Identity.generate()


@pytest.fixture(scope="module")
def session_keys():
    return SessionKeys()


def signed(identity, session_keys, method="ping", payload=(), kind=KIND_REQUEST, hint=b""):
    return encode_signed_frame(
        identity, session_keys.public, hint, kind, bytes(16), 123, method, list(payload), MAX_BYTES
    )


def test_signed_frame_round_trip(identity, session_keys):
    frame = decode_frame(signed(identity, session_keys, hint=bytes(8)), MAX_BYTES, no_sessions)
    assert frame.signed
    assert frame.method == "ping"
    assert frame.sender_id == identity.dht_id
    assert frame.session_public == session_keys.public
    assert frame.peer_hint == bytes(8)
    assert frame.sent_ms == 123


def test_session_keys_agree_between_peers():
    alice, bob = Identity.generate(), Identity.generate()
    alice_keys, bob_keys = SessionKeys(), SessionKeys()
    key_at_alice = alice_keys.derive(alice.dht_id, bob.dht_id, bob_keys.public)
    key_at_bob = bob_keys.derive(bob.dht_id, alice.dht_id, alice_keys.public)
    assert key_at_alice == key_at_bob
    assert len(key_at_alice) == 32
    assert session_hint(bob_keys.public) == bob_keys.hint


def test_session_frame_round_trip_and_tamper():
    sender = Identity.generate()
    key = os.urandom(32)
    datagram = encode_session_frame(
        sender.dht_id, key, KIND_RESPONSE, bytes(16), 5, "", [True, 1], MAX_BYTES
    )
    frame = decode_frame(datagram, MAX_BYTES, lambda peer_id: key if peer_id == sender.dht_id else None)
    assert not frame.signed
    assert frame.sender_id == sender.dht_id
    assert frame.payload == [True, 1]

    tampered = bytearray(datagram)
    tampered[-20] ^= 1
    for data, lookup in ((bytes(tampered), lambda _: key), (datagram, no_sessions), (datagram, lambda _: os.urandom(32))):
        with pytest.raises(FrameError) as caught:
            decode_frame(data, MAX_BYTES, lookup)
        assert caught.value.reason is DropReason.UNKNOWN_SESSION
        assert caught.value.sender_id == sender.dht_id


def test_peek_request_id_of_session_request():
    sender = Identity.generate()
    msg_id = os.urandom(16)
    request = encode_session_frame(sender.dht_id, os.urandom(32), KIND_REQUEST, msg_id, 1, "store", [bytes(3000)], MAX_BYTES)
    response = encode_session_frame(sender.dht_id, os.urandom(32), KIND_RESPONSE, msg_id, 1, "", [True, 1], MAX_BYTES)
    assert peek_request_id(request, MAX_BYTES) == msg_id
    assert peek_request_id(response, MAX_BYTES) is None
    assert peek_request_id(b"VX2" + os.urandom(60), MAX_BYTES) is None


def test_frame_too_large_to_send(identity, session_keys):
    with pytest.raises(MessageTooLarge):
        signed(identity, session_keys, "store", [bytes(9000)])
    with pytest.raises(MessageTooLarge):
        encode_session_frame(identity.dht_id, bytes(32), KIND_REQUEST, bytes(16), 1, "store", [bytes(9000)], MAX_BYTES)


def _signed_fields(identity, fields) -> bytes:
    body = MAGIC_SIGNED + msgpack.packb(fields, use_bin_type=True)
    return body + identity.sign(body)


def _fields(identity, session_keys, **changes):
    fields = dict(
        kind=KIND_REQUEST,
        msg_id=bytes(16),
        sender_key=identity.public_key,
        session_key=session_keys.public,
        hint=b"",
        sent_ms=1,
        method="ping",
        payload=[],
    )
    fields.update(changes)
    return list(fields.values())


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda ident, keys: bytes(MAX_BYTES + 1), DropReason.OVERSIZED),
        (lambda ident, keys: b"VX1", DropReason.TRUNCATED),
        (lambda ident, keys: b"XXX" + bytes(100), DropReason.BAD_MAGIC),
        (lambda ident, keys: MAGIC_SIGNED + b"\xc1" * 80, DropReason.MALFORMED),
        (lambda ident, keys: _signed_fields(ident, {"a": "x" * 50}), DropReason.MALFORMED),
        (lambda ident, keys: _signed_fields(ident, _fields(ident, keys, msg_id=bytes(15))), DropReason.MALFORMED),
        (lambda ident, keys: _signed_fields(ident, _fields(ident, keys, kind=5)), DropReason.MALFORMED),
        (lambda ident, keys: _signed_fields(ident, _fields(ident, keys, method="p" * 40)), DropReason.MALFORMED),
        (lambda ident, keys: _signed_fields(ident, _fields(ident, keys, payload=[1] * 600)), DropReason.MALFORMED),
        (lambda ident, keys: _signed_fields(ident, _fields(ident, keys, session_key=bytes(5))), DropReason.MALFORMED),
        (lambda ident, keys: _signed_fields(ident, _fields(ident, keys, hint=bytes(3))), DropReason.MALFORMED),
        (lambda ident, keys: _signed_fields(ident, _fields(ident, keys, sender_key=bytes(32))), DropReason.BAD_SIGNATURE),
        (
            lambda ident, keys: MAGIC_SIGNED + msgpack.packb(_fields(ident, keys)) + bytes(64),
            DropReason.BAD_SIGNATURE,
        ),
        (lambda ident, keys: b"VX2" + os.urandom(80), DropReason.UNKNOWN_SESSION),
    ],
)
def test_frame_rejects(identity, session_keys, make, reason):
    with pytest.raises(FrameError) as caught:
        decode_frame(make(identity, session_keys), MAX_BYTES, no_sessions)
    assert caught.value.reason is reason
