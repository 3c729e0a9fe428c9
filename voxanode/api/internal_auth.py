"""Signed node-to-node HTTP requests.

A node calls another node's `/internal/` routes with four headers: its DHT id in hex,
the send time in milliseconds, a random nonce, and an Ed25519 signature. The signature
covers the method, path with query, time, nonce and the SHA-256 of the body. The receiving node
checks the signature against the public key that the caller announced in membership
gossip, rejects a time outside the clock-skew window, and rejects a nonce it has seen
inside that window, so a captured request cannot be replayed.

User requests carry no node key, so the public API can never reach these routes.
"""

import base64
import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from voxanode.identity import Identity, readable_node_id, verify_signature

NODE_HEADER = "X-Voxa-Node"
TIME_HEADER = "X-Voxa-Time"
NONCE_HEADER = "X-Voxa-Nonce"
SIGNATURE_HEADER = "X-Voxa-Signature"
NONCE_BYTES = 16
MAX_REMEMBERED_NONCES = 100_000


class SignatureError(Exception):
    """A node-to-node request whose signature headers do not check out."""


def _canonical(method: str, path_qs: str, millis: int, nonce: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return f"{method.upper()}\n{path_qs}\n{millis}\n{nonce}\n{digest}".encode()


def sign_request(identity: Identity, method: str, path_qs: str, body: bytes = b"") -> dict[str, str]:
    """Return the headers that authenticate one request from this node."""
    millis = int(time.time() * 1000)
    nonce = os.urandom(NONCE_BYTES).hex()
    signature = identity.sign(_canonical(method, path_qs, millis, nonce, body))
    return {
        NODE_HEADER: identity.dht_id.hex(),
        TIME_HEADER: str(millis),
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: base64.b64encode(signature).decode(),
    }


class RequestVerifier:
    """A checker of signed requests against the public keys announced in membership."""

    def __init__(self, public_key_of: Callable[[bytes], bytes | None], skew_seconds: float):
        self.public_key_of = public_key_of
        self.skew_ms = int(skew_seconds * 1000)
        self._nonces: OrderedDict[str, int] = OrderedDict()

    def verify(self, method: str, path_qs: str, headers: Mapping[str, str], body: bytes) -> str:
        """Return the readable node id of the caller, or raise SignatureError."""
        try:
            dht_id = bytes.fromhex(headers[NODE_HEADER])
            millis = int(headers[TIME_HEADER])
            nonce = headers[NONCE_HEADER]
            signature = base64.b64decode(headers[SIGNATURE_HEADER], validate=True)
        except KeyError as error:
            raise SignatureError(f"missing header {error.args[0]}") from None
        except ValueError as error:
            raise SignatureError(f"malformed signature header: {error}") from None
        if len(nonce) != NONCE_BYTES * 2:
            raise SignatureError("malformed nonce")

        now_ms = int(time.time() * 1000)
        if abs(now_ms - millis) > self.skew_ms:
            raise SignatureError("request time is outside the accepted clock skew")
        public_key = self.public_key_of(dht_id)
        if public_key is None:
            raise SignatureError("caller is not a known member")
        if not verify_signature(public_key, signature, _canonical(method, path_qs, millis, nonce, body)):
            raise SignatureError("signature does not match the caller's key")

        key = f"{dht_id.hex()}:{nonce}"
        if key in self._nonces:
            raise SignatureError("request was already received (replay)")
        self._remember(key, millis, now_ms)
        return readable_node_id(dht_id)

    def _remember(self, key: str, millis: int, now_ms: int) -> None:
        self._nonces[key] = millis
        # Nonces older than the skew window cannot pass the time check again.
        while self._nonces:
            oldest_key, oldest_ms = next(iter(self._nonces.items()))
            if now_ms - oldest_ms <= 2 * self.skew_ms and len(self._nonces) <= MAX_REMEMBERED_NONCES:
                break
            self._nonces.popitem(last=False)
