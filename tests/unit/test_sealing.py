"""Unit tests of network-key sealing: the keyring, the protocol's use of it, the settings."""

import asyncio
import base64
import dataclasses
import hashlib
import json
import os
import time

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from voxanode.identity import Identity
from voxanode.peer.framing import (
    KIND_REQUEST,
    KIND_RESPONSE,
    MSG_ID_BYTES,
    SessionKeys,
    decode_frame,
    encode_signed_frame,
)
from voxanode.peer.protocol import PeerProtocol
from voxanode.peer.sealing import (
    HEADER_BYTES,
    KEY_ID_BYTES,
    NONCE_BYTES,
    SEAL_LABEL,
    SEAL_OVERHEAD_BYTES,
    SEAL_VERSION,
    Keyring,
    KeyringError,
    SealError,
    SealFailure,
    key_fingerprint,
    key_id,
)
from voxanode.settings import Settings, SettingsError, load_settings

KEY_1 = bytes(range(32))
KEY_2 = bytes(range(100, 132))
KEY_3 = bytes(range(200, 232))
DATAGRAM = b"VX1 a frame of the peer protocol" * 10
PEER_ADDRESS = ("127.0.0.1", 4000)
RPC_TIMEOUT_SECONDS = 2.0


def seal_failure(keyring: Keyring, sealed: bytes) -> SealFailure:
    with pytest.raises(SealError) as caught:
        keyring.open(sealed)
    return caught.value.reason


def flip_byte(data: bytes, position: int) -> bytes:
    changed = bytearray(data)
    changed[position] ^= 0x01
    return bytes(changed)


# The keyring


@pytest.mark.parametrize("size", [0, 1, 100, 8192 - SEAL_OVERHEAD_BYTES, 65000])
def test_keyring_round_trip(size):
    keyring = Keyring(KEY_1, [])
    datagram = os.urandom(size)

    sealed = keyring.seal(datagram)

    assert len(sealed) == size + SEAL_OVERHEAD_BYTES
    assert keyring.open(sealed) == datagram


def test_keyring_sealed_layout():
    keyring = Keyring(KEY_1, [])

    sealed = keyring.seal(DATAGRAM)

    assert SEAL_OVERHEAD_BYTES == 33
    assert sealed[0] == SEAL_VERSION
    assert sealed[1:HEADER_BYTES] == hashlib.sha256(KEY_1).digest()[:KEY_ID_BYTES]
    assert DATAGRAM not in sealed
    # The nonce is random, so sealing the same datagram twice gives different bytes.
    assert keyring.seal(DATAGRAM)[HEADER_BYTES:] != sealed[HEADER_BYTES:]


def test_keyring_binds_label_and_header():
    # A datagram encrypted under the right key and nonce, but with other associated
    # data, fails: the label and header are part of what the tag covers.
    header = bytes([SEAL_VERSION]) + key_id(KEY_1)
    nonce = os.urandom(NONCE_BYTES)
    for associated in (SEAL_LABEL, header, b"other-label" + header):
        forged = header + nonce + AESGCM(KEY_1).encrypt(nonce, DATAGRAM, associated)
        assert seal_failure(Keyring(KEY_1, []), forged) is SealFailure.AUTHENTICATION_FAILED

    genuine = header + nonce + AESGCM(KEY_1).encrypt(nonce, DATAGRAM, SEAL_LABEL + header)
    assert Keyring(KEY_1, []).open(genuine) == DATAGRAM


def test_keyring_wrong_key_is_unknown_key_id():
    sealed = Keyring(KEY_1, []).seal(DATAGRAM)

    assert seal_failure(Keyring(KEY_2, []), sealed) is SealFailure.UNKNOWN_KEY_ID


def test_keyring_unknown_key_id_in_header():
    sealed = Keyring(KEY_1, []).seal(DATAGRAM)
    other_id = bytes([SEAL_VERSION]) + key_id(KEY_3) + sealed[HEADER_BYTES:]

    with pytest.raises(SealError) as caught:
        Keyring(KEY_1, [KEY_2]).open(other_id)
    assert caught.value.reason is SealFailure.UNKNOWN_KEY_ID
    assert key_id(KEY_3).hex() in str(caught.value)


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        (0, SealFailure.UNKNOWN_VERSION),
        (1, SealFailure.UNKNOWN_KEY_ID),
        (HEADER_BYTES - 1, SealFailure.UNKNOWN_KEY_ID),
        (HEADER_BYTES, SealFailure.AUTHENTICATION_FAILED),
        (HEADER_BYTES + NONCE_BYTES - 1, SealFailure.AUTHENTICATION_FAILED),
        (HEADER_BYTES + NONCE_BYTES, SealFailure.AUTHENTICATION_FAILED),
        (HEADER_BYTES + NONCE_BYTES + 50, SealFailure.AUTHENTICATION_FAILED),
        (-1, SealFailure.AUTHENTICATION_FAILED),
    ],
)
def test_keyring_tampered_byte(position, expected):
    keyring = Keyring(KEY_1, [])
    sealed = keyring.seal(DATAGRAM)

    assert seal_failure(keyring, flip_byte(sealed, position)) is expected


