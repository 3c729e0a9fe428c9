"""Simulated SWIM dissemination: gossip rounds until one update reaches every node.

One process, simulated time, no sockets. Each simulated node owns voxanode's real
BroadcastQueue (so each update is sent transmit_limit(retransmit_mult, N) times, least
sent first) and a real MemberTable (whose merge rules decide whether a received
announcement is news and gets queued again, as Membership._accept_info does). The
update is a real signed NodeInfo announcement, so the per-message byte limit applies
to its real encoded size.

A round is one gossip_interval. In each round every node with queued updates picks
gossip_fanout distinct random other members. It sends each one message built by
BroadcastQueue.take with swim.py's limits (MAX_PIGGYBACK_ENTRIES entries and
MAX_PIGGYBACK_BYTES bytes per message) and stops at the first empty take, as
Membership._gossip_loop does. Messages are delivered at the end of the round; the
receiver reads at most MAX_UPDATES_ACCEPTED entries of each, as Membership._heard_from
does. No message is lost. Not modelled: updates riding on probe pings and acks (one
probe per probe_interval, every 5 rounds with the default timings) and push-pull.
Each of them is one more delivery of the update, so the real protocol is expected to
spread it no slower. That expectation is not measured here.

For each N the simulation runs --runs times with seeds derived from --seed and prints
rounds until every node has the update (mean, p99, max), the runs in which the
update stopped spreading before reaching every node, and the messages sent, next to
log2(N), log10(N) and ln(N), with a least-squares fit of rounds = a + b * ln(N) and,
for contrast, of a straight line in N.

    python bench/gossip_sim.py [--sizes 10,30,100,300,1000] [--runs 500] [--seed 1] [--updates 1]
"""

import argparse
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from voxanode.identity import Identity
from voxanode.membership.broadcasts import UPDATE_ALIVE, BroadcastQueue, transmit_limit
from voxanode.membership.state import MemberTable, NodeInfo, NodeLoad, sign_node_info
from voxanode.membership.swim import (
    MAX_PIGGYBACK_BYTES,
    MAX_PIGGYBACK_ENTRIES,
    MAX_UPDATES_ACCEPTED,
    SwimConfig,
)

DEFAULT_SIZES = "10,30,100,300,1000"
DEFAULT_RUNS = 500
DEFAULT_SEED = 1
DEFAULT_UPDATES = 1
# Bound of the round loop. Each node empties its queue within about
# transmit_limit / gossip_fanout rounds of its last news, so real runs stop far below it.
MAX_ROUNDS = 1000
# Bytes that Membership adds to an announcement's size when it queues it.
ENTRY_OVERHEAD_BYTES = 8
DHT_ID_BYTES = 20


@dataclass
class RunResult:
    """One simulated dissemination."""

    rounds_to_all: int | None
    rounds_to_drain: int
    messages_to_all: int | None
    messages_total: int
    informed_nodes: int


@dataclass
class SizeResult:
    """Every run at one size N."""

    size: int
    runs: list[RunResult] = field(default_factory=list)

    @property
    def complete(self) -> list[RunResult]:
        return [run for run in self.runs if run.rounds_to_all is not None]

    def rounds(self) -> list[int]:
        return [run.rounds_to_all for run in self.complete]


def make_announcements(count: int, rng: random.Random) -> list[NodeInfo]:
    """Build `count` signed announcements of new nodes from keys drawn from `rng`."""
    announcements = []
    for number in range(count):
        identity = Identity(Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)))
        info = NodeInfo(
            public_key=identity.public_key,
            incarnation=1_700_000_000_000 + number,
            sequence=0,
            peer_address=(f"127.0.{number // 250}.{number % 250 + 1}", 9999),
            api_address=(f"127.0.{number // 250}.{number % 250 + 1}", 9999),
            version="0.1.0",
            capabilities=("storage",),
            load=NodeLoad(12.5, 40.0, 0, 8000, 1.5),
            leaving=False,
        )
        announcements.append(sign_node_info(identity, info))
    return announcements


