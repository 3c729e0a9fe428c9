"""Signed DHT records: the msgpack envelope a publisher signs and every holder checks.

A record carries the user's key, the JSON text of the value, its created and expires
times in milliseconds since the epoch, the replica count and the publisher's public
key, followed by an Ed25519 signature over all of those fields. Holders check the
signature, that the key hashes to the DHT key it is stored under, the sizes, and that
`created` is not further in the future than the allowed clock skew.

Conflicting writes are ordered by (created, publisher DHT id): the larger one wins.
"""

import functools
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from voxanode.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Identity,
    dht_id_for,
    readable_node_id,
    verify_signature,
)

RECORD_FORMAT_VERSION = 1
# Room for the key, times, replica count, public key and signature around the value.
RECORD_OVERHEAD_BYTES = 1024


class RecordError(ValueError):
    """A record is malformed, badly signed or not acceptable to this holder."""


def dht_key_for(key: str) -> bytes:
    """Return the 160-bit DHT key under which the user's key is stored."""
    return hashlib.sha1(key.encode("utf-8")).digest()


def encode_value(value: Any) -> bytes:
    """Return the compact UTF-8 JSON text of a value; its length is what size limits count.

    Raises ValueError for NaN or infinite numbers, which JSON cannot carry.
    """
    return json.dumps(
        value, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


@dataclass(frozen=True)
class Record:
    """One signed version of a key's value."""

    key: str
    value_json: bytes
    created_ms: int
    expires_ms: int
    replicas: int
    publisher_key: bytes
    signature: bytes

    # The hashes below are computed once per Record: the record store keeps decoded
    # records in memory and every retrieve reads them. cached_property writes to the
    # instance __dict__, which a frozen dataclass still has.
    @functools.cached_property
    def dht_key(self) -> bytes:
        return dht_key_for(self.key)

    @functools.cached_property
    def publisher_id(self) -> bytes:
        return dht_id_for(self.publisher_key)

    @functools.cached_property
    def publisher_node_id(self) -> str:
        return readable_node_id(self.publisher_id)

    @property
    def version(self) -> tuple[int, bytes]:
        """The order of conflicting writes: created time, then publisher id."""
        return (self.created_ms, self.publisher_id)

    @property
    def value(self) -> Any:
        return json.loads(self.value_json)

    def is_expired(self, now_ms: int | None = None) -> bool:
        return self.expires_ms <= (now_ms if now_ms is not None else now_millis())

    def encode(self) -> bytes:
        """Return the record as the msgpack envelope sent between nodes and stored."""
        return msgpack.packb(
            [
                RECORD_FORMAT_VERSION,
                self.key,
                self.value_json,
                self.created_ms,
                self.expires_ms,
                self.replicas,
                self.publisher_key,
                self.signature,
            ],
            use_bin_type=True,
        )


def now_millis() -> int:
    return int(time.time() * 1000)


def _signed_bytes(
    key: str,
    value_json: bytes,
    created_ms: int,
    expires_ms: int,
    replicas: int,
    publisher_key: bytes,
) -> bytes:
    return msgpack.packb(
        [
            "voxanode-record",
            RECORD_FORMAT_VERSION,
            key,
            value_json,
            created_ms,
            expires_ms,
            replicas,
            publisher_key,
        ],
        use_bin_type=True,
    )


def sign_record(
    identity: Identity,
    key: str,
    value_json: bytes,
    ttl_seconds: int,
    replicas: int,
    created_ms: int | None = None,
) -> Record:
    """Create a record for `key` published and signed by this node."""
    created = created_ms if created_ms is not None else now_millis()
    expires = created + ttl_seconds * 1000
    signature = identity.sign(
        _signed_bytes(key, value_json, created, expires, replicas, identity.public_key)
    )
    return Record(
        key, value_json, created, expires, replicas, identity.public_key, signature
    )


def decode_record(
    data: bytes,
    *,
    max_value_bytes: int,
    max_key_bytes: int,
    max_replicas: int,
    verify: bool = True,
) -> Record:
    """Parse a msgpack envelope and check its shape, sizes and, if `verify`, signature.

    Raises RecordError naming what is wrong. Only envelopes this node verified before
    writing them to its own database are decoded with `verify=False`. Time checks
    (expiry, clock skew) are the holder's job, see `check_record_times`.
    """
    if len(data) > max_value_bytes + max_key_bytes + RECORD_OVERHEAD_BYTES:
        raise RecordError(f"record of {len(data)} bytes is over the size limit")
    try:
        fields = msgpack.unpackb(
            data,
            raw=False,
            max_bin_len=max_value_bytes + PUBLIC_KEY_BYTES,
            max_str_len=max_key_bytes,
            max_array_len=8,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException) as error:
        raise RecordError(
            f"record is not a valid msgpack envelope ({type(error).__name__})"
        ) from error

    if not isinstance(fields, list) or len(fields) != 8:
        raise RecordError("record envelope must be a list of 8 fields")
    version, key, value_json, created, expires, replicas, publisher, signature = fields
    if version != RECORD_FORMAT_VERSION:
        raise RecordError(f"unsupported record format version {version!r}")
    if not isinstance(key, str) or not key or len(key.encode("utf-8")) > max_key_bytes:
        raise RecordError("record key must be a non-empty string within the key limit")
    if not isinstance(value_json, bytes) or len(value_json) > max_value_bytes:
        raise RecordError("record value must be JSON bytes within the value limit")
    for name, number in (("created", created), ("expires", expires)):
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            raise RecordError(f"record {name} time must be a non-negative integer")
    if expires <= created:
        raise RecordError("record expires before it is created")
    if not isinstance(replicas, int) or not 1 <= replicas <= max_replicas:
        raise RecordError(f"record replica count must be 1 to {max_replicas}")
    if not isinstance(publisher, bytes) or len(publisher) != PUBLIC_KEY_BYTES:
        raise RecordError("record publisher key must be 32 bytes")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise RecordError("record signature must be 64 bytes")

    if verify:
        signed = _signed_bytes(key, value_json, created, expires, replicas, publisher)
        if not verify_signature(publisher, signature, signed):
            raise RecordError("record signature does not match its publisher key")
        try:
            json.loads(value_json)
        except (ValueError, RecursionError) as error:
            raise RecordError("record value is not valid JSON") from error
    return Record(key, value_json, created, expires, replicas, publisher, signature)


def check_record_times(record: Record, now_ms: int, clock_skew_ms: int) -> None:
    """Raise RecordError if the record is expired or created too far in the future."""
    if record.is_expired(now_ms):
        raise RecordError("record has expired")
    if record.created_ms > now_ms + clock_skew_ms:
        raise RecordError(
            f"record is created {record.created_ms - now_ms} ms in the future,"
            f" over the clock skew bound of {clock_skew_ms} ms"
        )
