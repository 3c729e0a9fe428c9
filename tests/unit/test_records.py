"""Signed records: signing, decoding limits, tampering and time checks."""

import msgpack
import pytest

from voxanode.dht.records import (
    Record,
    RecordError,
    check_record_times,
    decode_record,
    dht_key_for,
    encode_value,
    sign_record,
)
from voxanode.identity import Identity

LIMITS = dict(max_value_bytes=65536, max_key_bytes=512, max_replicas=20)


@pytest.fixture(scope="module")
def identity():
    return Identity.generate()


def test_record_round_trip(identity):
    record = sign_record(identity, "user-1", encode_value({"theme": "dark"}), 60, 3)
    decoded = decode_record(record.encode(), **LIMITS)
    assert decoded == record
    assert decoded.value == {"theme": "dark"}
    assert decoded.dht_key == dht_key_for("user-1")
    assert decoded.expires_ms - decoded.created_ms == 60_000


def _tampered(record: Record, index: int, value) -> bytes:
    fields = msgpack.unpackb(record.encode(), raw=False)
    fields[index] = value
    return msgpack.packb(fields, use_bin_type=True)


@pytest.mark.parametrize(
    "index, value",
    [
        (1, "other-key"),
        (2, b'{"theme":"light"}'),
        (3, 1),
        (4, 2**40),
        (5, 4),
        (6, Identity.generate().public_key),
        (7, bytes(64)),
    ],
)
def test_record_tampered_field_rejected(identity, index, value):
    record = sign_record(identity, "user-1", encode_value({"theme": "dark"}), 60, 3)
    with pytest.raises(RecordError):
        decode_record(_tampered(record, index, value), **LIMITS)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb({"a": 1}),
        msgpack.packb([1, 2, 3]),
        msgpack.packb([1, "k", b"1", -5, 10, 3, bytes(32), bytes(64)]),
        msgpack.packb([2, "k", b"1", 5, 10, 3, bytes(32), bytes(64)]),
        b"\xdd\xff\xff\xff\xff",
        bytes(200_000),
    ],
)
def test_record_garbage_rejected(data):
    with pytest.raises(RecordError):
        decode_record(data, **LIMITS)


def test_record_over_value_limit_rejected(identity):
    record = sign_record(identity, "big", encode_value("x" * 70_000), 60, 3)
    with pytest.raises(RecordError):
        decode_record(record.encode(), **LIMITS)


def test_record_time_checks(identity):
    record = sign_record(identity, "k", b"1", 10, 1, created_ms=1_000_000)
    check_record_times(record, now_ms=1_005_000, clock_skew_ms=0)
    with pytest.raises(RecordError, match="expired"):
        check_record_times(record, now_ms=1_010_000, clock_skew_ms=0)
    with pytest.raises(RecordError, match="future"):
        check_record_times(record, now_ms=900_000, clock_skew_ms=30_000)


def test_record_version_orders_created_then_publisher(identity):
    other = Identity.generate()
    early = sign_record(identity, "k", b"1", 10, 1, created_ms=1000)
    late = sign_record(identity, "k", b"2", 10, 1, created_ms=2000)
    tie = sign_record(other, "k", b"3", 10, 1, created_ms=2000)
    assert late.version > early.version
    assert (tie.version > late.version) == (other.dht_id > identity.dht_id)


def test_encode_value_rejects_nan():
    with pytest.raises(ValueError):
        encode_value(float("nan"))