@pytest.mark.parametrize("length", [0, 1, HEADER_BYTES, SEAL_OVERHEAD_BYTES - 1])
def test_keyring_too_short(length):
    keyring = Keyring(KEY_1, [])
    sealed = keyring.seal(DATAGRAM)

    assert seal_failure(keyring, sealed[:length]) is SealFailure.TOO_SHORT


@pytest.mark.parametrize("cut_bytes", [1, 16, len(DATAGRAM)])
def test_keyring_truncated_fails_authentication(cut_bytes):
    keyring = Keyring(KEY_1, [])
    sealed = keyring.seal(DATAGRAM)

    assert seal_failure(keyring, sealed[:-cut_bytes]) is SealFailure.AUTHENTICATION_FAILED


def test_keyring_empty_datagram_seals_to_overhead_only():
    keyring = Keyring(KEY_1, [])
    sealed = keyring.seal(b"")

    assert len(sealed) == SEAL_OVERHEAD_BYTES
    assert keyring.open(sealed) == b""


def test_keyring_unsealed_frame_is_unknown_version():
    assert seal_failure(Keyring(KEY_1, []), DATAGRAM) is SealFailure.UNKNOWN_VERSION


def test_keyring_disabled_is_identity():
    keyring = Keyring(None, [])

    assert keyring.enabled is False
    assert keyring.overhead == 0
    assert keyring.fingerprints == []
    assert keyring.seal(DATAGRAM) is DATAGRAM
    assert keyring.open(DATAGRAM) is DATAGRAM
    assert keyring.open(b"") == b""


def test_keyring_enabled_properties():
    keyring = Keyring(KEY_2, [KEY_1])

    assert keyring.enabled is True
    assert keyring.overhead == SEAL_OVERHEAD_BYTES
    assert keyring.fingerprints == [key_fingerprint(KEY_2), key_fingerprint(KEY_1)]


def test_keyring_rotation_opens_old_and_new():
    old_only = Keyring(KEY_1, [])
    old_primary = Keyring(KEY_1, [KEY_2])
    new_primary = Keyring(KEY_2, [KEY_1])
    new_only = Keyring(KEY_2, [])

    # Step 1 (new key accepted) and step 2 (new key primary) talk to each other.
    assert new_primary.open(old_primary.seal(DATAGRAM)) == DATAGRAM
    assert old_primary.open(new_primary.seal(DATAGRAM)) == DATAGRAM
    # Step 2 still opens what nodes that have not started rotating seal.
    assert new_primary.open(old_only.seal(DATAGRAM)) == DATAGRAM
    # Step 3 (old key dropped) and step 2 talk to each other.
    assert new_only.open(new_primary.seal(DATAGRAM)) == DATAGRAM
    assert new_primary.open(new_only.seal(DATAGRAM)) == DATAGRAM
    # Skipping a step breaks the link: a node that never accepted the new key is cut off.
    assert seal_failure(old_only, new_only.seal(DATAGRAM)) is SealFailure.UNKNOWN_KEY_ID
    assert seal_failure(new_only, old_only.seal(DATAGRAM)) is SealFailure.UNKNOWN_KEY_ID


def test_keyring_seals_with_primary_only():
    sealed = Keyring(KEY_2, [KEY_1]).seal(DATAGRAM)

    assert sealed[1:HEADER_BYTES] == key_id(KEY_2)
    assert seal_failure(Keyring(KEY_1, []), sealed) is SealFailure.UNKNOWN_KEY_ID


def test_keyring_duplicate_keys_count_once():
    keyring = Keyring(KEY_1, [KEY_1, KEY_2, KEY_2])

    assert keyring.fingerprints == [key_fingerprint(KEY_1), key_fingerprint(KEY_2)]


