"""The node: builds the record store, peer socket, data service and API, and runs them.

`Node.start()` brings the parts up in order (store, peer socket, API, background
loops). If a step fails, it unwinds what it started. `Node.stop()` takes the parts
down in reverse and is safe to call twice. The daemon runs `run_until_stopped()`,
which starts the node, waits for SIGTERM or SIGINT, and stops it.
"""

import asyncio
import dataclasses
import importlib
import json
import logging
import math
import os
import random
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from kademlia.crawling import NodeSpiderCrawl
from kademlia.node import Node as KademliaNode

from voxanode import __version__
from voxanode.api.listen import bind_api_sockets, bind_peer_socket
from voxanode.dht.records import RECORD_OVERHEAD_BYTES, now_millis
from voxanode.dht.service import DataLimits, DataService, run_periodically
from voxanode.dht.store import DATABASE_FILE_NAME, RecordStore
from voxanode.events import EventBus
from voxanode.identity import Identity, readable_node_id
from voxanode.membership.load import sample_load
from voxanode.membership.state import Change, Member, MemberStatus, NodeInfo
from voxanode.membership.swim import Membership, SwimConfig
from voxanode.peer.protocol import PeerProtocol, PeerStats, peer_label
from voxanode.peer.sealing import Keyring
from voxanode.logs import set_log_level
from voxanode.notify import ServiceNotifier
from voxanode.settings import (
    SETTING_SPECS,
    Settings,
    SettingsError,
    display_value,
    format_peer_address,
)

if TYPE_CHECKING:
    from voxanode.apps.controller import AppController

PEERS_FILE_NAME = "peers.json"
PEERS_FILE_VERSION = 1
MAX_SAVED_PEERS = 64
PEERS_SAVE_DELAY_SECONDS = 2.0
# A node that reaches no bootstrap peer warns at once, then at most this often.
SILENT_JOIN_WARNING_SECONDS = 60.0
LOOP_STOP_GRACE_SECONDS = 0.5
# Settings a SIGHUP applies to the running node. The rest take effect after a restart.
RELOADABLE_SETTINGS = frozenset(
    {
        "bootstrap",
        "bootstrap_file",
        "log_level",
        "rate_limit_default",
        "rate_limit_deployments",
        "rate_limit_data",
        "rate_limit_status",
        "rate_limit_ingress",
        "trusted_proxies",
        "docker_pull_policy",
        "docker_allowed_registries",
    }
)
# Set by the daemon at start (git_commit) or not a setting of a file or flag.
NOT_COMPARED_ON_RELOAD = frozenset({"git_commit", "config_file"})

logger = logging.getLogger(__name__)


@dataclass
class PingResult:
    """One peer's reply to a ping sent for /test/connection."""

    node_id: str | None
    address: str
    reachable: bool
    rtt_ms: float | None


@dataclass
class StorageStatus:
    """Whether the record database responds to a query, and how many live records it
    contains when they were counted."""

    ok: bool
    records: int
    detail: str


# Imported in a worker thread while the node joins: the app controller with the Docker
# SDK, and the aiohttp server with the API routes.
LATE_MODULES = ("voxanode.apps.controller", "voxanode.apps.runtime", "voxanode.api.app")


def _import_late_modules() -> None:
    for name in LATE_MODULES:
        importlib.import_module(name)


def _describe_peer_change(before: tuple[tuple[str, int], ...], after: tuple[tuple[str, int], ...]) -> str:
    added = [format_peer_address(*peer) for peer in after if peer not in before]
    removed = [format_peer_address(*peer) for peer in before if peer not in after]
    return (
        f"bootstrap peers now {len(after)}: added {', '.join(added) or 'none'},"
        f" removed {', '.join(removed) or 'none'}"
    )


