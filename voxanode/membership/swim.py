"""SWIM membership over the peer protocol: probes, suspicion, gossip and push-pull.

Every `probe_interval` this node probes one member, taking members in a shuffled
round-robin order: a direct `swim_ping`, and when no ack comes within
`probe_timeout`, `swim_ping_req` through `indirect_checks` other members. A member
that acknowledges neither becomes suspect. Unless it refutes the suspicion with a
higher incarnation within the suspicion timeout, it is declared offline. The timeout
grows with log10 of the member count: `suspicion_mult * max(1, log10(N)) *
probe_interval`.

Updates ride on every probe and ack, and a gossip round every `gossip_interval`
sends queued updates one-way to `gossip_fanout` random members. News about
membership (a member joined, became suspect, failed, left, or refuted a suspicion)
starts a round early, `PROMPT_GOSSIP_GAP_FRACTION` of the interval after the last
one at the soonest, so each hop of its spread costs a fraction of the interval
instead of half of it on average. Each update is still sent the same number of
times, so this changes when bytes are sent, not how many. Load figures wait for the
regular round. A push-pull every
`push_pull_interval` exchanges the full member list with one random member, which
repairs whatever piggybacking missed; joining is a push-pull with a bootstrap peer.

All messages travel as authenticated peer frames, so each update is attributed to
its sender; announcements are also signed by the node they describe (see `state`).
"""

import asyncio
import logging
import math
import os
import random
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from voxanode.identity import Identity, readable_node_id
from voxanode.membership.broadcasts import (
    UPDATE_ALIVE,
    UPDATE_DEAD,
    UPDATE_SUSPECT,
    BroadcastQueue,
)
from voxanode.membership.state import (
    Change,
    InfoError,
    Member,
    MemberStatus,
    MemberTable,
    NodeInfo,
    NodeLoad,
    decode_node_info,
    monotonic_incarnation,
    sign_node_info,
)
from voxanode.peer.protocol import PeerProtocol, PeerRequestError, peer_label

# Bytes of piggybacked updates per message, well inside one datagram with the frame
# around it and room for the sealing and chunk overheads.
MAX_PIGGYBACK_BYTES = 3000
MAX_PIGGYBACK_ENTRIES = 10
# Digest entries per push-pull page (about 45 bytes each) and signed announcements
# (at most 1 KiB each, about 270 in practice) per pull or push message.
DIGEST_PAGE_ENTRIES = 120
PULL_BATCH = 6
MAX_SYNC_PAGES = 64
# Members mentioned in one message that this node checks; a larger list is cut.
MAX_UPDATES_ACCEPTED = 64
# A load announcement is sent when CPU or memory use moved this many percentage
# points from the last one, or when the number of apps changed. Apart from app
# changes, a node makes up to LOAD_ANNOUNCE_BURST announcements in a row, then one
# per LOAD_ANNOUNCE_MIN_SECONDS.
LOAD_CPU_CHANGE_PERCENT = 20.0
LOAD_MEMORY_CHANGE_PERCENT = 5.0
LOAD_ANNOUNCE_BURST = 3
LOAD_ANNOUNCE_MIN_SECONDS = 10.0
# Share of `gossip_interval` that must pass after a gossip round before news about
# membership starts the next one early.
PROMPT_GOSSIP_GAP_FRACTION = 0.25
# Weight of a new CPU sample in the moving average that announcements carry.
LOAD_SMOOTHING = 0.5
STATUS_CODES = {
    MemberStatus.ONLINE: 0,
    MemberStatus.SUSPECT: 1,
    MemberStatus.OFFLINE: 2,
    MemberStatus.LEFT: 3,
}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwimConfig:
    """Timings of the membership protocol; see the settings of the same names."""

    probe_interval_seconds: float = 1.0
    probe_timeout_seconds: float = 0.5
    indirect_checks: int = 3
    suspicion_mult: int = 4
    retransmit_mult: int = 4
    gossip_interval_seconds: float = 0.2
    gossip_fanout: int = 3
    push_pull_interval_seconds: float = 30.0
    load_interval_seconds: float = 2.0
    forget_after_seconds: float = 3600.0
    leave_wait_seconds: float = 1.0


