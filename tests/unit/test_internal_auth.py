"""Signed node-to-node requests: a valid signature passes once; anything else is rejected."""

import time

import pytest

from voxanode.api.internal_auth import (
    NODE_HEADER,
    SIGNATURE_HEADER,
    TIME_HEADER,
    RequestVerifier,
    SignatureError,
    sign_request,
)
from voxanode.identity import Identity


@pytest.fixture
def caller() -> Identity:
    return Identity.generate()


@pytest.fixture
def verifier(caller) -> RequestVerifier:
    keys = {caller.dht_id: caller.public_key}
    return RequestVerifier(keys.get, skew_seconds=30)


def test_signed_request_names_caller(caller, verifier):
    headers = sign_request(caller, "POST", "/internal/sync/push", b'{"apps": []}')
    assert verifier.verify("POST", "/internal/sync/push", headers, b'{"apps": []}') == caller.node_id


def test_replayed_request_rejected(caller, verifier):
    headers = sign_request(caller, "GET", "/internal/instances/report")
    verifier.verify("GET", "/internal/instances/report", headers, b"")
    with pytest.raises(SignatureError, match="replay"):
        verifier.verify("GET", "/internal/instances/report", headers, b"")


@pytest.mark.parametrize(
    "method, path, body",
    [("GET", "/internal/sync/push", b"{}"), ("POST", "/internal/sync/digest", b"{}"), ("POST", "/internal/sync/push", b"{ }")],
)
def test_changing_method_path_or_body_breaks_the_signature(caller, verifier, method, path, body):
    headers = sign_request(caller, "POST", "/internal/sync/push", b"{}")
    with pytest.raises(SignatureError, match="signature"):
        verifier.verify(method, path, headers, body)


def test_unknown_node_and_key_rejected(caller, verifier):
    stranger = Identity.generate()
    with pytest.raises(SignatureError, match="not a known member"):
        verifier.verify("GET", "/x", sign_request(stranger, "GET", "/x"), b"")
    forged = sign_request(stranger, "GET", "/x")
    forged[NODE_HEADER] = caller.dht_id.hex()
    with pytest.raises(SignatureError, match="signature"):
        verifier.verify("GET", "/x", forged, b"")


def test_stale_or_unsigned_request_rejected(caller, verifier):
    headers = sign_request(caller, "GET", "/x")
    headers[TIME_HEADER] = str(int((time.time() - 120) * 1000))
    with pytest.raises(SignatureError, match="clock skew"):
        verifier.verify("GET", "/x", headers, b"")
    headers = sign_request(caller, "GET", "/x")
    del headers[SIGNATURE_HEADER]
    with pytest.raises(SignatureError, match="missing header"):
        verifier.verify("GET", "/x", headers, b"")
    headers = sign_request(caller, "GET", "/x")
    headers[SIGNATURE_HEADER] = "not base64!"
    with pytest.raises(SignatureError, match="malformed"):
        verifier.verify("GET", "/x", headers, b"")
