"""What must hold after every chaos plan: the write ledger and the network checks.

`WriteLedger` records each store the network acknowledged, and `check_ledger` reads
every key back. The expected value of a key is the acknowledged write with the
largest version, the order the DHT itself uses: the record's creation time by the
writer's clock, then the publisher id. The ledger estimates a write's creation time
as the request's start by the test clock plus the clock offset the plan gave the
writer node, so same-key writes in a plan are spaced by more than a second.

Writes acknowledged by fewer than `MIN_REPLICAS_FOR_DURABILITY` nodes are recorded
but never expected to survive a fault. Such a write, or a store that failed, may still
have reached a holder: its acknowledgement was lost or came after the writer's
timeout. So a read may also return it, when it is newer than the newest durable write.
"""

import contextlib
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import psutil

from helpers import api_get, api_post
from voxanode.dht.records import dht_key_for

logger = logging.getLogger(__name__)

MIN_REPLICAS_FOR_DURABILITY = 2
# A retrieve may serve a record until the second its expires_at names: the API rounds
# expiry down to whole seconds, so one second of slack avoids false alarms.
EXPIRY_SLACK_SECONDS = 1.0
RETRIEVE_TIMEOUT_SECONDS = 15.0


@dataclass
class Write:
    """One store request and what the network acknowledged for it."""

    key: str
    value: Any
    ttl_seconds: int
    requested: int
    stored: int
    writer_index: int
    version_estimate_ms: int
    expires_at_s: float

    @property
    def durable(self) -> bool:
        return self.stored >= MIN_REPLICAS_FOR_DURABILITY


@dataclass
class LedgerProblem:
    """A key that did not read back as the ledger expects."""

    key: str
    expected: Any
    reader_index: int
    status: int
    got: Any


@dataclass
class WriteLedger:
    """Acknowledged writes by key; the test's record of what the network promised."""

    writes: dict[str, list[Write]] = field(default_factory=dict)
    attempted: int = 0
    # (writer index, HTTP status, error code) of every store that was not a 200.
    failures: list[tuple[int, int, str]] = field(default_factory=list)
    # The stores that were not a 200, by key, with `stored` 0.
    unacknowledged: dict[str, list[Write]] = field(default_factory=dict)

    def store(self, node, key: str, value: Any, *, ttl: int, replicas: int, clock_offset_s: float = 0.0) -> Write | None:
        """POST /data/store/ through `node`; record and return the write when acknowledged."""
        self.attempted += 1
        started_ms = int(time.time() * 1000)
        status, body, _ = api_post(node.api_url, "/data/store/", {"key": key, "value": value, "ttl": ttl, "replicas": replicas})
        write = Write(
            key=key,
            value=value,
            ttl_seconds=ttl,
            requested=replicas,
            stored=body["replicas"]["stored"] if status == 200 else 0,
            writer_index=node.index,
            version_estimate_ms=started_ms + int(clock_offset_s * 1000),
            # A record expires `ttl` seconds after its creation by the writer's clock.
            expires_at_s=started_ms / 1000 + clock_offset_s + ttl,
        )
        if status != 200:
            code = body.get("error", {}).get("code", "") if isinstance(body, dict) else str(body)[:80]
            self.failures.append((node.index, status, code))
            self.unacknowledged.setdefault(key, []).append(write)
            return None
        self.writes.setdefault(key, []).append(write)
        return write

    @property
    def acknowledged(self) -> int:
        return sum(1 for writes in self.writes.values() for write in writes if write.durable)

    def expected(self, key: str, now_s: float | None = None) -> Write | None:
        """Return the durable unexpired write that should be served for `key`, or None."""
        now_s = time.time() if now_s is None else now_s
        candidates = [write for write in self.writes.get(key, []) if write.durable]
        if not candidates:
            return None
        newest = max(candidates, key=lambda write: write.version_estimate_ms)
        return newest if newest.expires_at_s > now_s + EXPIRY_SLACK_SECONDS else None

    def servable_values(self, key: str) -> list[Any]:
        """Return the values a read of `key` may return: the expected one and any newer write's.

        Newer writes that were acknowledged by too few nodes, or not at all, count too:
        a holder may have kept them.
        """
        expected = self.expected(key)
        if expected is None:
            return []
        others = self.writes.get(key, []) + self.unacknowledged.get(key, [])
        newer = [write.value for write in others if write.version_estimate_ms > expected.version_estimate_ms]
        return [expected.value, *newer]

    def live_keys(self, now_s: float | None = None) -> list[str]:
        """Keys with a durable write that has not expired yet."""
        return [key for key in self.writes if self.expected(key, now_s) is not None]

    def expired_keys(self, now_s: float | None = None) -> list[str]:
        """Keys all of whose writes, unacknowledged ones included, expired more than the slack ago."""
        now_s = time.time() if now_s is None else now_s
        expired = []
        for key, writes in self.writes.items():
            every_write = writes + self.unacknowledged.get(key, [])
            if writes and max(write.expires_at_s for write in every_write) < now_s - EXPIRY_SLACK_SECONDS:
                expired.append(key)
        return expired

    def superseded_by_clock(self) -> int:
        """Count durable writes that lost to an earlier request with a later version.

        This happens only when a writer's clock runs ahead: the DHT orders writes by
        the writer's timestamp, not by when the request arrived.
        """
        count = 0
        for writes in self.writes.values():
            durable = [write for write in writes if write.durable]
            if not durable:
                continue
            newest = max(durable, key=lambda write: write.version_estimate_ms)
            # `writes` is in the order the test sent them, one at a time.
            if durable[-1] is not newest:
                count += 1
        return count