class Node:
    """One voxanode process: its identity, DHT, data service and API."""

    def __init__(
        self,
        settings: Settings,
        identity: Identity,
        *,
        settings_loader: Callable[[], Settings] | None = None,
        notifier: ServiceNotifier | None = None,
    ):
        self.settings = settings
        # Reads the settings again, from the same flags, environment and files, on SIGHUP.
        self.settings_loader = settings_loader
        self.notifier = notifier or ServiceNotifier({})
        # Called with the new settings after a reload; each returns what it changed.
        self.reload_hooks: list[Callable[[Settings], list[str]]] = []
        # The API's rate limiter (an ApiRateLimiter), which the ingress port shares.
        self.rate_limiter: Any = None
        self._reload_task: asyncio.Task | None = None
        self._reload_pending = False
        self._silent_join_warned_at = -math.inf
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
        self.membership: Membership | None = None
        self.events = EventBus(
            self.node_id,
            buffer_size=settings.event_buffer_size,
            client_queue_size=settings.event_client_queue_size,
        )
        self.apps: "AppController | None" = None
        self.api_runner = None
        self._api_sockets: list[socket.socket] = []
        self._membership_started = False
        self._stop_requested = asyncio.Event()
        self._loops_stop = asyncio.Event()
        self._loops: set[asyncio.Task] = set()
        self._started = False
        self._peers_save_pending = False

    # -- lifecycle ---------------------------------------------------------------

    async def run_until_stopped(self) -> None:
        """Start, wait for SIGTERM or SIGINT, then stop gracefully."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        try:
            await self.start()
            await self._stop_requested.wait()
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            await self.stop()
            # The process exits next: a repeated signal must not kill it half-way.
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
                signal.signal(signum, signal.SIG_IGN)

    def _on_stop_signal(self, signum: int) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        self._stop_requested.set()

    def _on_reload_signal(self) -> None:
        if not self._started:
            logger.info("received SIGHUP while starting; reloading once the node has started")
            self._reload_pending = True
            return
        if self._reload_task is not None and not self._reload_task.done():
            logger.info("received SIGHUP while a reload runs; the running reload reads the files")
            return
        logger.info("received SIGHUP, reloading settings, bootstrap peers and tokens")
        self._reload_task = asyncio.get_running_loop().create_task(self.reload(), name="voxanode-reload")

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def start(self) -> None:
        """Open the store, bind the sockets, join, then start the apps, API and loops.

        The node joins the network as soon as both sockets are bound. Other members
        then list it while a worker thread still imports the modules of the app
        controller and the API: the Docker SDK and the aiohttp server take a few
        hundred milliseconds. Binding the API socket first means a port in use
        fails the start before any other node has heard of it.
        """
        self.started_at = time.time()
        try:
            self.store.open()
            await self._start_peer_socket()
            self._api_sockets = bind_api_sockets(self.settings)
            self._start_membership()
            self.membership.start()
            self._membership_started = True
            self._start_loop("membership", self._maintain_membership())
            await asyncio.get_running_loop().run_in_executor(None, _import_late_modules)
            if self._stop_requested.is_set():
                # SIGTERM came while the modules loaded: stop without ever opening the API.
                logger.info("stop requested while starting; the node stops before opening its API")
                return
            self._create_app_controller()
            from voxanode.api.app import start_api

            sockets, self._api_sockets = self._api_sockets, []
            self.api_runner = await start_api(self, sockets)
            self._start_loops()
            await self.apps.start()
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
        self.notifier.ready(self._service_status())
        if self._reload_pending:
            self._reload_pending = False
            self._on_reload_signal()

    def _service_status(self) -> str:
        settings = self.settings
        return (
            f"node {self.node_id}: API {format_peer_address(settings.api_host, settings.api_port)},"
            f" peers udp {format_peer_address(settings.peer_host, settings.peer_port)}"
        )

    # -- reload ---------------------------------------------------------------------

    async def reload(self) -> bool:
        """Read the settings files again and apply what can change while running.

        Applies the bootstrap peers (joining the new ones at once), the log level and
        what the reload hooks take (tokens, rate limits). Changed settings that need a
        restart are logged. A file that does not load is rejected as a whole and the running
        settings stay. Returns whether the new settings were applied.
        """
        self.notifier.reloading()
        try:
            if self.settings_loader is None:
                new_settings = self.settings
            else:
                new_settings = self.settings_loader()
        except SettingsError as error:
            logger.error("reload rejected, the node keeps its running settings: %s", error)
            self.notifier.ready(self._service_status() + "; last reload rejected, see the log")
            return False
        old_peers = set(self.bootstrap_peers)
        changes = self._apply_settings(new_settings)
        for hook in list(self.reload_hooks):
            try:
                changes.extend(hook(self.settings))
            except Exception:  # noqa: BLE001 - one failing part must not stop the others
                logger.exception("reload step %r failed node=%s", hook, self.node_id)
        for change in changes:
            logger.info("reload: %s", change)
        if not changes:
            logger.info("reload: nothing changed")
        added = [peer for peer in self.bootstrap_peers if peer not in old_peers]
        if added and self.protocol is not None:
            await self._join(added)
        self.notifier.ready(self._service_status())
        return True

    def _apply_settings(self, new: Settings) -> list[str]:
        """Adopt the run-time settings of `new`; describe every change, applied or not."""
        old = self.settings
        changes: list[str] = []
        applied: dict[str, object] = {}
        for spec in SETTING_SPECS:
            name = spec.name
            if name in NOT_COMPARED_ON_RELOAD:
                continue
            before, after = getattr(old, name), getattr(new, name)
            if before == after:
                continue

            # A secret's values never reach the log.
            values = "" if spec.secret else f" from {display_value(before)} to {display_value(after)}"
            description = f"{name} changed{values} (from {new.source_of(name)})"
            if name in RELOADABLE_SETTINGS:
                applied[name] = after
                changes.append(description)
            else:
                changes.append(description + " but takes effect after a restart")

        if new.bootstrap_peers != old.bootstrap_peers:
            applied["bootstrap_peers"] = new.bootstrap_peers
            changes.append(_describe_peer_change(old.bootstrap_peers, new.bootstrap_peers))
        if not applied:
            return changes

        self.settings = dataclasses.replace(old, **applied)
        self.bootstrap_peers = tuple(self.settings.bootstrap_peers)
        if "log_level" in applied:
            set_log_level(self.settings.log_level)
        if self.apps is not None:
            self.apps.runtime.pull_policy = self.settings.docker_pull_policy
            self.apps.runtime.set_allowed_registries(self.settings.docker_allowed_registries)
        return changes

    async def _start_peer_socket(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        max_record_bytes = settings.max_value_bytes + settings.max_key_bytes + RECORD_OVERHEAD_BYTES
        keyring = Keyring(settings.network_key, list(settings.network_keys_accepted))

        def make_protocol() -> PeerProtocol:
            return PeerProtocol(
                self.identity,
                self.data,
                ksize=settings.ksize,
                max_datagram_bytes=settings.max_datagram_bytes,
                rpc_timeout_seconds=settings.rpc_timeout_seconds,
                clock_skew_seconds=settings.clock_skew_seconds,
                max_record_bytes=max_record_bytes,
                keyring=keyring,
            )

        peer_socket = bind_peer_socket(settings)
        try:
            _, protocol = await loop.create_datagram_endpoint(make_protocol, sock=peer_socket)
        except BaseException:
            peer_socket.close()
            raise
        self.protocol = protocol
        self.data.attach(protocol)
        logger.info("peer socket bound udp=%s:%d", settings.peer_host, settings.peer_port)
        if keyring.enabled:
            fingerprints = keyring.fingerprints
            logger.info(
                "peer datagrams are sealed with network key fingerprint=%s also_accepted=%s",
                fingerprints[0],
                ",".join(fingerprints[1:]) or "none",
            )
        else:
            logger.warning(
                "no network_key is set, so any host that can reach udp=%s:%d can join the"
                " network and read peer traffic",
                settings.peer_host,
                settings.peer_port,
            )

    def _start_membership(self) -> None:
        settings = self.settings
        own_info = NodeInfo(
            public_key=self.identity.public_key,
            incarnation=0,
            sequence=0,
            peer_address=(settings.peer_host, settings.peer_port),
            api_address=(settings.api_host, settings.api_port),
            version=__version__,
            capabilities=("storage",),
            load=sample_load(),
            leaving=False,
        )
        self.membership = Membership(
            self.identity,
            self.protocol,
            SwimConfig(
                probe_interval_seconds=settings.probe_interval_seconds,
                probe_timeout_seconds=settings.probe_timeout_seconds,
                indirect_checks=settings.indirect_checks,
                suspicion_mult=settings.suspicion_mult,
                retransmit_mult=settings.retransmit_mult,
                gossip_interval_seconds=settings.gossip_interval_seconds,
                gossip_fanout=settings.gossip_fanout,
                push_pull_interval_seconds=settings.push_pull_interval_seconds,
                load_interval_seconds=settings.load_interval_seconds,
                forget_after_seconds=settings.forget_member_after_seconds,
                leave_wait_seconds=settings.leave_wait_seconds,
            ),
            own_info,
            on_change=self._on_member_change,
            sample_load=lambda: sample_load(self.apps.active_instances() if self.apps else 0),
        )

    def _create_app_controller(self) -> None:
        from voxanode.apps.catalogue import DATABASE_FILE_NAME as APPS_DATABASE_FILE_NAME
        from voxanode.apps.catalogue import Catalogue
        from voxanode.apps.controller import AppController
        from voxanode.apps.peer_calls import PeerCalls
        from voxanode.apps.runtime import DockerRuntime

        settings = self.settings
        publish_host = settings.apps_publish_host or settings.api_host
        if publish_host in ("", "0.0.0.0", "::"):
            publish_host = "0.0.0.0"
        catalogue = Catalogue(Path(settings.data_dir) / APPS_DATABASE_FILE_NAME)
        catalogue.open()
        runtime = DockerRuntime(
            self.node_id,
            publish_host,
            pull_policy=settings.docker_pull_policy,
            allowed_registries=settings.docker_allowed_registries,
            pids_limit=settings.apps_pids_limit,
            workers=settings.docker_workers,
        )
        self.apps = AppController(self, catalogue, runtime, PeerCalls(self.identity))

    def _on_member_change(self, member: Member, change: Change) -> None:
        """Publish membership changes as events and keep the DHT routing table in step."""
        if change in (Change.FAILED, Change.LEFT) and self.protocol is not None:
            # The dead node's records need new holders: drop it and republish now.
            self.protocol.router.remove_contact(KademliaNode(member.dht_id))
            self.data.republish_wanted.set()
        elif change in (Change.JOINED, Change.REJOINED) and self.protocol is not None:
            host, port = member.info.peer_address
            self.protocol.welcome_if_new(KademliaNode(member.dht_id, host, port))
            # A node that others joined (the first of a network) has no other moment to
            # learn its peers, and needs them to rejoin after a restart.
            self._save_peers_soon()
        subject = {"node_id": member.node_id}
        address = f"{member.info.api_address[0]}:{member.info.api_address[1]}"
        if change in (Change.JOINED, Change.REJOINED):
            self.events.publish("node_joined", subject, {"address": address})
        elif change is Change.LEFT:
            self.events.publish("node_left", subject, {"reason": "left", "address": address})
        elif change is Change.FAILED:
            self.events.publish("node_left", subject, {"reason": "failed", "address": address})
        elif change is Change.SUSPECTED:
            self.events.publish("node_suspected", subject, {"address": address})
        if self.apps is not None:
            self.apps.on_member_change(member, change)

    def _start_loops(self) -> None:
        settings = self.settings
        self._start_loop(
            "republish",
            run_periodically(
                "republish",
                settings.republish_interval_seconds,
                self.data.republish_once,
                self._loops_stop,
                self.data.republish_wanted,
            ),
        )
        self._start_loop(
            "sweep",
            run_periodically("sweep", settings.sweep_interval_seconds, self.data.sweep_once, self._loops_stop),
        )

    def _start_loop(self, name: str, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine, name=f"voxanode-{name}")
        self._loops.add(task)
        task.add_done_callback(self._loop_finished)

    def _loop_finished(self, task: asyncio.Task) -> None:
        self._loops.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background loop %s stopped: %r", task.get_name(), task.exception())

    async def stop(self) -> None:
        """Stop the loops, the API and the peer socket, and close the store. Safe twice.

        The API stops accepting connections first; requests already received run to
        their end, up to `shutdown_timeout_seconds`, while the node leaves the network.
        """
        errors = []
        if self._started:
            self.notifier.stopping()
        if self.api_runner is not None:
            for site in list(self.api_runner.sites):
                await site.stop()
        if self.membership is not None and self._membership_started:
            # Others may list this node already, even when the start failed later on.
            self._membership_started = False
            await self.membership.leave()
        self._loops_stop.set()
        if self.membership is not None:
            await self.membership.stop()
        if self._loops:
            # Background jobs are periodic and safe to cancel at any await: a republish
            # round waiting on a dead peer must not hold up the shutdown.
            done, pending = await asyncio.wait(self._loops, timeout=LOOP_STOP_GRACE_SECONDS)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)

        for sock in self._api_sockets:
            sock.close()
        self._api_sockets = []
        if self.api_runner is not None:
            runner, self.api_runner = self.api_runner, None
            try:
                await runner.cleanup()
            except Exception as error:  # noqa: BLE001 - every cleanup error is reported
                errors.append(f"api: {error}")
        if self.apps is not None:
            apps, self.apps = self.apps, None
            try:
                await apps.stop()
            except Exception as error:  # noqa: BLE001 - every cleanup error is reported
                errors.append(f"apps: {error}")
            apps.catalogue.close()
        self.events.close()

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

        Every `join_retry_seconds` this checks the routing table: it adds the online
        members it lacks, while it is empty (a first node, or every peer gone) it tries
        the bootstrap and saved peers, and once `refresh_interval_seconds` have passed
        since the last refresh it runs one.
        """
        settings = self.settings
        next_refresh = time.monotonic() + settings.refresh_interval_seconds
        while not self._loops_stop.is_set():
            self._restore_routing_contacts()
            if self.connected_peer_count() == 0:
                await self._join()
            else:
                await self._sync_membership_if_alone()
                if time.monotonic() >= next_refresh:
                    await self._refresh()
                    delay = settings.refresh_interval_seconds * random.uniform(0.8, 1.2)
                    next_refresh = time.monotonic() + delay
            try:
                await asyncio.wait_for(self._loops_stop.wait(), timeout=settings.join_retry_seconds)
            except asyncio.TimeoutError:
                pass

    async def _join(self, candidates: list[tuple[str, int]] | None = None) -> None:
        """Join through `candidates`, by default the bootstrap and saved peers."""
        addresses = await self._resolve_join_addresses(candidates)
        if not addresses:
            return
        # Membership first, with each peer as soon as it replies to the ping. The others
        # list this node after one exchange, without waiting for an unreachable address.
        reached = []
        members = 0
        pings = {asyncio.ensure_future(self.protocol.ping_address(address)): address for address in addresses}
        for answer in asyncio.as_completed(pings):
            node = await answer
            if node is not None:
                reached.append(node)
                members += await self.membership.join([(node.ip, node.port)])
        silent = [format_peer_address(*pings[ping]) for ping in pings if ping.result() is None]
        if not reached:
            self._warn_no_bootstrap_reply(silent)
            return
        if silent:
            logger.info("bootstrap peers did not reply to a ping: %s", ", ".join(silent))
        crawl = NodeSpiderCrawl(
            self.protocol,
            self.protocol.source_node,
            reached,
            self.settings.ksize,
            self.settings.alpha,
        )
        await crawl.find()
        logger.info(
            "joined the network bootstrap_peers_reached=%d peers_known=%d members=%d",
            len(reached),
            self.connected_peer_count(),
            len(self.membership.table) if members else 1,
        )
        self._save_peers()

    def _warn_no_bootstrap_reply(self, silent: list[str]) -> None:
        """Log that no join address replied: at once, then at most every SILENT_JOIN_WARNING_SECONDS."""
        now = time.monotonic()
        if now - self._silent_join_warned_at < SILENT_JOIN_WARNING_SECONDS:
            logger.debug("no bootstrap peer replied to a ping tried=%d", len(silent))
            return
        self._silent_join_warned_at = now
        logger.warning(
            "no bootstrap peer replied to a ping: %s; check that these addresses are right,"
            " that the nodes there run, and that every node uses the same network_key."
            " The node keeps trying every %.0f s",
            ", ".join(silent),
            self.settings.join_retry_seconds,
        )

    def _restore_routing_contacts(self) -> list[str]:
        """Add the online members that the routing table lacks; return their node ids.

        The kademlia protocol removes a contact after one unanswered RPC, so packet loss
        can empty the routing tables of live nodes. The DHT can then split into groups
        that never look each other up again, while membership lists every node online.
        A member whose bucket is full is left out: a full bucket is no sign of a split,
        and the member would only join the bucket's replacement list.
        """
        if self.membership is None or self.protocol is None:
            return []
        router = self.protocol.router
        added = []
        for member in self.membership.table.others():
            if member.status is not MemberStatus.ONLINE:
                continue
            host, port = member.info.peer_address
            contact = KademliaNode(member.dht_id, host, port)
            bucket = router.buckets[router.get_bucket_for(contact)]
            if not bucket.is_new_node(contact) or len(bucket) >= bucket.ksize:
                continue
            self.protocol.welcome_if_new(contact)
            added.append(member.node_id)
        if added:
            logger.info(
                "added %d online members missing from the routing table nodes=%s",
                len(added), ",".join(sorted(added)),
            )
        return added

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

    async def _sync_membership_if_alone(self) -> None:
        """Join the member list through a DHT contact when no member is reachable."""
        if self.membership.table.reachable_others():
            return
        contacts = self.protocol.router.find_neighbors(self.protocol.source_node, 3)
        if contacts:
            await self.membership.join([(node.ip, node.port) for node in contacts])

    async def _resolve_join_addresses(
        self, candidates: list[tuple[str, int]] | None = None
    ) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        own = {(self.settings.peer_host, self.settings.peer_port)}
        if candidates is None:
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

    def _save_peers_soon(self) -> None:
        """Save the peers within PEERS_SAVE_DELAY_SECONDS, once for a burst of joins."""
        if self._peers_save_pending or self.protocol is None:
            return
        self._peers_save_pending = True

        def save() -> None:
            self._peers_save_pending = False
            self._save_peers()

        asyncio.get_running_loop().call_later(PEERS_SAVE_DELAY_SECONDS, save)

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
        """Return the peer traffic counters, with the members this node reaches as its connected peers.

        The DHT routing table can still hold members that left or failed until a
        lookup finds them silent, so it would overstate the live peers.
        """
        if self.protocol is None:
            return PeerStats(0, 0, 0, 0, 0, 0, {})
        stats = self.protocol.stats()
        if self.membership is not None:
            stats = dataclasses.replace(stats, connected_peers=len(self.membership.table.reachable_others()))
        return stats

    async def ping_peers(self, limit: int = 3) -> list[PingResult]:
        """Ping up to `limit` random known peers; return each reply and its round-trip time."""
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

    def storage_status(self, count_records: bool = False) -> StorageStatus:
        """Check that the record database responds to a query.

        Counting the live records walks the expiry index, so it grows with the store
        and is done only when asked; the health checks need only the query.
        """
        try:
            self.store.check()
            records = self.store.count(now_millis()) if count_records else 0
        except Exception as error:  # noqa: BLE001 - any failure means storage is unhealthy
            return StorageStatus(ok=False, records=0, detail=str(error))
        return StorageStatus(ok=True, records=records, detail="ok")
