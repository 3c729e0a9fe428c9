"""Member announcements and the SWIM merge rules of the member table."""

from dataclasses import replace

import msgpack
import pytest

from voxanode.identity import Identity
from voxanode.membership.broadcasts import BroadcastQueue, transmit_limit
from voxanode.membership.state import (
    Change,
    InfoError,
    MemberStatus,
    MemberTable,
    NodeInfo,
    NodeLoad,
    decode_node_info,
    sign_node_info,
)
from voxanode.membership.swim import AnnouncementBudget, SwimConfig, suspicion_timeout


def announcement(identity, incarnation=10, sequence=0, leaving=False, cpu=1.0):
    info = NodeInfo(
        public_key=identity.public_key,
        incarnation=incarnation,
        sequence=sequence,
        peer_address=("127.0.0.5", 9999),
        api_address=("127.0.0.5", 9999),
        version="0.1.0",
        capabilities=("storage",),
        load=NodeLoad(cpu_percent=cpu, memory_percent=2.0, active_apps=0, memory_free_mb=100, cpu_free_cores=1.5),
        leaving=leaving,
    )
    return sign_node_info(identity, info)


@pytest.fixture
def peer():
    return Identity.generate()


@pytest.fixture
def table():
    return MemberTable(Identity.generate().dht_id)


def test_announcement_round_trip(peer):
    info = announcement(peer, cpu=42.5)
    decoded = decode_node_info(info.encoded)
    assert decoded == info
    assert decoded.node_id == peer.node_id
    assert decoded.load.cpu_percent == 42.5


@pytest.mark.parametrize("index, value", [(2, 11), (4, ["10.0.0.1", 1]), (8, [99, 2.0, 0, 100, 1.5]), (9, True)])
def test_announcement_tampered_rejected(peer, index, value):
    fields = msgpack.unpackb(announcement(peer).encoded, raw=False)
    fields[index] = value
    with pytest.raises(InfoError):
        decode_node_info(msgpack.packb(fields, use_bin_type=True))


@pytest.mark.parametrize("data", [b"", b"\xc1", msgpack.packb([1, 2]), bytes(5000)])
def test_announcement_garbage_rejected(data):
    with pytest.raises(InfoError):
        decode_node_info(data)


def test_table_join_update_and_old_announcement(table, peer):
    assert table.apply_info(announcement(peer), now=1.0) is Change.JOINED
    assert table.apply_info(announcement(peer, sequence=1, cpu=50), now=2.0) is Change.UPDATED
    assert table.apply_info(announcement(peer, sequence=0), now=3.0) is None
    assert table.get(peer.dht_id).info.load.cpu_percent == 50


def test_table_suspicion_needs_higher_incarnation_to_clear(table, peer):
    table.apply_info(announcement(peer), now=1.0)
    assert table.apply_suspect(peer.dht_id, 10, now=2.0) is Change.SUSPECTED
    # A load update at the same incarnation does not clear the suspicion.
    table.apply_info(announcement(peer, sequence=5), now=3.0)
    assert table.get(peer.dht_id).status is MemberStatus.SUSPECT
    table.apply_info(announcement(peer, incarnation=11), now=4.0)
    assert table.get(peer.dht_id).status is MemberStatus.ONLINE


def test_table_ignores_claims_about_older_incarnations(table, peer):
    table.apply_info(announcement(peer, incarnation=12), now=1.0)
    assert table.apply_suspect(peer.dht_id, 11, now=2.0) is None
    assert table.apply_dead(peer.dht_id, 11, now=2.0) is None
    assert table.get(peer.dht_id).status is MemberStatus.ONLINE


def test_table_dead_then_restart_rejoins(table, peer):
    table.apply_info(announcement(peer), now=1.0)
    assert table.apply_dead(peer.dht_id, 10, now=2.0) is Change.FAILED
    assert table.get(peer.dht_id).status is MemberStatus.OFFLINE
    assert table.apply_info(announcement(peer, incarnation=20), now=3.0) is Change.REJOINED


