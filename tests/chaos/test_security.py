"""Security checks on live nodes: outsiders, forged records, replayed internal requests.

They extend the network key, peer garbage and internal-auth tests: an outsider without
the key cannot plant a record; records that are signed wrongly, name another
publisher, or carry impossible times are rejected over the wire; and a node-to-node
request signed by a real member is served once and rejected when sent again.
"""

import json
import os
import time
import urllib.request

import msgpack

from helpers import api_get
from peer_client import TestPeer
from voxanode.api.internal_auth import sign_request
from voxanode.dht.records import Record, encode_value, sign_record
from voxanode.identity import Identity

OUTSIDER_ATTEMPTS = 5
REPLY_TIMEOUT_SECONDS = 2.0


def peer_for(node) -> TestPeer:
    host, port = node.peer_address.rsplit(":", 1)
    return TestPeer((host, int(port)), bind_host=host)


def network_info(node) -> dict:
    status, body, _ = api_get(node.api_url, "/status/system")
    assert status == 200, body
    return body["network_info"]


def store_reply(peer: TestPeer, envelope: bytes):
    reply = peer.call("store", [envelope], timeout=REPLY_TIMEOUT_SECONDS)
    assert reply is not None, "no reply to a store request"
    return reply.payload


# --- a keyed network --------------------------------------------------------------------


def test_outsider_without_key_cannot_plant_record(devnet_factory):
    network = devnet_factory(2, extra_args=["--network-key", os.urandom(32).hex()])
    member = network.nodes[1]
    peer = peer_for(member)
    try:
        record = sign_record(peer.identity, "planted", encode_value({"evil": True}), 600, 2)
        before = network_info(member)["datagrams_dropped"].get("unsealed", 0)
        for _ in range(OUTSIDER_ATTEMPTS):
            assert peer.call("store", [record.encode()], timeout=0.5) is None
            assert peer.call("ping", [], timeout=0.5) is None
        after = network_info(member)["datagrams_dropped"].get("unsealed", 0)
    finally:
        peer.close()
    assert after - before >= 2 * OUTSIDER_ATTEMPTS
    for node in network.nodes:
        status, body, _ = api_get(node.api_url, "/data/retrieve/", key="planted")
        assert status == 404, body


# --- forged records -----------------------------------------------------------------------


def forged_envelopes(forger: Identity, victim_key: bytes) -> dict[str, tuple[bytes, str]]:
    """Records that must be rejected, each with the start of the expected reason."""
    value = encode_value({"forged": True})
    genuine = sign_record(forger, "forged-target", value, 600, 2)
    now = int(time.time() * 1000)
    return {
        "random signature": (
            Record(genuine.key, value, genuine.created_ms, genuine.expires_ms, 2, forger.public_key, os.urandom(64)).encode(),
            "record signature does not match",
        ),
        "other publisher key": (
            Record(genuine.key, value, genuine.created_ms, genuine.expires_ms, 2, victim_key, genuine.signature).encode(),
            "record signature does not match",
        ),
        "created in the future": (
            sign_record(forger, "forged-target", value, 600, 2, created_ms=now + 3_600_000).encode(),
            "record is created",
        ),
        "already expired": (
            sign_record(forger, "forged-target", value, 1, 2, created_ms=now - 10_000).encode(),
            "record has expired",
        ),
        "expires before created": (
            _envelope_with(genuine, expires_ms=genuine.created_ms - 1),
            "record expires before",
        ),
    }


def _envelope_with(record: Record, **changes) -> bytes:
    fields = msgpack.unpackb(record.encode(), raw=False)
    if "expires_ms" in changes:
        fields[4] = changes["expires_ms"]
    return msgpack.packb(fields, use_bin_type=True)


def test_forged_records_rejected_over_wire(chaos_network):
    node = chaos_network.nodes[2]
    victim = Identity.load(chaos_network.nodes[0].data_dir)
    peer = peer_for(node)
    try:
        for name, (envelope, reason) in forged_envelopes(peer.identity, victim.public_key).items():
            ok, result = store_reply(peer, envelope)
            assert ok is True, name
            assert result[0] is False, (name, result)
            assert result[1].startswith(reason), (name, result)
    finally:
        peer.close()
    status, body, _ = api_get(node.api_url, "/data/retrieve/", key="forged-target")
    assert status == 404, body
    assert node.fetch_node_id() is not None


# --- replayed node-to-node requests ------------------------------------------------------------


def signed_get(node, identity: Identity, path: str, headers: dict | None = None) -> tuple[int, dict, dict]:
    headers = headers or sign_request(identity, "GET", path)
    request = urllib.request.Request(node.api_url + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), headers


def test_replayed_internal_request_rejected(chaos_network):
    caller, target = chaos_network.nodes[1], chaos_network.nodes[3]
    identity = Identity.load(caller.data_dir)
    path = "/internal/instances/report"

    status, body, headers = signed_get(target, identity, path)
    assert status == 200, body
    status, body, _ = signed_get(target, identity, path, headers)
    assert status == 401, body
    assert body["error"]["code"] == "AUTHENTICATION_REQUIRED"
    assert "replay" in body["error"]["details"]["reason"]

    # The same request signed by a key that is no member is rejected too.
    stranger = Identity.generate()
    status, body, _ = signed_get(target, stranger, path)
    assert status == 401, body
    assert "not a known member" in body["error"]["details"]["reason"]
