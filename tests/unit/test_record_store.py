"""The SQLite record store: newest wins, expiry, persistence."""

import sqlite3

import pytest

from voxanode.dht.records import sign_record
from voxanode.dht.store import RecordStore, StoreError
from voxanode.identity import Identity

LIMITS = dict(max_value_bytes=65536, max_key_bytes=512, max_replicas=20)


@pytest.fixture
def store(tmp_path):
    records = RecordStore(tmp_path / "records.sqlite3", **LIMITS)
    records.open()
    yield records
    records.close()


def test_store_keeps_newest_version(store):
    identity = Identity.generate()
    old = sign_record(identity, "k", b"1", 60, 3, created_ms=1000)
    new = sign_record(identity, "k", b"2", 60, 3, created_ms=2000)
    assert store.put(new, new.encode(), now_ms=1500)
    assert not store.put(old, old.encode(), now_ms=1500)
    assert store.get(new.dht_key, now_ms=1500).record.value_json == b"2"
    assert store.version_of(new.dht_key, now_ms=1500) == new.version


def test_store_hides_and_sweeps_expired(store):
    identity = Identity.generate()
    record = sign_record(identity, "k", b"1", 1, 3, created_ms=1000)
    store.put(record, record.encode(), now_ms=1000)
    assert store.get(record.dht_key, now_ms=1999) is not None
    assert store.get(record.dht_key, now_ms=2000) is None
    assert store.count(now_ms=2000) == 0
    assert store.delete_expired(now_ms=2000) == 1
    assert store.delete_expired(now_ms=2000) == 0


def test_store_replaces_expired_row_with_older_version(store):
    identity = Identity.generate()
    newer = sign_record(identity, "k", b"1", 1, 3, created_ms=5000)
    older = sign_record(identity, "k", b"2", 60, 3, created_ms=4000)
    store.put(newer, newer.encode(), now_ms=5000)
    assert store.put(older, older.encode(), now_ms=7000)


def test_store_survives_reopen(tmp_path):
    identity = Identity.generate()
    record = sign_record(identity, "k", b"[1,2]", 60, 3)
    path = tmp_path / "records.sqlite3"
    first = RecordStore(path, **LIMITS)
    first.open()
    first.put(record, record.encode(), now_ms=record.created_ms)
    first.close()
    second = RecordStore(path, **LIMITS)
    second.open()
    assert second.get(record.dht_key, now_ms=record.created_ms).record == record
    assert [s.record for s in second.iter_live(record.created_ms)] == [record]
    second.close()


def test_store_rejects_unknown_schema_version(tmp_path):
    path = tmp_path / "records.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(StoreError, match="schema version 99"):
        RecordStore(path, **LIMITS).open()


def test_store_iterates_in_batches(store):
    identity = Identity.generate()
    records = [sign_record(identity, f"k{i}", b"1", 60, 3, created_ms=1000) for i in range(25)]
    for record in records:
        store.put(record, record.encode(), now_ms=1000)
    seen = [s.record.key for s in store.iter_live(1000, batch_size=4)]
    assert sorted(seen) == sorted(r.key for r in records)


# The cache of decoded records


def test_cached_get_skips_database(store):
    identity = Identity.generate()
    record = sign_record(identity, "k", b"1", 60, 3, created_ms=1000)
    store.put(record, record.encode(), now_ms=1000)
    first = store.get(record.dht_key, now_ms=1500)
    queries = []
    store.db.set_trace_callback(queries.append)

    second = store.get(record.dht_key, now_ms=1500)

    assert second is first
    assert queries == []


def test_cached_record_replaced_by_newer_write(store):
    identity = Identity.generate()
    old = sign_record(identity, "k", b"1", 60, 3, created_ms=1000)
    new = sign_record(identity, "k", b"2", 60, 3, created_ms=2000)
    store.put(old, old.encode(), now_ms=1000)
    assert store.get(old.dht_key, now_ms=1500).record.value_json == b"1"

    assert store.put(new, new.encode(), now_ms=2000)

    assert store.get(old.dht_key, now_ms=2000).record.value_json == b"2"


def test_cached_record_hidden_once_expired(store):
    identity = Identity.generate()
    record = sign_record(identity, "k", b"1", 1, 3, created_ms=1000)
    store.put(record, record.encode(), now_ms=1000)
    assert store.get(record.dht_key, now_ms=1999) is not None

    assert store.get(record.dht_key, now_ms=2000) is None
    assert store.get(record.dht_key, now_ms=1999) is not None, "read from the database again"


def test_cached_record_dropped_by_sweep(store):
    identity = Identity.generate()
    record = sign_record(identity, "k", b"1", 1, 3, created_ms=1000)
    store.put(record, record.encode(), now_ms=1000)
    assert store.get(record.dht_key, now_ms=1500) is not None

    assert store.delete_expired(now_ms=2000) == 1

    assert store.get(record.dht_key, now_ms=1500) is None


def test_cache_keeps_at_most_cache_size(store, monkeypatch):
    monkeypatch.setattr("voxanode.dht.store.RECORD_CACHE_SIZE", 3)
    identity = Identity.generate()
    records = [sign_record(identity, f"k{number}", b"1", 60, 3, created_ms=1000) for number in range(5)]
    for record in records:
        store.put(record, record.encode(), now_ms=1000)
        store.get(record.dht_key, now_ms=1000)
    queries = []
    store.db.set_trace_callback(queries.append)

    for record in records[2:]:
        assert store.get(record.dht_key, now_ms=1000).record == record
    assert queries == [], "the three newest entries are cached"
    assert store.get(records[0].dht_key, now_ms=1000).record == records[0]
    assert len(queries) == 1, "the oldest entry was evicted"