def pick_targets(rng: random.Random, size: int, sender: int, fanout: int) -> list[int]:
    """Pick `fanout` distinct members other than `sender`, uniformly."""
    picks = rng.sample(range(size - 1), min(fanout, size - 1))
    return [pick + 1 if pick >= sender else pick for pick in picks]


def simulate(size: int, config: SwimConfig, announcements: list[NodeInfo], rng: random.Random) -> RunResult:
    """Spread every announcement from its own random first node until all queues are empty."""
    queues = [BroadcastQueue(config.retransmit_mult) for _ in range(size)]
    tables = [MemberTable(index.to_bytes(DHT_ID_BYTES, "big")) for index in range(size)]
    by_encoded = {info.encoded: info for info in announcements}
    informed = [0] * size
    complete_nodes = 0
    goal = len(announcements)

    def learn(node: int, info: NodeInfo, now: float) -> None:
        nonlocal complete_nodes
        if tables[node].apply_info(info, now) is None:
            return
        queues[node].add(info.dht_id, [UPDATE_ALIVE, info.encoded], len(info.encoded) + ENTRY_OVERHEAD_BYTES)
        informed[node] += 1
        if informed[node] == goal:
            complete_nodes += 1

    for info, first_node in zip(announcements, rng.sample(range(size), goal), strict=True):
        learn(first_node, info, 0.0)

    rounds = 0
    messages = 0
    rounds_to_all = messages_to_all = None
    active = {node for node in range(size) if len(queues[node])}
    while active and rounds < MAX_ROUNDS:
        rounds += 1

        # Every node with queued updates sends one message to each of gossip_fanout members.
        deliveries = []
        for sender in sorted(active):
            for target in pick_targets(rng, size, sender, config.gossip_fanout):
                updates = queues[sender].take(size, MAX_PIGGYBACK_ENTRIES, MAX_PIGGYBACK_BYTES)
                if not updates:
                    break
                messages += 1
                deliveries.append((target, updates))

        # Deliver at the end of the round; a receiver forwards from the next round on.
        for target, updates in deliveries:
            for _, encoded in updates[:MAX_UPDATES_ACCEPTED]:
                learn(target, by_encoded[encoded], float(rounds))

        active = {node for node in range(size) if len(queues[node])}
        if rounds_to_all is None and complete_nodes == size:
            rounds_to_all, messages_to_all = rounds, messages
    return RunResult(rounds_to_all, rounds, messages_to_all, messages, complete_nodes)


def run_size(size: int, runs: int, seed: int, updates: int, config: SwimConfig) -> SizeResult:
    result = SizeResult(size)
    for run in range(runs):
        # A string seed is hashed with SHA-512, so every (seed, N, run) gets its own stream.
        rng = random.Random(f"gossip-sim-{seed}-{size}-{run}")
        announcements = make_announcements(updates, rng)
        result.runs.append(simulate(size, config, announcements, rng))
    return result


# --- report ------------------------------------------------------------------------------


def percentile(values: Sequence[float], percent: int) -> float:
    if len(values) < 2:
        return float(values[0]) if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