def check_ledger(ledger: WriteLedger, readers: list) -> list[LedgerProblem]:
    """Read every live key through the readers in turn; return the keys that did not match."""
    problems = []
    for number, key in enumerate(ledger.live_keys()):
        expected = ledger.expected(key)
        reader = readers[number % len(readers)]
        status, body, _ = api_get(reader.api_url, "/data/retrieve/", key=key, timeout=RETRIEVE_TIMEOUT_SECONDS)
        # The write may have expired while the others were read.
        if ledger.expected(key) is None:
            continue
        if status != 200 or body.get("value") not in ledger.servable_values(key):
            problems.append(LedgerProblem(key, expected.value, reader.index, status, body))
    return problems


def check_expired_not_served(ledger: WriteLedger, readers: list) -> list[tuple[str, int, Any]]:
    """Read every expired key from every reader; return (key, reader, body) for each served one."""
    served = []
    for key in ledger.expired_keys():
        for reader in readers:
            status, body, _ = api_get(reader.api_url, "/data/retrieve/", key=key, timeout=RETRIEVE_TIMEOUT_SECONDS)
            if status != 404:
                served.append((key, reader.index, body))
    return served


def copies_held(nodes: Iterable, key: str) -> int:
    """Count the nodes whose own SQLite file contains an unexpired copy of `key`."""
    dht_key = dht_key_for(key)
    now_ms = int(time.time() * 1000)
    copies = 0
    for node in nodes:
        path = node.data_dir / "records.sqlite3"
        try:
            # A connection's own `with` does not close it, and such reads left descriptors
            # open. Open connections likely also kept this process on a restarted node's
            # previous WAL index (-shm), which hid its newer records from these reads.
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
                row = db.execute(
                    "SELECT COUNT(*) FROM records WHERE dht_key = ? AND expires_ms > ?", (dht_key, now_ms)
                ).fetchone()
        except sqlite3.Error as error:
            # Counted as no copy. The warning separates a miscount from a missing copy.
            logger.warning("cannot read the records of node %s in %s: %s", node.index, path, error)
            continue
        copies += row[0]
    return copies


def under_replicated(ledger: WriteLedger, nodes: list) -> list[tuple[str, int, int]]:
    """Return (key, wanted, held) for live keys with fewer copies than their replica count.

    The count wanted is capped at the number of nodes given.
    """
    short = []
    for key in ledger.live_keys():
        wanted = min(ledger.expected(key).requested, len(nodes))
        held = copies_held(nodes, key)
        if held < wanted:
            short.append((key, wanted, held))
    return short


def member_view(node) -> dict[str, str]:
    """Return {node_id: status} as `node` lists its members."""
    status, body, _ = api_get(node.api_url, "/data/discover_nodes/", timeout=5)
    if status != 200:
        raise AssertionError(f"discover_nodes on node {node.index} returned {status}: {body}")
    return {entry["node_id"]: entry["status"] for entry in body["nodes"]}


def views_converged(nodes: list, node_ids: set[str]) -> bool | list[dict[str, str]]:
    """Return True when every node lists exactly `node_ids`, all online; else the views."""
    views = [member_view(node) for node in nodes]
    if all(set(view) == node_ids and set(view.values()) == {"online"} for view in views):
        return True
    return views


def routing_peers(node) -> int:
    """Return how many peers the node's DHT routing table contains."""
    status, body, _ = api_get(node.api_url, "/status/system", timeout=5)
    if status != 200:
        raise AssertionError(f"/status/system on node {node.index} returned {status}: {body}")
    return body["network_info"]["routing_table_peers"]


def routing_tables_complete(nodes: list) -> bool | dict[int, int]:
    """Return True when every node's routing table contains every other node; else the counts."""
    counts = {node.index: routing_peers(node) for node in nodes}
    if all(count == len(nodes) - 1 for count in counts.values()):
        return True
    return counts


def rss_bytes(node) -> int:
    """Return the resident set size of the node's process."""
    return psutil.Process(node.pid).memory_info().rss
