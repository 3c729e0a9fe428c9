"""The data service: store, retrieve, repair and republish records across the network.

Store signs a record and sends it to the `replicas` nodes closest to the key (this
node included when it is among them), moving down the list past nodes that fail, and
reports exactly who acknowledged. Retrieve runs a `RecordLookup` and repairs the
closest nodes that returned an older version or none. The republish loop checks, for
every record this node holds, that the closest nodes in its routing table hold the
same or a newer version, and stores it where they do not. A dead holder drops out of
the routing table when it does not respond, so its replacement gets the record within
a round or two. A sweep loop deletes expired records.
"""

import asyncio
import functools
import logging
import random
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from kademlia.crawling import NodeSpiderCrawl
from kademlia.node import Node

from voxanode.dht.lookup import RecordLookup, closest_with_self
from voxanode.dht.records import (
    Record,
    RecordError,
    check_record_times,
    decode_record,
    dht_key_for,
    now_millis,
    sign_record,
)
from voxanode.dht.store import RecordStore, StoredRecord
from voxanode.identity import Identity, readable_node_id

MAX_CONCURRENT_STORES = 16
# Versions per has_records request: 3 fields of at most 29 bytes each, far below one
# datagram of 8 KiB with room to spare.
VERSIONS_PER_CHECK = 100
REPAIR_TASK_LIMIT = 64
REJECT_WARNING_INTERVAL_SECONDS = 60.0

logger = logging.getLogger(__name__)


class DataError(Exception):
    """Base class of data service errors."""


class NoHoldersError(DataError):
    """No node, this one included, stored the record."""

    def __init__(self, requested: int, errors: list[str]):
        super().__init__(f"no node stored the record ({requested} requested)")
        self.requested = requested
        self.errors = errors


@dataclass
class StoreResult:
    """The outcome of a store: who acknowledged, and what failed on the way."""

    key: str
    holders: list[str]
    created_ms: int
    expires_ms: int
    requested: int
    errors: list[str] = field(default_factory=list)


@dataclass
class RetrieveResult:
    """The newest version of a record found in the network."""

    record: Record
    holders: list[str]
    repaired: list[str]


@dataclass
class DataLimits:
    """Sizes and counts the data service accepts; see the settings of the same names."""

    max_value_bytes: int
    max_key_bytes: int
    ksize: int
    alpha: int
    default_replicas: int
    clock_skew_seconds: float

    @property
    def record(self) -> dict:
        return dict(
            max_value_bytes=self.max_value_bytes,
            max_key_bytes=self.max_key_bytes,
            max_replicas=self.ksize,
        )


