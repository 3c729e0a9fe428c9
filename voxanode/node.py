"""The node: builds the record store, peer socket, data service and API, and runs them.

`Node.start()` brings the parts up in order (store, peer socket, API, background
loops) and unwinds what it started if a step fails; `Node.stop()` takes them down in
reverse and is safe to call twice. `run_until_stopped()` is what the daemon runs: it
starts, waits for SIGTERM or SIGINT, and stops.
"""

import asyncio
import errno
import json
import logging
import os
import random
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from kademlia.crawling import NodeSpiderCrawl
from kademlia.node import Node as KademliaNode

from voxanode.dht.records import RECORD_OVERHEAD_BYTES, now_millis
from voxanode.dht.service import DataLimits, DataService, run_periodically
from voxanode.dht.store import DATABASE_FILE_NAME, RecordStore
from voxanode.identity import Identity, readable_node_id
from voxanode.peer.protocol import PeerProtocol, PeerStats, peer_label
from voxanode.settings import BindError, Settings

PEERS_FILE_NAME = "peers.json"
PEERS_FILE_VERSION = 1
MAX_SAVED_PEERS = 64
BIND_ERRNOS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)

logger = logging.getLogger(__name__)


@dataclass
class PingResult:
    """One peer's answer to a ping from /test/connection."""

    node_id: str | None
    address: str
    reachable: bool
    rtt_ms: float | None


@dataclass
class StorageStatus:
    """Whether the record database answers, and how many live records it holds."""

    ok: bool
    records: int
    detail: str


