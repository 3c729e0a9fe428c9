"""Garbage on the peer socket: every bad datagram is dropped and counted, none crashes."""

import os
import random
import time

import msgpack
import pytest

from helpers import api_get, api_post
from peer_client import TestPeer
from voxanode.peer.framing import MAGIC_SIGNED

GARBAGE_ROUNDS = 200
MAX_DROP_LOG_LINES = 5


@pytest.fixture
def pair(devnet_factory):
    network = devnet_factory(2)
    node = network.nodes[1]
    host, port = node.peer_address.rsplit(":", 1)
    peer = TestPeer((host, int(port)), bind_host=host)
    yield network, node, peer
    peer.close()


def dropped(node) -> dict:
    status, body, _ = api_get(node.api_url, "/status/system")
    assert status == 200, body
    return body["network_info"]["datagrams_dropped"]


def signed_body(peer: TestPeer, fields) -> bytes:
    """Sign a frame body of [kind, msg_id, key, method, ...] given in the short form."""
    kind, msg_id, key, sent_ms, method, payload = fields
    full = [kind, msg_id, key, peer.session_keys.public, b"", sent_ms, method, payload]
    body = MAGIC_SIGNED + msgpack.packb(full, use_bin_type=True)
    return body + peer.identity.sign(body)


def garbage_datagrams(peer: TestPeer, rng: random.Random) -> list[bytes]:
    key = peer.identity.public_key
    now = int(time.time() * 1000)
    datagrams = [
        b"",
        b"\x00",
        MAGIC_SIGNED,
        os.urandom(60_000),
        MAGIC_SIGNED + os.urandom(9000),
        b"VX2" + os.urandom(200),
        msgpack.packb([1, 2, 3]),
        MAGIC_SIGNED + msgpack.packb({"method": "ping"}) + bytes(64),
        MAGIC_SIGNED + msgpack.packb([0] * 100_000)[:7000] + bytes(64),
        signed_body(peer, [0, os.urandom(16), key, now, "ping", list(range(400))]),
        signed_body(peer, [0, os.urandom(16), key, now, "no_such_method", []]),
        signed_body(peer, [0, os.urandom(16), key, now, "find_node", ["not bytes"]]),
        signed_body(peer, [0, os.urandom(16), key, now, "store", [b"\xc1" * 100]]),
        signed_body(peer, [0, os.urandom(16), key, now, "store_chunk", [bytes(32), 10**9, 0, b"x"]]),
        signed_body(peer, [0, os.urandom(16), key, now, "has_records", [[[1, 2, 3]] * 50]]),
        signed_body(peer, [0, os.urandom(16), key, now, "fetch_chunk", [bytes(20), bytes(32), -1]]),
        signed_body(peer, [1, os.urandom(16), key, now, "", [True, "unasked"]]),
        signed_body(peer, [0, os.urandom(16), key, now - 3_600_000, "ping", []]),
        # A valid frame whose signature belongs to another key.
        signed_body(peer, [0, os.urandom(16), os.urandom(32), now, "ping", []]),
    ]
    for _ in range(GARBAGE_ROUNDS):
        datagrams.append(os.urandom(rng.randint(1, 8000)))
        datagrams.append(MAGIC_SIGNED + os.urandom(rng.randint(1, 2000)))
    return datagrams


def test_node_survives_garbage_datagrams(pair):
    network, node, peer = pair
    before = sum(dropped(node).values())

    for datagram in garbage_datagrams(peer, random.Random(7)):
        peer.send_raw(datagram)
        time.sleep(0.0005)

    # A valid ping still gets a reply signed with the node's own key.
    reply = peer.call("ping", [])
    assert reply is not None
    assert reply.payload[0] is True

    counts = dropped(node)
    assert sum(counts.values()) - before >= 2 * GARBAGE_ROUNDS
    reasons = (
        "oversized",
        "truncated",
        "bad_magic",
        "malformed",
        "bad_signature",
        "unknown_session",
        "stale",
        "unknown_method",
        "bad_request",
        "unexpected_response",
    )
    for reason in reasons:
        assert counts.get(reason, 0) > 0, (reason, counts)

    # The node still stores and serves data with its peer.
    status, body, _ = api_post(node.api_url, "/data/store/", {"key": "after-garbage", "value": [1], "replicas": 2})
    assert status == 200, body
    assert body["replicas"]["stored"] == 2
    status, body, _ = api_get(network.nodes[0].api_url, "/data/retrieve/", key="after-garbage")
    assert status == 200, body

    # Drops are summarised in the log, not logged one by one.
    log = node.log_path.read_text(errors="replace")
    assert log.count("dropped invalid peer datagrams") <= MAX_DROP_LOG_LINES
    assert "Traceback" not in log


def test_replayed_request_is_rejected(pair):
    _, node, peer = pair
    msg_id = os.urandom(16)
    datagram = peer.request_datagram("ping", [], msg_id=msg_id)
    peer.send_raw(datagram)
    assert peer.receive(msg_id) is not None
    peer.send_raw(datagram)
    assert peer.receive(msg_id, timeout=1.0) is None
    assert dropped(node).get("replayed", 0) >= 1


def test_forged_record_is_rejected(pair):
    network, node, peer = pair
    status, body, _ = api_post(network.nodes[0].api_url, "/data/store/", {"key": "genuine", "value": {"v": 1}, "replicas": 2})
    assert status == 200, body

    # Take the genuine record from the node, change the value, keep the signature.
    from voxanode.dht.records import dht_key_for

    reply = peer.call("find_value", [dht_key_for("genuine")])
    envelope = reply.payload[1]["record"]
    fields = msgpack.unpackb(envelope, raw=False)
    fields[2] = b'{"v":666}'
    fields[3] += 10_000
    forged = msgpack.packb(fields, use_bin_type=True)
    reply = peer.call("store", [forged])
    assert reply.payload == [True, [False, "record signature does not match its publisher key"]]

    status, body, _ = api_get(node.api_url, "/data/retrieve/", key="genuine")
    assert status == 200, body
    assert body["value"] == {"v": 1}