@pytest.mark.parametrize(
    ("primary", "accepted", "message_part"),
    [
        (None, [KEY_1], "need a primary network key"),
        (KEY_1[:16], [], "must be 32 bytes, not 16"),
        (KEY_1, [KEY_2 + b"x"], "must be 32 bytes, not 33"),
        (b"", [], "must be 32 bytes, not 0"),
    ],
)
def test_keyring_rejects_bad_keys(primary, accepted, message_part):
    with pytest.raises(KeyringError) as caught:
        Keyring(primary, accepted)
    assert message_part in str(caught.value)


def test_key_fingerprint_is_sha256_prefix():
    assert key_fingerprint(bytes(32)) == "66687aad"
    assert key_fingerprint(KEY_1) == "630dcd29"
    assert key_fingerprint(KEY_1) == hashlib.sha256(KEY_1).hexdigest()[:8]
    # The fingerprint names the same key as the key id in sealed datagrams.
    assert key_id(KEY_1).hex() == key_fingerprint(KEY_1)
    assert KEY_1.hex()[:8] not in key_fingerprint(KEY_1)


def test_seal_error_message_names_reason():
    error = SealError(SealFailure.TOO_SHORT, "3 bytes")

    assert str(error) == "too_short: 3 bytes"
    assert str(SealError(SealFailure.AUTHENTICATION_FAILED)) == "authentication_failed"


# The peer protocol with a keyring


def make_protocol(keyring: Keyring | None, max_datagram_bytes: int = 8192) -> PeerProtocol:
    # No request reaches the record holder in these tests, so there is none.
    return PeerProtocol(
        Identity.generate(),
        None,
        ksize=20,
        max_datagram_bytes=max_datagram_bytes,
        rpc_timeout_seconds=RPC_TIMEOUT_SECONDS,
        clock_skew_seconds=30.0,
        max_record_bytes=70_000,
        keyring=keyring,
    )


def signed_request(identity: Identity, method: str = "ping", args=None) -> bytes:
    return encode_signed_frame(
        identity,
        SessionKeys().public,
        b"",
        KIND_REQUEST,
        os.urandom(MSG_ID_BYTES),
        int(time.time() * 1000),
        method,
        args if args is not None else [],
        65000,
    )


@pytest.mark.parametrize("max_datagram_bytes", [1024, 8192, 65000])
def test_protocol_frame_limit_leaves_room_for_seal(max_datagram_bytes):
    keyring = Keyring(KEY_1, [])
    protocol = make_protocol(keyring, max_datagram_bytes)

    assert protocol.max_sealed_bytes == max_datagram_bytes
    assert protocol.max_datagram_bytes == max_datagram_bytes - SEAL_OVERHEAD_BYTES
    assert protocol.chunk_bytes < protocol.max_datagram_bytes

    # The largest frames the protocol sends: a signed store_chunk request with a full
    # chunk and large integers, and the signed fetch_chunk response carrying one.
    identity = Identity.generate()
    piece = os.urandom(protocol.chunk_bytes)
    frames = [
        encode_signed_frame(
            identity,
            SessionKeys().public,
            os.urandom(8),
            KIND_REQUEST,
            os.urandom(MSG_ID_BYTES),
            2**62,
            "store_chunk",
            [os.urandom(32), 2**31, 2**31 - 1, piece],
            protocol.max_datagram_bytes,
        ),
        encode_signed_frame(
            identity,
            SessionKeys().public,
            os.urandom(8),
            KIND_RESPONSE,
            os.urandom(MSG_ID_BYTES),
            2**62,
            "",
            [True, piece],
            protocol.max_datagram_bytes,
        ),
    ]
    for frame in frames:
        assert len(keyring.seal(frame)) <= max_datagram_bytes


def test_protocol_without_keyring_keeps_full_limit():
    protocol = make_protocol(None, 8192)

    assert protocol.keyring.enabled is False
    assert protocol.max_sealed_bytes == 8192
    assert protocol.max_datagram_bytes == 8192