class DataService:
    """Records of the DHT as this node stores, finds and keeps them alive."""

    def __init__(self, identity: Identity, store: RecordStore, limits: DataLimits):
        self.identity = identity
        self.records = store
        self.limits = limits
        self.protocol = None  # set by attach() once the peer socket is up
        self.republish_wanted = asyncio.Event()
        self._repairs: set[asyncio.Task] = set()
        self.republish_rounds = 0
        self.records_rejected = 0
        self._next_reject_warning = 0.0
        self.record_writes_failed = 0
        self._next_write_error_log = 0.0
        self.records_republished = 0

    def attach(self, protocol) -> None:
        self.protocol = protocol

    @property
    def self_node(self) -> Node:
        return self.protocol.source_node

    # -- the RecordHolder side: peers asking this node ------------------------------

    def accept_envelope(self, envelope: bytes, sender_id: bytes) -> tuple[bool, str]:
        """Verify a record a peer sent and keep it if it is the newest version here."""
        now_ms = now_millis()
        try:
            record = decode_record(envelope, **self.limits.record)
            check_record_times(record, now_ms, int(self.limits.clock_skew_seconds * 1000))
        except RecordError as error:
            self._count_rejected(sender_id, error)
            return False, str(error)
        try:
            written = self.records.put(record, envelope, now_ms)
        except sqlite3.Error as error:
            # A full or failing disk must not fail the store as a whole: the caller
            # moves on to the next candidate node.
            self._count_write_failed(record, sender_id, error)
            return False, "record database write failed"
        if written:
            logger.debug(
                "stored record key=%s bytes=%d from node=%s",
                record.dht_key.hex()[:12],
                len(envelope),
                readable_node_id(sender_id),
            )
            return True, "stored"
        if self.records.version_of(record.dht_key, now_ms) == record.version:
            return True, "already held"
        return False, "a newer version is held"

    def _count_rejected(self, sender_id: bytes, error: RecordError) -> None:
        """Count a rejected record; log a WARNING about rejections at most once a minute."""
        self.records_rejected += 1
        logger.debug("rejected record from node=%s: %s", readable_node_id(sender_id), error)
        now = time.monotonic()
        if now >= self._next_reject_warning:
            self._next_reject_warning = now + REJECT_WARNING_INTERVAL_SECONDS
            logger.warning(
                "rejected invalid records: %d since start, latest from node=%s: %s",
                self.records_rejected,
                readable_node_id(sender_id),
                error,
            )

    def _count_write_failed(self, record: Record, sender_id: bytes, error: sqlite3.Error) -> None:
        """Count a record the database could not take; log an ERROR at most once a minute."""
        self.record_writes_failed += 1
        now = time.monotonic()
        if now >= self._next_write_error_log:
            self._next_write_error_log = now + REJECT_WARNING_INTERVAL_SECONDS
            logger.error(
                "cannot write records: %d failed since start, latest key=%s from node=%s: %s",
                self.record_writes_failed,
                record.dht_key.hex()[:12],
                readable_node_id(sender_id),
                error,
            )

    def envelope_for(self, dht_key: bytes) -> bytes | None:
        stored = self.records.get(dht_key, now_millis())
        return stored.envelope if stored else None

    def has_versions(self, items: list[tuple[bytes, int, bytes]]) -> list[bool]:
        now_ms = now_millis()
        answers = []
        for dht_key, created_ms, publisher_id in items:
            held = self.records.version_of(dht_key, now_ms)
            answers.append(held is not None and held >= (created_ms, publisher_id))
        return answers

    def on_new_peer(self, node: Node) -> None:
        # A new node may now be among the closest to some records: hand them over soon.
        self.republish_wanted.set()

    # -- store -----------------------------------------------------------------------

    async def store(
        self, key: str, value_json: bytes, ttl_seconds: int, replicas: int
    ) -> StoreResult:
        """Sign a record and store it on the `replicas` closest nodes that accept it.

        Raises NoHoldersError when no node stored it.
        """
        record = sign_record(self.identity, key, value_json, ttl_seconds, replicas)
        envelope = record.encode()
        target = Node(record.dht_key)

        # Find the `replicas` closest nodes in the network, then try them nearest
        # first; the routing table's other contacts stand in for nodes that fail.
        peers = await self._find_closest_peers(target, replicas)
        fallbacks = self.protocol.router.find_neighbors(target, self.limits.ksize)
        candidates = closest_with_self(
            self.self_node, target, peers + fallbacks, self.limits.ksize
        )
        holders, errors = await self._store_on_first(candidates, record, envelope, replicas)

        if not holders:
            raise NoHoldersError(replicas, errors)
        if len(holders) < replicas:
            logger.warning(
                "stored key=%s on %d of %d requested nodes",
                record.dht_key.hex()[:12],
                len(holders),
                replicas,
            )
        return StoreResult(
            key=key,
            holders=[readable_node_id(node_id) for node_id in holders],
            created_ms=record.created_ms,
            expires_ms=record.expires_ms,
            requested=replicas,
            errors=errors,
        )

    async def _find_closest_peers(self, target: Node, count: int) -> list[Node]:
        """Run a Kademlia node lookup for the `count` nodes closest to `target`.

        The lookup is seeded with the k closest contacts of the routing table, not
        only alpha of them: `find_neighbors` stops at the first nodes it meets when
        asked for fewer, which are not always the closest.
        """
        seeds = self.protocol.router.find_neighbors(target, self.limits.ksize)
        if not seeds:
            return []
        crawl = NodeSpiderCrawl(self.protocol, target, seeds, count, self.limits.alpha)
        return await crawl.find()

    async def _store_on_first(
        self, candidates: list[Node], record: Record, envelope: bytes, wanted: int
    ) -> tuple[list[bytes], list[str]]:
        """Store on candidates in order until `wanted` acknowledged or none are left."""
        holders: list[bytes] = []
        errors: list[str] = []
        remaining = list(candidates)
        while remaining and len(holders) < wanted:
            batch = remaining[: wanted - len(holders)]
            remaining = remaining[len(batch) :]
            outcomes = await asyncio.gather(
                *(self._store_on(node, record, envelope) for node in batch)
            )
            for node, (stored, detail) in zip(batch, outcomes):
                if stored:
                    holders.append(node.id)
                else:
                    errors.append(f"{readable_node_id(node.id)}: {detail}")
        return holders, errors

    async def _store_on(self, node: Node, record: Record, envelope: bytes) -> tuple[bool, str]:
        if node.id == self.self_node.id:
            return self.accept_envelope(envelope, node.id)
        return await self.protocol.call_store_record(node, envelope)

    # -- retrieve --------------------------------------------------------------------

    async def retrieve(self, key: str) -> RetrieveResult | None:
        """Return the newest unexpired version of `key` in the network, or None."""
        dht_key = dht_key_for(key)
        now_ms = now_millis()
        local = self.records.get(dht_key, now_ms)
        if self._routing_table_empty():
            # With no other node to ask, a lookup would return the local record with
            # this node as its only holder and nothing to repair, so it is skipped.
            return self._local_result(local)

        target = Node(dht_key)
        lookup = RecordLookup(
            self.protocol,
            target,
            self.protocol.router.find_neighbors(target, self.limits.ksize),
            ksize=self.limits.ksize,
            alpha=self.limits.alpha,
            default_replicas=self.limits.default_replicas,
            local=(local.record, local.envelope) if local else None,
            limits=self.limits.record,
            now_ms=now_ms,
            clock_skew_ms=int(self.limits.clock_skew_seconds * 1000),
        )
        found = await lookup.find()
        if found.newest is None:
            return None

        # Closest nodes without the newest version get it in the background.
        stale = [
            node
            for node, version in found.closest
            if version is None or version < found.newest.version
        ]
        if stale:
            self._start_repair(stale, found.newest, found.newest_envelope)
        return RetrieveResult(
            record=found.newest,
            holders=[readable_node_id(node_id) for node_id in found.holders],
            repaired=[readable_node_id(node.id) for node in stale],
        )

    def _routing_table_empty(self) -> bool:
        # find_neighbors returns no node exactly when every bucket is empty; its
        # traversal costs about 2 µs even then, this check a fraction of that.
        return not any(len(bucket) for bucket in self.protocol.router.buckets)

    def _local_result(self, local: StoredRecord | None) -> RetrieveResult | None:
        if local is None:
            return None
        return RetrieveResult(record=local.record, holders=[self.self_node_id], repaired=[])

    @functools.cached_property
    def self_node_id(self) -> str:
        """This node's id in the `node-` form that results and replies show."""
        return readable_node_id(self.self_node.id)

    def _start_repair(self, nodes: list[Node], record: Record, envelope: bytes) -> None:
        if len(self._repairs) >= REPAIR_TASK_LIMIT:
            logger.debug("repair skipped key=%s: too many repairs running", record.dht_key.hex()[:12])
            return
        task = asyncio.get_running_loop().create_task(self._repair(nodes, record, envelope))
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)

    async def _repair(self, nodes: list[Node], record: Record, envelope: bytes) -> None:
        outcomes = await asyncio.gather(
            *(self._store_on(node, record, envelope) for node in nodes),
            return_exceptions=True,
        )
        for node, outcome in zip(nodes, outcomes):
            if isinstance(outcome, BaseException):
                logger.warning(
                    "repair failed key=%s node=%s: %s",
                    record.dht_key.hex()[:12],
                    readable_node_id(node.id),
                    outcome,
                )
            elif outcome[0]:
                logger.debug(
                    "repaired key=%s on node=%s", record.dht_key.hex()[:12], readable_node_id(node.id)
                )

    # -- republish and sweep ---------------------------------------------------------

    async def republish_once(self) -> int:
        """Make sure the closest nodes hold every record held here; return stores made.

        A target that does not respond drops out of the routing table, so a second
        pass in the same round reaches its replacement.
        """
        stores = 0
        for _ in range(2):
            made, unreachable = await self._republish_pass()
            stores += made
            if not unreachable:
                break
        self.republish_rounds += 1
        self.records_republished += stores
        return stores

    async def _republish_pass(self) -> tuple[int, int]:
        now_ms = now_millis()
        wanted: dict[bytes, list] = {}
        nodes: dict[bytes, Node] = {}
        peers_known = self.protocol.router.find_neighbors(self.self_node, self.limits.ksize)
        if not peers_known:
            return 0, 0

        # Which peers should hold which records, from this node's routing table.
        for stored in self.records.iter_live(now_ms):
            record = stored.record
            target = Node(record.dht_key)
            peers = self.protocol.router.find_neighbors(target, self.limits.ksize)
            closest = closest_with_self(self.self_node, target, peers, record.replicas)
            for node in closest:
                if node.id != self.self_node.id:
                    nodes[node.id] = node
                    wanted.setdefault(node.id, []).append(stored)

        # Ask each peer in batches which versions it already has; store the rest.
        semaphore = asyncio.Semaphore(MAX_CONCURRENT_STORES)
        unreachable = 0
        made = 0

        async def reconcile(node: Node, records: list) -> tuple[int, bool]:
            count = 0
            for start in range(0, len(records), VERSIONS_PER_CHECK):
                batch = records[start : start + VERSIONS_PER_CHECK]
                versions = [
                    (s.record.dht_key, s.record.created_ms, s.record.publisher_id) for s in batch
                ]
                async with semaphore:
                    held = await self.protocol.call_has_records(node, versions)
                if held is None:
                    return count, False
                for stored, has_it in zip(batch, held):
                    if has_it:
                        continue
                    async with semaphore:
                        ok, detail = await self.protocol.call_store_record(node, stored.envelope)
                    if ok:
                        count += 1
                        logger.debug(
                            "republished key=%s to node=%s",
                            stored.record.dht_key.hex()[:12],
                            readable_node_id(node.id),
                        )
            return count, True

        outcomes = await asyncio.gather(
            *(reconcile(nodes[node_id], records) for node_id, records in wanted.items())
        )
        for count, reachable in outcomes:
            made += count
            unreachable += 0 if reachable else 1
        if made:
            logger.info("republished %d records to %d peers", made, len(wanted))
        return made, unreachable

    def sweep_once(self) -> int:
        """Delete expired records and stale chunk transfers; return records deleted."""
        deleted = self.records.delete_expired(now_millis())
        if self.protocol is not None:
            self.protocol.expire_chunk_transfers()
        if deleted:
            logger.info("deleted %d expired records", deleted)
        return deleted

    async def close(self) -> None:
        for task in list(self._repairs):
            task.cancel()
        if self._repairs:
            await asyncio.wait(self._repairs, timeout=2)


async def run_periodically(
    name: str,
    interval_seconds: float,
    job: Callable[[], Awaitable[object] | object],
    stop: asyncio.Event,
    wake: asyncio.Event | None = None,
) -> None:
    """Run `job` every interval until `stop` is set; `wake` runs it early.

    The first run waits a random part of the interval, so nodes started together do
    not act in step. A failed run is logged and the loop goes on.
    """
    delay = random.uniform(0.1, 1.0) * interval_seconds
    while not stop.is_set():
        waiters = [asyncio.ensure_future(stop.wait())]
        if wake is not None:
            waiters.append(asyncio.ensure_future(wake.wait()))
        try:
            await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if stop.is_set():
            return
        if wake is not None:
            wake.clear()
        started = time.monotonic()
        try:
            result = job()
            if asyncio.iscoroutine(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("periodic job %s failed; it runs again in %.1f s", name, interval_seconds)
        logger.debug("periodic job %s took %.3f s", name, time.monotonic() - started)
        delay = interval_seconds