def test_table_leave_is_left_not_failed(table, peer):
    table.apply_info(announcement(peer), now=1.0)
    assert table.apply_info(announcement(peer, sequence=1, leaving=True), now=2.0) is Change.LEFT
    assert table.get(peer.dht_id).status is MemberStatus.LEFT
    assert table.apply_dead(peer.dht_id, 10, now=3.0) is None


def test_table_forgets_old_offline_members(table, peer):
    table.apply_info(announcement(peer), now=1.0)
    table.apply_dead(peer.dht_id, 10, now=2.0)
    assert table.forget_older_than(1.5) == []
    assert [m.node_id for m in table.forget_older_than(3.0)] == [peer.node_id]
    assert table.get(peer.dht_id) is None


@pytest.mark.parametrize("members, expected", [(1, 4), (9, 4), (10, 8), (99, 8), (100, 12), (1000, 16)])
def test_transmit_limit_grows_with_log(members, expected):
    assert transmit_limit(4, members) == expected


def test_broadcast_queue_limits_and_replaces():
    queue = BroadcastQueue(retransmit_mult=1)
    queue.add(b"a", ["first"], 10)
    queue.add(b"a", ["second"], 10)
    queue.add(b"b", ["other"], 2000)
    assert len(queue) == 2
    # With 5 members each update is sent once; the byte budget leaves "other" for later.
    assert queue.take(member_count=5, max_entries=10, max_bytes=100) == [["second"]]
    assert queue.take(member_count=5, max_entries=10, max_bytes=3000) == [["other"]]
    assert len(queue) == 0


def test_broadcast_queue_sends_least_sent_first():
    queue = BroadcastQueue(retransmit_mult=4)
    queue.add(b"a", ["a"], 1)
    assert queue.take(5, 1, 100) == [["a"]]
    queue.add(b"b", ["b"], 1)
    assert queue.take(5, 1, 100) == [["b"]]
    # Equal counts: the newer update goes first.
    assert queue.take(5, 2, 100) == [["b"], ["a"]]


@pytest.mark.parametrize("members, seconds", [(1, 4.0), (8, 4.0), (100, 8.0), (1000, 12.0)])
def test_suspicion_timeout_scales_with_log10(members, seconds):
    assert suspicion_timeout(SwimConfig(), members) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "current, expected",
    [
        (NodeLoad(cpu_percent=24.0, memory_percent=2.0), False),
        (NodeLoad(cpu_percent=25.0, memory_percent=2.0), True),
        (NodeLoad(cpu_percent=5.0, memory_percent=6.9), False),
        (NodeLoad(cpu_percent=5.0, memory_percent=7.0), True),
        (NodeLoad(cpu_percent=5.0, memory_percent=2.0, active_apps=1), True),
    ],
)
def test_load_changed_thresholds(current, expected):
    from voxanode.membership.swim import load_changed

    announced = NodeLoad(cpu_percent=5.0, memory_percent=2.0)
    assert load_changed(announced, current) is expected


def test_smooth_load_damps_cpu_spikes():
    from voxanode.membership.swim import smooth_load

    previous = NodeLoad(cpu_percent=10.0, memory_percent=2.0)
    spike = NodeLoad(cpu_percent=30.0, memory_percent=3.0, active_apps=1)
    smoothed = smooth_load(previous, spike)
    assert smoothed.cpu_percent == pytest.approx(20.0)
    assert smoothed.memory_percent == 3.0
    assert smoothed.active_apps == 1


def test_broadcast_queue_transmit_limit():
    queue = BroadcastQueue(retransmit_mult=4)
    queue.add(b"load", ["load"], 1)
    # 30 members: ceil(log10(31)) = 2, so 4 * 2 = 8 sends.
    assert [queue.take(30, 1, 100) for _ in range(9)] == [[["load"]]] * 8 + [[]]


def test_announcement_budget_burst_then_refill():
    budget = AnnouncementBudget(burst=3, refill_seconds=10.0, now=100.0)
    assert [budget.take(100.0 + i * 0.5) for i in range(4)] == [True, True, True, False]
    # The budget regains a tenth of an announcement per second.
    assert budget.take(103.0) is False
    assert budget.take(111.5) is True
    assert budget.take(111.6) is False
    # A long quiet spell refills the budget to the burst size and no further.
    assert [budget.take(500.0) for _ in range(4)] == [True, True, True, False]