def test_protocol_drops_unsealed_and_foreign_datagrams():
    keyring = Keyring(KEY_1, [])
    protocol = make_protocol(keyring)
    frame = signed_request(Identity.generate())

    cases = [
        (frame, "unsealed"),
        (b"", "unsealed"),
        (Keyring(KEY_2, []).seal(frame), "unsealed"),
        (flip_byte(keyring.seal(frame), -1), "unsealed"),
        (os.urandom(protocol.max_sealed_bytes + 1), "oversized"),
        # Opened with the right key, then rejected by the framing layer.
        (keyring.seal(b"not a frame" * 10), "bad_magic"),
        (keyring.seal(b"\x00" * protocol.max_datagram_bytes), "bad_magic"),
    ]
    for datagram, reason in cases:
        before = protocol.dropped[reason]
        protocol.datagram_received(datagram, PEER_ADDRESS)
        assert protocol.dropped[reason] == before + 1, (reason, len(datagram))

    assert protocol.datagrams_received == len(cases)
    assert protocol.bytes_received == sum(len(datagram) for datagram, _ in cases)


def test_protocol_open_network_rejects_sealed_datagrams():
    protocol = make_protocol(None)

    protocol.datagram_received(Keyring(KEY_1, []).seal(signed_request(Identity.generate())), PEER_ADDRESS)

    assert protocol.dropped["bad_magic"] == 1
    assert protocol.dropped["unsealed"] == 0