def load_changed(announced: NodeLoad, current: NodeLoad) -> bool:
    """Return whether the load moved enough from the announced one to announce it again."""
    return (
        abs(current.cpu_percent - announced.cpu_percent) >= LOAD_CPU_CHANGE_PERCENT
        or abs(current.memory_percent - announced.memory_percent) >= LOAD_MEMORY_CHANGE_PERCENT
        or current.active_apps != announced.active_apps
    )


def smooth_load(previous: NodeLoad, sample: NodeLoad) -> NodeLoad:
    """Return an exponential moving average of CPU use, so short spikes announce nothing.

    Memory use and the app count are taken as sampled.
    """
    cpu = LOAD_SMOOTHING * sample.cpu_percent + (1 - LOAD_SMOOTHING) * previous.cpu_percent
    cores = os.cpu_count() or 1
    return replace(sample, cpu_percent=cpu, cpu_free_cores=max(0.0, cores * (1 - cpu / 100)))


def suspicion_timeout(config: SwimConfig, member_count: int) -> float:
    """Return how long a suspect member has to refute before it is declared offline."""
    scale = max(1.0, math.log10(max(1, member_count)))
    return config.suspicion_mult * scale * config.probe_interval_seconds


class AnnouncementBudget:
    """A token bucket for load announcements.

    It holds up to `burst` announcements and gains one every `refill_seconds`, so a
    sudden rise is announced sample by sample as it settles, while a load that keeps
    moving costs one announcement per refill.
    """

    def __init__(self, burst: int, refill_seconds: float, now: float):
        self.burst = burst
        self.refill_seconds = refill_seconds
        self._tokens = float(burst)
        self._updated = now

    def take(self, now: float) -> bool:
        """Spend one announcement if the budget has one, and return whether it did."""
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self.burst, self._tokens + elapsed / self.refill_seconds)
        self._updated = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class Membership:
    """This node's view of the network's members, kept current with SWIM."""

    def __init__(
        self,
        identity: Identity,
        protocol: PeerProtocol,
        config: SwimConfig,
        own_info: NodeInfo,
        on_change: Callable[[Member, Change], None],
        sample_load: Callable[[], NodeLoad],
    ):
        self.identity = identity
        self.protocol = protocol
        self.config = config
        self.on_change = on_change
        self.sample_load = sample_load
        self.table = MemberTable(identity.dht_id)
        self.broadcasts = BroadcastQueue(config.retransmit_mult)
        self._own = sign_node_info(identity, replace(own_info, incarnation=monotonic_incarnation()))
        self.table.apply_info(self._own, time.time())
        self._probe_order: list[bytes] = []
        self._suspicions: dict[bytes, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._stop = asyncio.Event()
        # Set by news about membership and by stop(): wakes the gossip loop early.
        self._gossip_wake = asyncio.Event()
        self.messages_sent = 0
        self.messages_received = 0
        self.rejected_updates = 0

        for method, handler in (
            ("swim_ping", self.rpc_swim_ping),
            ("swim_ping_req", self.rpc_swim_ping_req),
            ("swim_gossip", self.rpc_swim_gossip),
            ("swim_digest", self.rpc_swim_digest),
            ("swim_pull", self.rpc_swim_pull),
            ("swim_push", self.rpc_swim_push),
        ):
            protocol.register_handler(method, handler)

    # -- lifecycle ---------------------------------------------------------------

    @property
    def own_info(self) -> NodeInfo:
        return self._own

    def start(self) -> None:
        """Start the probe, gossip, push-pull and load loops."""
        self._broadcast_own()
        for name, coroutine in (
            ("probe", self._probe_loop()),
            ("gossip", self._gossip_loop()),
            ("push-pull", self._push_pull_loop()),
            ("load", self._load_loop()),
        ):
            task = asyncio.get_running_loop().create_task(coroutine, name=f"swim-{name}")
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("membership loop %s stopped: %r", task.get_name(), task.exception())

    async def leave(self) -> None:
        """Announce that this node leaves, send it to every reachable member, then wait."""
        self._own = sign_node_info(
            self.identity, replace(self._own, sequence=self._own.sequence + 1, leaving=True)
        )
        self.table.apply_info(self._own, time.time())
        entry = [UPDATE_ALIVE, self._own.encoded]
        reachable = self.table.reachable_others()
        for member in reachable:
            self._notify(member, [entry])
        self._broadcast_own()
        if not reachable:
            logger.info("leaving, no member to tell")
            return
        logger.info(
            "announced leave to %d members, waiting %.1f s",
            len(reachable),
            self.config.leave_wait_seconds,
        )
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=self.config.leave_wait_seconds)
        except asyncio.TimeoutError:
            pass

    async def stop(self) -> None:
        """Cancel the loops and suspicion timers; safe to call twice."""
        self._stop.set()
        self._gossip_wake.set()
        for handle in self._suspicions.values():
            handle.cancel()
        self._suspicions.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)

    # -- joining and push-pull -------------------------------------------------------

    async def join(self, addresses: list[tuple[str, int]]) -> int:
        """Exchange member lists with each address; return how many responded."""
        answered = 0
        for address in addresses:
            if await self._sync_with(address, None):
                answered += 1
        return answered

    async def _push_pull_loop(self) -> None:
        await self._sleep(random.uniform(0.5, 1.0) * self.config.push_pull_interval_seconds)
        while not self._stop.is_set():
            candidates = self.table.reachable_others()
            if candidates:
                member = random.choice(candidates)
                await self._sync_with(tuple(member.info.peer_address), member.dht_id)
            # Nothing probes a member declared dead, so after a network split each side
            # would keep the other offline for good. A push-pull with one failed member
            # per round merges the two sides once the split heals.
            failed = [m for m in self.table.others() if m.status is MemberStatus.OFFLINE]
            if failed:
                member = random.choice(failed)
                await self._sync_with(tuple(member.info.peer_address), member.dht_id)
            self._forget_old_members()
            await self._sleep(self.config.push_pull_interval_seconds * random.uniform(0.9, 1.1))

    async def _sync_with(self, address: tuple[str, int], peer_id: bytes | None) -> bool:
        """Exchange member digests with a peer, then the announcements either lacks.

        A digest entry is `[id, incarnation, sequence, status, status incarnation]`,
        about 45 bytes against about 270 for a signed announcement, so a push-pull
        between two nodes that agree moves only the digests.
        """
        own_pages = self._digest_pages()
        wanted_from_peer: list[bytes] = []
        page = 0
        total = len(own_pages)
        while page < min(max(total, len(own_pages)), MAX_SYNC_PAGES):
            mine = own_pages[page] if page < len(own_pages) else []
            ok, result, responder = await self.protocol.call(
                address, "swim_digest", [page, len(own_pages), mine], peer_id
            )
            if not ok or not isinstance(result, list) or len(result) != 3:
                logger.debug("push-pull failed with=%s page=%d", peer_label(address), page)
                return False
            their_total, their_digest, wanted_by_peer = result
            if not isinstance(their_total, int) or not isinstance(their_digest, list):
                return False
            peer_id = peer_id or responder
            total = min(their_total, MAX_SYNC_PAGES)
            wanted_from_peer += self._compare_digest(their_digest, time.time())
            if isinstance(wanted_by_peer, list):
                await self._push_entries(address, peer_id, wanted_by_peer)
            page += 1

        for start in range(0, len(wanted_from_peer), PULL_BATCH):
            batch = wanted_from_peer[start : start + PULL_BATCH]
            ok, entries, _ = await self.protocol.call(address, "swim_pull", [batch], peer_id)
            if not ok or not isinstance(entries, list):
                return False
            self._merge_entries(entries)
        return True

    async def _push_entries(self, address: tuple, peer_id: bytes | None, ids: list) -> None:
        entries = [self._full_entry(dht_id) for dht_id in ids[:MAX_UPDATES_ACCEPTED * 4]]
        entries = [entry for entry in entries if entry is not None]
        for start in range(0, len(entries), PULL_BATCH):
            await self.protocol.call(
                address, "swim_push", [entries[start : start + PULL_BATCH]], peer_id
            )

    def _digest_pages(self) -> list[list]:
        digest = [
            [
                member.dht_id,
                member.info.incarnation,
                member.info.sequence,
                STATUS_CODES[member.status],
                member.status_incarnation,
            ]
            for member in self.table.members.values()
        ]
        pages = [digest[i : i + DIGEST_PAGE_ENTRIES] for i in range(0, len(digest), DIGEST_PAGE_ENTRIES)]
        return pages or [[]]

    def _compare_digest(self, digest: list, now: float) -> list[bytes]:
        """Take suspicions from a peer's digest; return ids whose announcement is newer there."""
        wanted = []
        for entry in digest[: DIGEST_PAGE_ENTRIES]:
            if not isinstance(entry, list) or len(entry) != 5:
                continue
            dht_id, incarnation, sequence, status, status_incarnation = entry
            if not isinstance(dht_id, bytes) or not all(
                isinstance(number, int) for number in (incarnation, sequence, status_incarnation)
            ):
                continue
            if self.table.is_news(dht_id, incarnation, sequence):
                wanted.append(dht_id)
            # Another node's verdict of offline is taken as a suspicion here, so this
            # node runs its own suspicion timeout before it agrees.
            elif status in (STATUS_CODES[MemberStatus.SUSPECT], STATUS_CODES[MemberStatus.OFFLINE]):
                self._suspect(dht_id, status_incarnation, now)
        return wanted

    def _full_entry(self, dht_id: Any) -> list | None:
        member = self.table.get(dht_id) if isinstance(dht_id, bytes) else None
        if member is None:
            return None
        return [member.info.encoded, STATUS_CODES[member.status], member.status_incarnation]

    def _merge_entries(self, entries: list) -> None:
        now = time.time()
        for entry in entries[: MAX_UPDATES_ACCEPTED * 4]:
            if not isinstance(entry, list) or len(entry) != 3:
                continue
            info = self._accept_info(entry[0], now)
            status, incarnation = entry[1], entry[2]
            if info is None or not isinstance(incarnation, int):
                continue
            if status in (STATUS_CODES[MemberStatus.SUSPECT], STATUS_CODES[MemberStatus.OFFLINE]):
                self._suspect(info.dht_id, incarnation, now)

    # -- handlers: peers asking this node ----------------------------------------------

    def rpc_swim_ping(self, sender: tuple, sender_id: bytes, updates: Any) -> list:
        self._heard_from(sender_id, updates)
        return self._piggyback()

    async def rpc_swim_ping_req(
        self, sender: tuple, sender_id: bytes, target_id: Any, updates: Any
    ) -> list:
        if not isinstance(target_id, bytes):
            raise PeerRequestError("target must be a node id")
        self._heard_from(sender_id, updates)
        target = self.table.get(target_id)
        ok = False
        if target is not None:
            ok = await self._ping(target, self.config.probe_timeout_seconds)
        return [ok, self._piggyback()]

    def rpc_swim_gossip(self, sender: tuple, sender_id: bytes, updates: Any) -> None:
        self._heard_from(sender_id, updates)

    def rpc_swim_digest(
        self, sender: tuple, sender_id: bytes, page: Any, their_total: Any, digest: Any
    ) -> list:
        if not isinstance(page, int) or not isinstance(digest, list):
            raise PeerRequestError("a digest needs a page number and a list of entries")
        now = time.time()
        self.table.touch(sender_id, now)
        wanted = self._compare_digest(digest, now)
        own_pages = self._digest_pages()
        mine = own_pages[page] if 0 <= page < len(own_pages) else []
        return [len(own_pages), mine, wanted]

    def rpc_swim_pull(self, sender: tuple, sender_id: bytes, ids: Any) -> list:
        if not isinstance(ids, list):
            raise PeerRequestError("a pull needs a list of node ids")
        entries = [self._full_entry(dht_id) for dht_id in ids[:PULL_BATCH]]
        return [entry for entry in entries if entry is not None]

    def rpc_swim_push(self, sender: tuple, sender_id: bytes, entries: Any) -> bool:
        if not isinstance(entries, list):
            raise PeerRequestError("a push needs a list of entries")
        self._merge_entries(entries[:PULL_BATCH])
        return True

    # -- probing ---------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        await self._sleep(random.uniform(0, self.config.probe_interval_seconds))
        while not self._stop.is_set():
            started = time.monotonic()
            target = self._next_probe_target()
            if target is not None:
                await self._probe(target)
            elapsed = time.monotonic() - started
            await self._sleep(max(0.0, self.config.probe_interval_seconds - elapsed))

    def _next_probe_target(self) -> Member | None:
        # Round-robin over a shuffled list bounds the time until each member is probed.
        while self._probe_order:
            member = self.table.get(self._probe_order.pop())
            if member is not None and member.reachable and member.dht_id != self.table.own_id:
                return member
        others = [m.dht_id for m in self.table.reachable_others()]
        if not others:
            return None
        random.shuffle(others)
        self._probe_order = others
        return self.table.get(self._probe_order.pop())

    async def _probe(self, target: Member) -> None:
        """Probe one member directly, then indirectly; suspect it if both fail."""
        if await self._ping(target, self.config.probe_timeout_seconds):
            return

        helpers = [m for m in self.table.reachable_others() if m.dht_id != target.dht_id]
        helpers = random.sample(helpers, min(self.config.indirect_checks, len(helpers)))
        remaining = max(
            0.05, self.config.probe_interval_seconds - self.config.probe_timeout_seconds
        )
        if helpers:
            results = await asyncio.gather(
                *(self._ping_via(helper, target, remaining) for helper in helpers)
            )
            if any(results):
                return
        if self.table.get(target.dht_id) is target and target.reachable:
            logger.debug("probe failed node=%s", target.node_id)
            self._suspect(target.dht_id, target.info.incarnation, time.time())

    async def _ping(self, member: Member, timeout: float) -> bool:
        self.messages_sent += 1
        ok, result, _ = await self.protocol.call(
            tuple(member.info.peer_address),
            "swim_ping",
            [self._piggyback()],
            member.dht_id,
            timeout=timeout,
        )
        if ok:
            self._heard_from(member.dht_id, result)
        return ok

    async def _ping_via(self, helper: Member, target: Member, timeout: float) -> bool:
        self.messages_sent += 1
        ok, result, _ = await self.protocol.call(
            tuple(helper.info.peer_address),
            "swim_ping_req",
            [target.dht_id, self._piggyback()],
            helper.dht_id,
            timeout=timeout,
        )
        if not ok or not isinstance(result, list) or len(result) != 2:
            return False
        self._heard_from(helper.dht_id, result[1])
        return result[0] is True

    # -- suspicion -------------------------------------------------------------------

    def _suspect(self, dht_id: bytes, incarnation: int, now: float) -> None:
        if dht_id == self.table.own_id:
            self._refute(incarnation)
            return
        change = self.table.apply_suspect(dht_id, incarnation, now)
        if change is None:
            return
        member = self.table.get(dht_id)
        self.broadcasts.add(dht_id, [UPDATE_SUSPECT, dht_id, incarnation], 40)
        self._gossip_wake.set()
        timeout = suspicion_timeout(self.config, len(self.table.reachable_others()) + 1)
        logger.info("member suspect node=%s timeout=%.1fs", member.node_id, timeout)
        self._notify_change(member, change)
        handle = asyncio.get_running_loop().call_later(
            timeout, self._suspicion_expired, dht_id, incarnation
        )
        previous = self._suspicions.pop(dht_id, None)
        if previous is not None:
            previous.cancel()
        self._suspicions[dht_id] = handle

    def _suspicion_expired(self, dht_id: bytes, incarnation: int) -> None:
        self._suspicions.pop(dht_id, None)
        member = self.table.get(dht_id)
        if member is None or member.status is not MemberStatus.SUSPECT:
            return
        if member.status_incarnation != incarnation:
            return
        self._declare_dead(dht_id, incarnation)

    def _declare_dead(self, dht_id: bytes, incarnation: int) -> None:
        if dht_id == self.table.own_id:
            self._refute(incarnation)
            return
        change = self.table.apply_dead(dht_id, incarnation, time.time())
        if change is None:
            return
        member = self.table.get(dht_id)
        self.broadcasts.add(dht_id, [UPDATE_DEAD, dht_id, incarnation], 40)
        self._gossip_wake.set()
        logger.info("member failed node=%s", member.node_id)
        self._notify_change(member, change)

    def _refute(self, incarnation: int) -> None:
        """Refute a suspicion about this node by announcing a higher incarnation.

        A claim about an older incarnation, such as one about an earlier run of this
        node, is already refuted by the current announcement.
        """
        if self._own.leaving or incarnation < self._own.incarnation:
            return
        new_incarnation = max(self._own.incarnation, incarnation) + 1
        self._own = sign_node_info(self.identity, replace(self._own, incarnation=new_incarnation))
        self.table.apply_info(self._own, time.time())
        logger.info("refuting suspicion with incarnation=%d", new_incarnation)
        self._broadcast_own()
        self._gossip_wake.set()

    # -- updates in and out ----------------------------------------------------------

    def _heard_from(self, sender_id: bytes, updates: Any) -> None:
        self.messages_received += 1
        now = time.time()
        self.table.touch(sender_id, now)
        if not isinstance(updates, list):
            return
        for update in updates[:MAX_UPDATES_ACCEPTED]:
            self._apply_update(update, now)

    def _apply_update(self, update: Any, now: float) -> None:
        if not isinstance(update, list) or not update:
            return
        kind = update[0]
        if kind == UPDATE_ALIVE and len(update) == 2:
            self._accept_info(update[1], now)
        elif kind in (UPDATE_SUSPECT, UPDATE_DEAD) and len(update) == 3:
            dht_id, incarnation = update[1], update[2]
            if not isinstance(dht_id, bytes) or not isinstance(incarnation, int):
                return
            if kind == UPDATE_SUSPECT:
                self._suspect(dht_id, incarnation, now)
            else:
                self._declare_dead(dht_id, incarnation)

    def _accept_info(self, encoded: Any, now: float) -> NodeInfo | None:
        """Verify and merge an announcement unless it is one already known."""
        if not isinstance(encoded, bytes):
            return None
        known = self._known_info(encoded)
        if known is not None:
            return known

        try:
            info = decode_node_info(encoded)
        except InfoError as error:
            self.rejected_updates += 1
            logger.debug("rejected member announcement: %s", error)
            return None

        if info.dht_id == self.table.own_id:
            if info.order > self._own.order:
                # Peers have an announcement of this node newer than its own, left
                # from an earlier run: announce a higher incarnation.
                self._refute(info.incarnation)
            return info

        change = self.table.apply_info(info, now)
        if change is None:
            return info

        self.broadcasts.add(info.dht_id, [UPDATE_ALIVE, info.encoded], len(info.encoded) + 8)
        self._settle_suspicion(info.dht_id)
        if change is not Change.UPDATED:
            self._gossip_wake.set()
            logger.info("member %s node=%s at=%s", change.value, info.node_id, peer_label(info.peer_address))
        self._notify_change(self.table.get(info.dht_id), change)
        return info

    def _settle_suspicion(self, dht_id: bytes) -> None:
        """Cancel the suspicion timer of a member that is no longer suspect."""
        member = self.table.get(dht_id)
        if member is not None and member.status is not MemberStatus.SUSPECT:
            timer = self._suspicions.pop(dht_id, None)
            if timer is not None:
                timer.cancel()

    def _known_info(self, encoded: bytes) -> NodeInfo | None:
        # Most announcements arrive many times: skip the signature check for a copy of
        # the announcement already held.
        for member in self.table.members.values():
            if member.info.encoded == encoded:
                return member.info
        return None

    def _piggyback(self) -> list:
        return self.broadcasts.take(len(self.table), MAX_PIGGYBACK_ENTRIES, MAX_PIGGYBACK_BYTES)

    def _broadcast_own(self) -> None:
        self.broadcasts.add(
            self._own.dht_id, [UPDATE_ALIVE, self._own.encoded], len(self._own.encoded) + 8
        )

    def _notify(self, member: Member, updates: list) -> None:
        self.messages_sent += 1
        try:
            self.protocol.notify(tuple(member.info.peer_address), "swim_gossip", [updates], member.dht_id)
        except ValueError as error:
            logger.warning("gossip message not sent to node=%s: %s", member.node_id, error)

    async def _gossip_loop(self) -> None:
        interval = self.config.gossip_interval_seconds
        min_gap = interval * PROMPT_GOSSIP_GAP_FRACTION
        last_round = -math.inf
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._gossip_wake.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass
            else:
                early = last_round + min_gap - time.monotonic()
                if early > 0:
                    await self._sleep(early)
            if self._stop.is_set():
                return
            self._gossip_wake.clear()
            last_round = time.monotonic()
            if not len(self.broadcasts):
                continue
            members = self.table.reachable_others()
            for member in random.sample(members, min(self.config.gossip_fanout, len(members))):
                updates = self._piggyback()
                if not updates:
                    break
                self._notify(member, updates)

    async def _load_loop(self) -> None:
        """Sample the load and announce it when it moved noticeably.

        Every member forwards every announcement `transmit_limit` times, so an idle
        node announces nothing, and announcements that only carry new figures draw on
        an `AnnouncementBudget`. A change of the app count is announced at once.
        """
        budget = AnnouncementBudget(LOAD_ANNOUNCE_BURST, LOAD_ANNOUNCE_MIN_SECONDS, time.monotonic())
        smoothed: NodeLoad | None = None
        while not self._stop.is_set():
            await self._sleep(self.config.load_interval_seconds)
            sample = self.sample_load()
            # The load announced at start comes from psutil's first CPU reading, which
            # is always 0, so the first real sample is taken as it is.
            load = sample if smoothed is None else smooth_load(smoothed, sample)
            smoothed = load
            if not load_changed(self._own.load, load):
                continue
            apps_changed = load.active_apps != self._own.load.active_apps
            if budget.take(time.monotonic()) or apps_changed:
                self.update_own(load=load)

    def update_own(self, **changes: Any) -> None:
        """Announce a change of this node's own details (load, capabilities)."""
        self._own = sign_node_info(
            self.identity, replace(self._own, sequence=self._own.sequence + 1, **changes)
        )
        self.table.apply_info(self._own, time.time())
        self._broadcast_own()

    def _notify_change(self, member: Member, change: Change) -> None:
        try:
            self.on_change(member, change)
        except Exception:  # noqa: BLE001 - a listener failure must not stop membership
            logger.exception("membership listener failed node=%s change=%s", member.node_id, change.value)

    def _forget_old_members(self) -> None:
        cutoff = time.time() - self.config.forget_after_seconds
        for member in self.table.forget_older_than(cutoff):
            logger.info("forgot member node=%s status=%s", member.node_id, member.status.value)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass
