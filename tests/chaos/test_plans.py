"""Data and membership under faults: each plan runs on the shared 5-node network.

After each plan settles, these must hold:
- every durable acknowledged write reads back as its newest version;
- no expired value is served;
- every node lists every other as online, and its DHT routing table contains them all;
- every live key has its replica count of copies;
- no node has crashed, and every node the plan stopped exited with code 0.

The CI set is fixed and seeded; `--chaos-long` adds plans and repeats them in rounds.
"""

import pytest

from harness import FaultPlan, sample_rss, step

# Growth of a node's resident memory over the whole chaos run. A restarted node starts
# from scratch, so the bound is checked against the node's first process.
RSS_GROWTH_BOUND_BYTES = 64 * 2**20
LONG_ROUNDS = 3

CI_PLANS = (
    FaultPlan(
        "kill-holder",
        (
            step("write", count=6),
            step("short_ttl", count=3),
            step("kill", node="holder"),
            step("write", count=4),
            step("await_rereplication"),
        ),
    ),
    FaultPlan(
        "freeze-restart",
        (
            step("write", count=4),
            step("freeze", node=3),
            step("write", count=4),
            step("sleep", seconds=6),
            step("thaw", node=3),
            step("restart", node=1),
        ),
    ),
    FaultPlan(
        "partition-heal",
        (
            step("write", count=6),
            step("partition", groups=[[0, 1], [2, 3, 4]]),
            step("write", count=3, replicas=2, writers=[0, 1]),
            step("write", count=3, writers=[2, 3, 4]),
            step("overwrite", writers=[2, 3, 4]),
            # Longer than probe, suspicion and gossip: each side lists the other offline.
            step("sleep", seconds=8),
            step("heal"),
        ),
    ),
    FaultPlan(
        "clock-ahead",
        (
            step("skew", node=4, seconds=10),
            step("write", count=3, writers=[4]),
            step("overwrite", writers=[0, 1, 2, 3]),
            step("write", count=3, writers=[0, 1, 2, 3]),
        ),
    ),
    FaultPlan(
        "disk-full",
        (
            step("disk_full", node=2),
            step("write", count=6, writers=[0, 1, 3, 4]),
            step("write", count=2, writers=[2]),
            step("disk_free", node=2),
            step("write", count=2, writers=[2]),
        ),
    ),
    FaultPlan(
        "loss-and-delay",
        (
            step("write", count=3),
            # Probes, acks, gossip and DHT RPCs of node 3 each get through with p = 0.75.
            step("loss", nodes=[3], probability=0.25),
            # Up to 250 ms each way: within the 0.5 s probe timeout and the 1 s RPC timeout.
            step("delay", nodes=[1], milliseconds=150, jitter_milliseconds=100),
            step("write", count=3),
            step("overwrite"),
            step("watch_views", seconds=4),
            step("heal"),
        ),
    ),
)

LONG_PLANS = (
    FaultPlan(
        "kill-two",
        (
            step("write", count=10),
            step("kill", node=3),
            step("kill", node=4),
            step("write", count=6, writers=[0, 1, 2]),
            step("await_rereplication"),
        ),
    ),
    FaultPlan(
        "partition-both-sides-write",
        (
            step("write", count=8),
            step("partition", groups=[[0, 1, 2], [3, 4]]),
            step("overwrite", writers=[3, 4]),
            step("overwrite", writers=[0, 1, 2]),
            step("sleep", seconds=10),
            step("heal"),
        ),
    ),
    FaultPlan(
        "clock-behind",
        (
            step("write", count=4, writers=[0, 1]),
            step("skew", node=3, seconds=-10),
            step("overwrite", writers=[3]),
            step("write", count=4, writers=[3]),
        ),
    ),
    FaultPlan(
        "freeze-long",
        (
            step("write", count=6),
            step("freeze", node=2),
            step("sleep", seconds=15),
            step("write", count=6, writers=[0, 1, 3, 4]),
        ),
    ),
    FaultPlan(
        "packet-loss-two",
        (
            step("write", count=6),
            step("loss", nodes=[2, 4], probability=0.3),
            step("write", count=8),
            step("overwrite"),
            step("watch_views", seconds=12),
            step("heal"),
        ),
    ),
    FaultPlan(
        "packet-delay-slow",
        (
            # Up to 600 ms each way: direct probes and single RPCs of node 0 time out.
            step("delay", nodes=[0], milliseconds=400, jitter_milliseconds=200),
            step("write", count=6),
            step("overwrite"),
            step("watch_views", seconds=10),
            step("heal"),
        ),
    ),
    FaultPlan(
        "lossy-node-and-kill",
        (
            step("write", count=4),
            step("loss", nodes=[1], probability=0.2),
            step("delay", nodes=[1], milliseconds=100, jitter_milliseconds=50),
            step("kill", node=4),
            step("write", count=6, writers=[0, 2, 3]),
            step("watch_views", seconds=6),
            step("heal"),
            step("await_rereplication"),
        ),
    ),
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "plan" not in metafunc.fixturenames:
        return
    plans = list(CI_PLANS)
    if metafunc.config.getoption("--chaos-long", default=False):
        plans = [*CI_PLANS, *LONG_PLANS] * LONG_ROUNDS
    ids = [f"{plan.name}-{number}" for number, plan in enumerate(plans)]
    metafunc.parametrize("plan", plans, ids=ids)


def test_plan_keeps_invariants(runner, plan):
    result = runner.run(plan)

    assert result.faults > 0
    assert result.crashed == {}, f"nodes exited during {plan.name}: {result.crashed}"
    assert result.unclean_exits == {}, f"stopped nodes exited with non-zero codes: {result.unclean_exits}"
    assert result.views is True, f"member views did not converge: {result.views}"
    assert result.routing is True, f"routing tables lack online nodes (peers by node): {result.routing}"
    assert result.lost == [], f"acknowledged writes lost or stale: {result.lost}"
    assert result.expired_served == [], f"expired values served: {result.expired_served}"
    assert result.under_replicated == [], f"keys below their replica count: {result.under_replicated}"
    # A store may fail while the network is split, but never with an internal error.
    assert [failure for failure in result.store_failures if failure[1] == 500] == [], result.store_failures


def test_node_memory_stays_bounded(chaos_network, report):
    after = sample_rss(chaos_network)
    growth = {index: after[index] - chaos_network.rss_baseline[index] for index in after}
    report.max_rss_growth_bytes = max(report.max_rss_growth_bytes, *growth.values())
    assert len(after) == len(chaos_network.nodes)
    for index, grown in growth.items():
        assert grown < RSS_GROWTH_BOUND_BYTES, f"node {index} grew by {grown / 2**20:.1f} MiB"
