"""The record lookup: find the newest version of a record among its closest holders.

The `kademlia` package's value crawl stops at the first copy it finds and picks the
most common value. This lookup keeps crawling until the `r` nodes closest to the key
(this node included) have all answered, where `r` is the largest replica count of the
versions found so far (or the default replica count while none is found). Every
version is verified; the newest by (created, publisher id) wins, and the closest
holders that returned an older version or none are reported for repair.
"""

import logging
from dataclasses import dataclass, field

from kademlia.crawling import SpiderCrawl
from kademlia.node import Node, NodeHeap

from voxanode.dht.records import Record, RecordError, check_record_times, decode_record
from voxanode.identity import readable_node_id

logger = logging.getLogger(__name__)


@dataclass
class LookupResult:
    """The result of a record lookup: the newest version and which nodes have it."""

    newest: Record | None = None
    newest_envelope: bytes | None = None
    # DHT ids of the nodes that returned the newest version.
    holders: list[bytes] = field(default_factory=list)
    # The closest nodes, in order, with the version each one returned (None: none).
    closest: list[tuple[Node, tuple[int, bytes] | None]] = field(default_factory=list)
    rejected: int = 0


class RecordLookup(SpiderCrawl):
    """A Kademlia value crawl that collects every version from the closest nodes."""

    def __init__(
        self,
        protocol,
        target: Node,
        peers: list[Node],
        *,
        ksize: int,
        alpha: int,
        default_replicas: int,
        local: tuple[Record, bytes] | None,
        limits: dict,
        now_ms: int,
        clock_skew_ms: int,
    ):
        SpiderCrawl.__init__(self, protocol, target, peers, ksize, alpha)
        self.default_replicas = default_replicas
        self.limits = limits
        self.now_ms = now_ms
        self.clock_skew_ms = clock_skew_ms
        self.versions: dict[bytes, tuple[int, bytes] | None] = {}
        # Holders usually return byte-identical envelopes: each is verified once.
        self._checked: dict[bytes, Record] = {}
        self.result = LookupResult()
        self._self_node = protocol.source_node
        self.versions[self._self_node.id] = None
        if local is not None:
            self._checked[local[1]] = local[0]
            self._consider(self._self_node.id, *local)

    async def find(self) -> LookupResult:
        """Crawl until the closest nodes have replied; return what was found."""
        if len(self.nearest) == 0:
            return self._finish()
        return await self._find(self.protocol.call_find_value)

    async def _nodes_found(self, responses: dict) -> LookupResult:
        failed = []
        for peer_id, (ok, answer) in responses.items():
            if not ok:
                failed.append(peer_id)
                continue
            self.versions.setdefault(peer_id, None)
            if "nodes" in answer:
                self.nearest.push([Node(*contact) for contact in answer["nodes"]])
            elif "record" in answer:
                self._verify_and_consider(peer_id, answer["record"])
            else:
                size, digest = answer["large"]
                peer = self.nearest.get_node(peer_id)
                envelope = await self.protocol.call_fetch_record(
                    peer, self.node.id, size, digest
                )
                if envelope is not None:
                    self._verify_and_consider(peer_id, envelope)
        self.nearest.remove(failed)

        if self._closest_have_answered():
            return self._finish()
        return await self.find()

    def _verify_and_consider(self, peer_id: bytes, envelope: bytes) -> None:
        checked = self._checked.get(envelope)
        if checked is not None:
            self._consider(peer_id, checked, envelope)
            return
        try:
            record = decode_record(envelope, **self.limits)
            if record.dht_key != self.node.id:
                raise RecordError("record key does not match the requested key")
            check_record_times(record, self.now_ms, self.clock_skew_ms)
        except RecordError as error:
            self.result.rejected += 1
            logger.warning(
                "rejected record from node=%s key=%s: %s",
                readable_node_id(peer_id),
                self.node.id.hex()[:12],
                error,
            )
            return
        self._checked[envelope] = record
        self._consider(peer_id, record, envelope)

    def _consider(self, peer_id: bytes, record: Record, envelope: bytes) -> None:
        self.versions[peer_id] = record.version
        newest = self.result.newest
        if newest is None or record.version > newest.version:
            self.result.newest = record
            self.result.newest_envelope = envelope

    def _wanted_replicas(self) -> int:
        newest = self.result.newest
        wanted = newest.replicas if newest is not None else self.default_replicas
        return min(wanted, self.ksize)

    def _closest_nodes(self) -> list[Node]:
        candidates = list(self.nearest) + [self._self_node]
        candidates.sort(key=lambda node: node.distance_to(self.node))
        return candidates[: self._wanted_replicas()]

    def _closest_have_answered(self) -> bool:
        if self.nearest.have_contacted_all():
            return True
        contacted = self.nearest.contacted | {self._self_node.id}
        return all(node.id in contacted for node in self._closest_nodes())

    def _finish(self) -> LookupResult:
        result = self.result
        if result.newest is not None:
            newest_version = result.newest.version
            result.holders = [
                peer_id for peer_id, version in self.versions.items() if version == newest_version
            ]
        result.closest = [
            (node, self.versions.get(node.id)) for node in self._closest_nodes()
        ]
        return result


def closest_with_self(self_node: Node, target: Node, peers: list[Node], count: int) -> list[Node]:
    """Return the `count` nodes closest to `target` among `peers` and this node."""
    candidates = {node.id: node for node in peers}
    candidates[self_node.id] = self_node
    heap = NodeHeap(target, count)
    heap.push(list(candidates.values()))
    return list(heap)