class Node:
    """One voxanode process: its identity, DHT, data service and API."""

    def __init__(self, settings: Settings, identity: Identity):
        self.settings = settings
        self.identity = identity
        self.node_id = identity.node_id
        self.bootstrap_peers = tuple(settings.bootstrap_peers)
        self.started_at = time.time()
        self.store = RecordStore(
            Path(settings.data_dir) / DATABASE_FILE_NAME,
            max_value_bytes=settings.max_value_bytes,
            max_key_bytes=settings.max_key_bytes,
            max_replicas=settings.ksize,
        )
        self.data = DataService(
            identity,
            self.store,
            DataLimits(
                max_value_bytes=settings.max_value_bytes,
                max_key_bytes=settings.max_key_bytes,
                ksize=settings.ksize,
                alpha=settings.alpha,
                default_replicas=settings.default_replicas,
                clock_skew_seconds=settings.clock_skew_seconds,
            ),
        )
        self.protocol: PeerProtocol | None = None
        self.api_runner = None
        self._stop_requested = asyncio.Event()
        self._loops_stop = asyncio.Event()
        self._loops: set[asyncio.Task] = set()
        self._started = False

    # -- lifecycle ---------------------------------------------------------------

    async def run_until_stopped(self) -> None:
        """Start, wait for SIGTERM or SIGINT, then stop gracefully."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        try:
            await self.start()
            await self._stop_requested.wait()
        finally:
            await self.stop()
            # The process exits next: a repeated signal must not kill it half-way.
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
                signal.signal(signum, signal.SIG_IGN)

    def _on_stop_signal(self, signum: int) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        self._stop_requested.set()

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def start(self) -> None:
        """Open the store, bind the peer socket and the API, start the loops."""
        self.started_at = time.time()
        try:
            self.store.open()
            await self._start_peer_socket()
            from voxanode.api.app import start_api

            self.api_runner = await start_api(self)
            self._start_loops()
        except BaseException:
            await self.stop()
            raise
        self._started = True
        logger.info(
            "node started peer=%s:%d records=%d bootstrap_peers=%d",
            self.settings.peer_host,
            self.settings.peer_port,
            self.store.count(now_millis()),
            len(self.bootstrap_peers),
        )

    async def _start_peer_socket(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        max_record_bytes = settings.max_value_bytes + settings.max_key_bytes + RECORD_OVERHEAD_BYTES

        def make_protocol() -> PeerProtocol:
            return PeerProtocol(
                self.identity,
                self.data,
                ksize=settings.ksize,
                max_datagram_bytes=settings.max_datagram_bytes,
                rpc_timeout_seconds=settings.rpc_timeout_seconds,
                clock_skew_seconds=settings.clock_skew_seconds,
                max_record_bytes=max_record_bytes,
            )

        try:
            _, protocol = await loop.create_datagram_endpoint(
                make_protocol, local_addr=(settings.peer_host, settings.peer_port)
            )
        except OSError as error:
            if error.errno in BIND_ERRNOS:
                raise BindError("peer_port", settings.peer_host, settings.peer_port, error) from error
            raise
        self.protocol = protocol
        self.data.attach(protocol)
        logger.info("peer socket bound udp=%s:%d", settings.peer_host, settings.peer_port)

    def _start_loops(self) -> None:
        settings = self.settings
        jobs = [
            ("membership", self._maintain_membership(), None),
            (
                "republish",
                run_periodically(
                    "republish",
                    settings.republish_interval_seconds,
                    self.data.republish_once,
                    self._loops_stop,
                    self.data.republish_wanted,
                ),
                None,
            ),
            (
                "sweep",
                run_periodically(
                    "sweep", settings.sweep_interval_seconds, self.data.sweep_once, self._loops_stop
                ),
                None,
            ),
        ]
        for name, coroutine, _ in jobs:
            task = asyncio.get_running_loop().create_task(coroutine, name=f"voxanode-{name}")
            self._loops.add(task)
            task.add_done_callback(self._loop_finished)

    def _loop_finished(self, task: asyncio.Task) -> None:
        self._loops.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background loop %s stopped: %r", task.get_name(), task.exception())

    async def stop(self) -> None:
        """Stop the loops, the API and the peer socket, and close the store. Safe twice."""
        errors = []
        self._loops_stop.set()
        if self._loops:
            done, pending = await asyncio.wait(self._loops, timeout=self.settings.shutdown_timeout_seconds)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)

        if self.api_runner is not None:
            runner, self.api_runner = self.api_runner, None
            try:
                await runner.cleanup()
            except Exception as error:  # noqa: BLE001 - every cleanup error is reported
                errors.append(f"api: {error}")

        if self.protocol is not None:
            self._save_peers()
            await self.data.close()
            await self.protocol.close()
            self.protocol = None

        self.store.close()
        if self._started:
            self._started = False
            for error in errors:
                logger.error("shutdown step failed: %s", error)
            logger.info("node stopped")

    # -- membership: join, refresh, saved peers -------------------------------------

    async def _maintain_membership(self) -> None:
        """Join through the bootstrap peers, then refresh the routing table periodically.

        While the routing table is empty (a first node, or every peer gone) this tries
        the bootstrap and saved peers every `join_retry_seconds`.
        """
        settings = self.settings
        while not self._loops_stop.is_set():
            if self.connected_peer_count() == 0:
                await self._join()
                delay = settings.join_retry_seconds if self.connected_peer_count() == 0 else 0
            else:
                await self._refresh()
                delay = settings.refresh_interval_seconds * random.uniform(0.8, 1.2)
            if delay:
                try:
                    await asyncio.wait_for(self._loops_stop.wait(), timeout=delay)
                except asyncio.TimeoutError:
                    pass

    async def _join(self) -> None:
        addresses = await self._resolve_join_addresses()
        if not addresses:
            return
        answers = await asyncio.gather(*(self.protocol.ping_address(addr) for addr in addresses))
        reached = [node for node in answers if node is not None]
        if not reached:
            logger.debug("no bootstrap peer answered tried=%d", len(addresses))
            return
        crawl = NodeSpiderCrawl(
            self.protocol,
            self.protocol.source_node,
            reached,
            self.settings.ksize,
            self.settings.alpha,
        )
        await crawl.find()
        logger.info(
            "joined the network through %d bootstrap peers, %d peers known",
            len(reached),
            self.connected_peer_count(),
        )
        self._save_peers()

    async def _refresh(self) -> None:
        """Look up this node's own id and a random id to keep the buckets filled."""
        for target_id in (self.identity.dht_id, os.urandom(20)):
            target = KademliaNode(target_id)
            nearest = self.protocol.router.find_neighbors(target, self.settings.ksize)
            if nearest:
                await NodeSpiderCrawl(
                    self.protocol, target, nearest, self.settings.ksize, self.settings.alpha
                ).find()
        self._save_peers()

    async def _resolve_join_addresses(self) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        own = {(self.settings.peer_host, self.settings.peer_port)}
        candidates = list(dict.fromkeys(list(self.bootstrap_peers) + self._load_saved_peers()))
        resolved: list[tuple[str, int]] = []
        for host, port in candidates:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            except OSError as error:
                logger.warning("cannot resolve bootstrap peer %s:%d: %s", host, port, error)
                continue
            for family, _, _, _, sockaddr in infos:
                address = (sockaddr[0], sockaddr[1])
                if family in (socket.AF_INET, socket.AF_INET6) and address not in own:
                    resolved.append(address)
                    break
        return list(dict.fromkeys(resolved))

    def _peers_path(self) -> Path:
        return Path(self.settings.data_dir) / PEERS_FILE_NAME

    def _load_saved_peers(self) -> list[tuple[str, int]]:
        path = self._peers_path()
        try:
            document = json.loads(path.read_text())
            peers = document["peers"] if document.get("version") == PEERS_FILE_VERSION else []
            return [(str(host), int(port)) for host, port in peers][:MAX_SAVED_PEERS]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            logger.warning("ignoring unreadable saved peers file %s: %s", path, error)
            return []

    def _save_peers(self) -> None:
        """Write the routing table's contacts to the data dir for the next start."""
        if self.protocol is None:
            return
        contacts = self.protocol.router.find_neighbors(self.protocol.source_node, MAX_SAVED_PEERS)
        if not contacts:
            return
        path = self._peers_path()
        temporary = path.with_suffix(".tmp")
        document = {"version": PEERS_FILE_VERSION, "peers": [[n.ip, n.port] for n in contacts]}
        try:
            temporary.write_text(json.dumps(document))
            os.replace(temporary, path)
        except OSError as error:
            logger.warning("cannot save peers to %s: %s", path, error)

    # -- figures for the API ---------------------------------------------------------

    def connected_peer_count(self) -> int:
        if self.protocol is None:
            return 0
        return sum(len(bucket) for bucket in self.protocol.router.buckets)

    def peer_stats(self) -> PeerStats:
        if self.protocol is None:
            return PeerStats(0, 0, 0, 0, 0, 0, {})
        return self.protocol.stats()

    async def ping_peers(self, limit: int = 3) -> list[PingResult]:
        """Ping up to `limit` random known peers and report each answer and round trip."""
        contacts = self.protocol.router.find_neighbors(self.protocol.source_node, self.settings.ksize)
        chosen = random.sample(contacts, min(limit, len(contacts)))

        async def ping(node: KademliaNode) -> PingResult:
            started = time.perf_counter()
            ok, _ = await self.protocol.call_ping(node)
            elapsed_ms = (time.perf_counter() - started) * 1000
            return PingResult(
                node_id=readable_node_id(node.id),
                address=peer_label((node.ip, node.port)),
                reachable=bool(ok),
                rtt_ms=round(elapsed_ms, 3) if ok else None,
            )

        return list(await asyncio.gather(*(ping(node) for node in chosen)))

    def storage_status(self) -> StorageStatus:
        try:
            self.store.check()
            records = self.store.count(now_millis())
        except Exception as error:  # noqa: BLE001 - any failure means storage is unhealthy
            return StorageStatus(ok=False, records=0, detail=str(error))
        return StorageStatus(ok=True, records=records, detail="ok")
