"""The SQLite record store: the records this node holds, kept across restarts.

One row per DHT key holds the newest record seen for it; a write replaces the row only
when the incoming record is newer by (created, publisher id). Expired rows are never
returned and are deleted by `delete_expired`, which the data service calls
periodically.

`get` keeps up to `RECORD_CACHE_SIZE` decoded records in memory, so a record read
again skips the SQLite query and the msgpack decode. Every write and delete through
this class drops the cached records it may change, and a cached record is returned
only while it has not expired, so the cache never returns a value that the database
would not. Only this class may write the database while it is open.

The database runs in WAL mode with `synchronous=NORMAL`: a committed write survives a
crash of the process, though not necessarily a power loss of the machine.
"""

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from voxanode.dht.records import Record, RecordError, decode_record

SCHEMA_VERSION = 1
DATABASE_FILE_NAME = "records.sqlite3"
# Decoded records kept in memory; the oldest cached one makes room for a new one.
RECORD_CACHE_SIZE = 1024

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    dht_key BLOB PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    publisher_id BLOB NOT NULL,
    expires_ms INTEGER NOT NULL,
    replicas INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    stored_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_expires ON records (expires_ms);
"""


class StoreError(Exception):
    """The record database cannot be opened or has an unknown schema."""


@dataclass(frozen=True)
class StoredRecord:
    """A record as held here, with its encoded envelope ready to send."""

    record: Record
    envelope: bytes


class RecordStore:
    """Records held by this node, one newest version per DHT key."""

    def __init__(
        self,
        path: Path,
        *,
        max_value_bytes: int,
        max_key_bytes: int,
        max_replicas: int,
    ):
        self.path = Path(path)
        self._limits = dict(
            max_value_bytes=max_value_bytes,
            max_key_bytes=max_key_bytes,
            max_replicas=max_replicas,
        )
        self._db: sqlite3.Connection | None = None
        # DHT key -> the record as the database held it when it was read.
        self._cache: dict[bytes, StoredRecord] = {}

    def open(self) -> None:
        """Open or create the database and check its schema version."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                db.close()
                raise StoreError(
                    f"record database {self.path} has schema version {version},"
                    f" this voxanode reads version {SCHEMA_VERSION}"
                )
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as error:
            raise StoreError(f"cannot open record database {self.path}: {error}") from error
        self._db = db

    def close(self) -> None:
        self._cache.clear()
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("record store is not open; call open() first")
        return self._db

    def put(self, record: Record, envelope: bytes, now_ms: int) -> bool:
        """Keep `record` unless a newer or equal version is held; return whether it was written."""
        self._cache.pop(record.dht_key, None)
        cursor = self.db.execute(
            """
            INSERT INTO records
                (dht_key, created_ms, publisher_id, expires_ms, replicas, envelope, stored_ms)
            VALUES (?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (dht_key) DO UPDATE SET
                created_ms = excluded.created_ms,
                publisher_id = excluded.publisher_id,
                expires_ms = excluded.expires_ms,
                replicas = excluded.replicas,
                envelope = excluded.envelope,
                stored_ms = excluded.stored_ms
            WHERE records.expires_ms <= excluded.stored_ms
               OR excluded.created_ms > records.created_ms
               OR (excluded.created_ms = records.created_ms
                   AND excluded.publisher_id > records.publisher_id)
            """,
            (
                record.dht_key,
                record.created_ms,
                record.publisher_id,
                record.expires_ms,
                record.replicas,
                envelope,
                now_ms,
            ),
        )
        return cursor.rowcount > 0

    def get(self, dht_key: bytes, now_ms: int) -> StoredRecord | None:
        """Return the unexpired record held for `dht_key`, or None."""
        cached = self._cache.get(dht_key)
        if cached is not None:
            if cached.record.expires_ms > now_ms:
                return cached
            # The database row contains this same expired record, because every
            # write drops the cached one.
            del self._cache[dht_key]
            return None

        row = self.db.execute(
            "SELECT envelope FROM records WHERE dht_key = ? AND expires_ms > ?",
            (dht_key, now_ms),
        ).fetchone()
        if row is None:
            return None
        stored = self._decode_row(dht_key, row[0])
        if stored is not None:
            self._remember(dht_key, stored)
        return stored

    def _remember(self, dht_key: bytes, stored: StoredRecord) -> None:
        if len(self._cache) >= RECORD_CACHE_SIZE:
            # Dicts keep insertion order, so the first key is the oldest entry.
            del self._cache[next(iter(self._cache))]
        self._cache[dht_key] = stored

    def version_of(self, dht_key: bytes, now_ms: int) -> tuple[int, bytes] | None:
        """Return (created, publisher id) of the unexpired record held, or None."""
        row = self.db.execute(
            "SELECT created_ms, publisher_id FROM records"
            " WHERE dht_key = ? AND expires_ms > ?",
            (dht_key, now_ms),
        ).fetchone()
        return (row[0], row[1]) if row else None

    def iter_live(self, now_ms: int, batch_size: int = 256) -> Iterator[StoredRecord]:
        """Yield every unexpired record, reading the table in key order by batches."""
        last_key = b""
        while True:
            rows = self.db.execute(
                "SELECT dht_key, envelope FROM records"
                " WHERE dht_key > ? AND expires_ms > ? ORDER BY dht_key LIMIT ?",
                (last_key, now_ms, batch_size),
            ).fetchall()
            if not rows:
                return
            for dht_key, envelope in rows:
                stored = self._decode_row(dht_key, envelope)
                if stored is not None:
                    yield stored
            last_key = rows[-1][0]

    def delete_expired(self, now_ms: int) -> int:
        """Delete every expired record; return how many were deleted."""
        self._cache.clear()
        return self.db.execute(
            "DELETE FROM records WHERE expires_ms <= ?", (now_ms,)
        ).rowcount

    def count(self, now_ms: int) -> int:
        return self.db.execute(
            "SELECT COUNT(*) FROM records WHERE expires_ms > ?", (now_ms,)
        ).fetchone()[0]

    def check(self) -> None:
        """Raise sqlite3.Error if a query on the database fails."""
        self.db.execute("SELECT 1").fetchone()

    def _decode_row(self, dht_key: bytes, envelope: bytes) -> StoredRecord | None:
        # Rows were verified before they were written, so the signature is not checked
        # again; decoding still guards against a damaged file.
        try:
            record = decode_record(envelope, verify=False, **self._limits)
        except RecordError as error:
            logger.error(
                "dropping unreadable stored record key=%s error=%s", dht_key.hex()[:12], error
            )
            self._cache.pop(dht_key, None)
            self.db.execute("DELETE FROM records WHERE dht_key = ?", (dht_key,))
            return None
        return StoredRecord(record, envelope)