def push_gossip_estimate(size: int, fanout: int) -> float:
    """Rounds that push gossip with `fanout` needs, by the usual estimate log_(f+1)(N) + ln(N)/f.

    The first term is the growth phase (informed nodes multiply by about f+1 per round),
    the second the end phase (the uninformed share shrinks by about e^-f per round).
    It is an estimate for unlimited retransmission, not a bound.
    """
    return math.log(size) / math.log(fanout + 1) + math.log(size) / fanout


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares fit y = a + b * x; return (a, b, R squared)."""
    slope, intercept = statistics.linear_regression(xs, ys)
    mean = statistics.fmean(ys)
    total = sum((y - mean) ** 2 for y in ys)
    residual = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    return intercept, slope, 1.0 - residual / total if total else 1.0


def print_report(results: list[SizeResult], args: argparse.Namespace, config: SwimConfig, elapsed: float) -> None:
    print(f"SWIM dissemination simulation: {args.runs} runs per N, seed {args.seed}, {args.updates} update(s) per run; "
          f"gossip_fanout {config.gossip_fanout}, retransmit_mult {config.retransmit_mult}, "
          f"{MAX_PIGGYBACK_ENTRIES} entries / {MAX_PIGGYBACK_BYTES} B per message, "
          f"round = gossip_interval {config.gossip_interval_seconds} s; Python {platform.python_version()}")
    header = (f"{'N':>5} {'limit':>5} {'log2N':>6} {'log10N':>6} {'lnN':>5} {'rounds':>7} {'p99':>5} {'max':>4} "
              f"{'r/lnN':>6} {'r/log2N':>7} {'est.':>5} {'stalled':>8} {'msgs to all':>11} {'msgs total':>10} {'per node':>8}")
    print(header)
    print("-" * len(header))
    for result in results:
        size = result.size
        rounds = result.rounds()
        stalled = len(result.runs) - len(rounds)
        mean_rounds = statistics.fmean(rounds) if rounds else float("nan")
        to_all = statistics.fmean([run.messages_to_all for run in result.complete]) if rounds else float("nan")
        total = statistics.fmean([run.messages_total for run in result.runs])
        print(f"{size:>5} {transmit_limit(config.retransmit_mult, size):>5} {math.log2(size):>6.2f} {math.log10(size):>6.2f} "
              f"{math.log(size):>5.2f} {mean_rounds:>7.2f} {percentile(rounds, 99):>5.1f} {max(rounds, default=0):>4} "
              f"{mean_rounds / math.log(size):>6.2f} {mean_rounds / math.log2(size):>7.2f} "
              f"{push_gossip_estimate(size, config.gossip_fanout):>5.1f} {stalled:>4}/{len(result.runs):<3} "
              f"{to_all:>11.0f} {total:>10.0f} {total / size:>8.1f}")

    print()
    print("rounds: mean over the runs that reached every node; p99 and max over the same runs; 1 round = "
          f"{config.gossip_interval_seconds} s. limit: transmit_limit(retransmit_mult, N). est.: log_(f+1)(N) + ln(N)/f. "
          "stalled: runs whose queues emptied before every node had the update (push-pull repairs those in the real protocol).")
    usable = [result for result in results if result.rounds()]
    if len(usable) >= 3:
        sizes = [result.size for result in usable]
        means = [statistics.fmean(result.rounds()) for result in usable]
        intercept, slope, r_squared = fit_line([math.log(size) for size in sizes], means)
        ratios = [mean / math.log(size) for size, mean in zip(sizes, means, strict=True)]
        print(f"fit: rounds = {intercept:.2f} + {slope:.2f} * ln(N), R^2 = {r_squared:.4f}; "
              f"rounds/ln(N) from {min(ratios):.2f} to {max(ratios):.2f} while N grows {sizes[-1] / sizes[0]:.0f}x "
              f"and ln(N) {math.log(sizes[-1]) / math.log(sizes[0]):.1f}x")
        _, _, linear_r_squared = fit_line(sizes, means)
        print(f"for contrast, a straight line in N (rounds = a + b * N) has R^2 = {linear_r_squared:.4f}")
        for size, mean in zip(sizes, means, strict=True):
            print(f"  N={size:>5}: mean {mean:6.2f} rounds, fit {intercept + slope * math.log(size):6.2f}, "
                  f"residual {mean - intercept - slope * math.log(size):+.2f}")
    print(f"simulated in {elapsed:.1f} s")


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 2 or sizes[-1] > 100_000:
        raise argparse.ArgumentTypeError(f"every size must be 2..100000, got {text!r}")
    return sizes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Simulate SWIM gossip dissemination with voxanode's broadcast queue.")
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES), help="member counts N, comma-separated (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="simulated disseminations per N (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="base seed; the same seed prints the same figures (default: %(default)s)")
    parser.add_argument("--updates", type=int, default=DEFAULT_UPDATES, help="announcements spread at once, each from its own first node (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 100_000:
        parser.error(f"--runs must be 1..100000, got {args.runs}")
    if not 1 <= args.updates <= min(args.sizes):
        parser.error(f"--updates must be 1..{min(args.sizes)} (the smallest N), got {args.updates}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = SwimConfig()
    started = time.perf_counter()
    results = [run_size(size, args.runs, args.seed, args.updates, config) for size in args.sizes]
    print_report(results, args, config, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