class _DatagramQueue(asyncio.DatagramProtocol):
    """A UDP endpoint that queues what it receives."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, tuple]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.received.put_nowait((data, addr))


async def test_protocol_call_is_sealed_both_ways():
    loop = asyncio.get_running_loop()
    keyring = Keyring(KEY_2, [KEY_1])
    _, protocol = await loop.create_datagram_endpoint(
        lambda: make_protocol(keyring), local_addr=("127.0.0.1", 0)
    )
    responder_transport, responder = await loop.create_datagram_endpoint(
        _DatagramQueue, local_addr=("127.0.0.1", 0)
    )
    responder_identity = Identity.generate()
    responder_address = responder_transport.get_extra_info("sockname")
    try:
        call = loop.create_task(protocol.call(responder_address, "ping", []))
        sealed, caller_address = await asyncio.wait_for(responder.received.get(), 5)

        # The request is sealed with the primary key: only that key opens it.
        assert sealed[1:HEADER_BYTES] == key_id(KEY_2)
        assert seal_failure(Keyring(KEY_1, []), sealed) is SealFailure.UNKNOWN_KEY_ID
        request = decode_frame(Keyring(KEY_2, []).open(sealed), 8192, lambda _: None)
        assert request.kind == KIND_REQUEST
        assert request.method == "ping"
        assert protocol.bytes_sent == len(sealed)

        # Unsealed and wrongly sealed replies are dropped; one sealed with the
        # accepted old key is taken.
        reply = encode_signed_frame(
            responder_identity,
            SessionKeys().public,
            b"",
            KIND_RESPONSE,
            request.msg_id,
            int(time.time() * 1000),
            "",
            [True, responder_identity.dht_id],
            8192,
        )
        responder_transport.sendto(reply, caller_address)
        responder_transport.sendto(Keyring(KEY_3, []).seal(reply), caller_address)
        responder_transport.sendto(Keyring(KEY_1, []).seal(reply), caller_address)
        ok, result, responder_id = await asyncio.wait_for(call, 5)

        assert ok is True
        assert result == responder_identity.dht_id
        assert responder_id == responder_identity.dht_id
        assert protocol.dropped["unsealed"] == 2
    finally:
        responder_transport.close()
        await protocol.close()


# The network key settings


def load(tmp_path, flags=None, environ=None, document=None) -> Settings:
    if document is not None:
        path = tmp_path / "config" / "settings.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document), encoding="utf-8")
    return load_settings(flags or {}, environ or {}, tmp_path)


def test_network_key_default_is_open(tmp_path):
    settings = load(tmp_path)

    assert settings.network_key is None
    assert settings.network_keys_accepted == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (KEY_1.hex(), KEY_1),
        (KEY_1.hex().upper(), KEY_1),
        (base64.b64encode(KEY_1).decode(), KEY_1),
        (base64.b64encode(KEY_1).decode().rstrip("="), KEY_1),
        # KEY_3 encodes with "-" and "_" in the URL-safe alphabet.
        (base64.urlsafe_b64encode(KEY_3).decode(), KEY_3),
        ("  " + base64.b64encode(KEY_1).decode() + "\n", KEY_1),
    ],
)
def test_network_key_text_forms(tmp_path, text, expected):
    assert load(tmp_path, environ={"VOXA_NETWORK_KEY": text}).network_key == expected
    assert load(tmp_path, flags={"network_key": text}).network_key == expected
    assert load(tmp_path, document={"network_key": text}).network_key == expected


def test_network_keys_accepted_forms(tmp_path):
    texts = [base64.b64encode(KEY_2).decode(), KEY_3.hex()]
    primary = KEY_1.hex()

    from_env = load(
        tmp_path,
        environ={"VOXA_NETWORK_KEY": primary, "VOXA_NETWORK_KEYS_ACCEPTED": ",".join(texts)},
    )
    from_flag = load(tmp_path, flags={"network_key": primary, "network_keys_accepted": " , ".join(texts)})
    from_file = load(tmp_path, document={"network_key": primary, "network_keys_accepted": texts})

    for settings in (from_env, from_flag, from_file):
        assert settings.network_key == KEY_1
        assert settings.network_keys_accepted == (KEY_2, KEY_3)


def test_network_key_flag_beats_environment(tmp_path):
    settings = load(
        tmp_path,
        flags={"network_key": KEY_2.hex()},
        environ={"VOXA_NETWORK_KEY": KEY_1.hex()},
    )

    assert settings.network_key == KEY_2
    assert settings.source_of("network_key") == "--network-key"


@pytest.mark.parametrize(
    ("flags", "environ", "document", "setting", "message_part"),
    [
        ({}, {"VOXA_NETWORK_KEY": KEY_1.hex()[:-2]}, None, "network_key", "must be 32 bytes"),
        ({}, {"VOXA_NETWORK_KEY": KEY_1.hex() + "00"}, None, "network_key", "must be 32 bytes"),
        ({"network_key": "not-a-key"}, {}, None, "network_key", "must be 32 bytes"),
        ({}, {"VOXA_NETWORK_KEY": ""}, None, "network_key", "is empty"),
        ({}, {"VOXA_NETWORK_KEY": "  "}, None, "network_key", "is empty"),
        ({}, {}, {"network_key": 12}, "network_key", "or null for an open network"),
        ({}, {}, {"network_key": "z" * 44}, "network_key", "must be 32 bytes"),
        (
            {"network_key": KEY_1.hex()},
            {},
            {"network_keys_accepted": [KEY_2.hex(), "short"]},
            "network_keys_accepted",
            "entry 2 must be 32 bytes",
        ),
        ({}, {}, {"network_keys_accepted": KEY_2.hex()}, "network_keys_accepted", "must be a JSON list"),
        ({}, {}, {"network_keys_accepted": [7]}, "network_keys_accepted", "entry 1 must be 32 bytes"),
        (
            {},
            {"VOXA_NETWORK_KEYS_ACCEPTED": KEY_2.hex()},
            None,
            "network_keys_accepted",
            "accepted keys need a network_key",
        ),
    ],
)
def test_network_key_errors(tmp_path, flags, environ, document, setting, message_part):
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, flags, environ, document)

    message = str(caught.value)
    assert caught.value.setting == setting
    assert message_part in message
    assert message.startswith(f"invalid setting {setting} (from ")


def test_network_key_error_never_shows_value(tmp_path):
    almost_key = KEY_1.hex()[:-1]

    with pytest.raises(SettingsError) as caught:
        load(tmp_path, environ={"VOXA_NETWORK_KEY": almost_key})

    message = str(caught.value)
    assert almost_key[:16] not in message
    assert "(from VOXA_NETWORK_KEY)" in message
    assert "python3 -c 'import os,base64;print(base64.b64encode(os.urandom(32)).decode())'" in message


def test_network_key_error_in_list_never_shows_value(tmp_path):
    flags = {"network_key": KEY_1.hex(), "network_keys_accepted": KEY_2.hex() + "," + KEY_3.hex()[:-4]}

    with pytest.raises(SettingsError) as caught:
        load(tmp_path, flags)

    assert "entry 2" in str(caught.value)
    assert KEY_2.hex()[:16] not in str(caught.value)
    assert KEY_3.hex()[:16] not in str(caught.value)


def test_network_key_not_in_settings_repr():
    settings = dataclasses.replace(Settings(), network_key=KEY_1, network_keys_accepted=(KEY_2,))

    text = repr(settings)
    assert "network_key" not in text
    assert repr(KEY_1)[2:20] not in text
    assert repr(KEY_2)[2:20] not in text


def test_created_key_command_output_is_accepted(tmp_path):
    created = base64.b64encode(os.urandom(32)).decode()

    settings = load(tmp_path, environ={"VOXA_NETWORK_KEY": created})

    assert base64.b64encode(settings.network_key).decode() == created
