"""Fault plans and the runner that applies them to a devnet, then checks the invariants.

A `FaultPlan` is a named list of `Step`s. `ChaosRunner.run(plan)` applies the steps in
order, then settles the network (thaws, heals, frees disks, resets clocks, restarts
killed nodes), measures how long membership views and replica counts take to recover,
and checks the invariants of `invariants`. The outcome is a `PlanResult`; the runner
also adds it to a `ChaosReport`, which the chaos conftest prints at the end of the run.

Step actions (the `args` each takes):

- `write` (count, ttl, replicas, writers): store `count` new keys through the given
  node indexes, or through random reachable nodes.
- `overwrite` (writers): store a new value for every key this plan wrote.
- `short_ttl` (count, ttl): store keys that expire soon.
- `kill`, `freeze`, `thaw`, `restart` (node): SIGKILL, SIGSTOP, SIGCONT, or SIGTERM
  and start again. `node` is an index, or "holder" for a node holding a key of the plan.
- `partition` (groups: two lists of indexes), `heal`. `heal` also lifts loss and delay.
- `loss` (nodes, probability): drop that share of the UDP packets between each of
  `nodes` and every other node, both ways.
- `delay` (nodes, milliseconds, jitter_milliseconds): hold the UDP packets between each
  of `nodes` and every other node for that long plus a random 0..jitter.
- `watch_views` (seconds): read every node's member view twice a second and count
  the running nodes listed offline, a false verdict while no node is down or cut off.
- `engine_stop`, `engine_start`: SIGTERM the runner's `docker_engine` (a
  `docker_engine.PrivateDockerd` that a test sets), and start it again on the same data
  root. Settling starts a stopped engine.
- `skew` (node, seconds), `unskew` (node): restart the node with its wall clock off.
- `disk_full` (node), `disk_free` (node): move the node's data onto a tmpfs and fill it.
- `await_rereplication`: wait until the nodes that are up store every live key as
  many times as its replica count requires, and record the time since the last fault.
- `call` (function): call `function()`, for a test's own wait or check mid-plan.
- `sleep` (seconds).
"""

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from faults import FaultError, Partition, TmpfsDataDir, faketime_env
from helpers import wait_for
from invariants import (
    LedgerProblem,
    WriteLedger,
    check_expired_not_served,
    check_ledger,
    copies_held,
    member_view,
    routing_tables_complete,
    rss_bytes,
    under_replicated,
    views_converged,
)

logger = logging.getLogger(__name__)

CONVERGE_TIMEOUT_SECONDS = 45.0
REREPLICATION_TIMEOUT_SECONDS = 30.0
POLL_SECONDS = 0.25
STOP_TIMEOUT_SECONDS = 10.0
READY_TIMEOUT_SECONDS = 30.0
VIEW_SAMPLE_SECONDS = 0.5


@dataclass(frozen=True)
class Step:
    """One action of a plan; `args` are the keyword arguments of the action."""

    action: str
    args: dict[str, Any] = field(default_factory=dict)


def step(action: str, **args: Any) -> Step:
    return Step(action, args)


@dataclass(frozen=True)
class FaultPlan:
    """A named, ordered list of steps."""

    name: str
    steps: tuple[Step, ...]


@dataclass
class PlanResult:
    """What one plan did and which invariants it broke."""

    name: str
    faults: int = 0
    acknowledged: int = 0
    lost: list[LedgerProblem] = field(default_factory=list)
    expired_served: list = field(default_factory=list)
    under_replicated: list = field(default_factory=list)
    rereplication_seconds: float | None = None
    view_divergence_seconds: float | None = None
    views: Any = True
    routing: Any = True
    crashed: dict[int, int | None] = field(default_factory=dict)
    unclean_exits: dict[int, int | None] = field(default_factory=dict)
    superseded_by_clock: int = 0
    store_failures: list[tuple[int, int, str]] = field(default_factory=list)
    packets_lost: int = 0
    packets_delayed: int = 0
    # (observer index, subject index) of each view sample that listed a running node offline.
    false_offline: list[tuple[int, int]] = field(default_factory=list)
    view_samples: int = 0
    duration_seconds: float = 0.0


@dataclass
class ChaosReport:
    """Figures of a whole chaos run, printed at the end of the pytest session."""

    plans: list[str] = field(default_factory=list)
    faults_injected: int = 0
    writes_acknowledged: int = 0
    writes_lost: int = 0
    expired_served: int = 0
    superseded_by_clock: int = 0
    max_rereplication_seconds: float = 0.0
    max_reschedule_seconds: float = 0.0
    max_view_divergence_seconds: float = 0.0
    max_rss_growth_bytes: int = 0
    packets_lost: int = 0
    packets_delayed: int = 0
    false_offline: int = 0
    view_samples: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, result: PlanResult) -> None:
        self.plans.append(result.name)
        self.faults_injected += result.faults
        self.writes_acknowledged += result.acknowledged
        self.writes_lost += len(result.lost)
        self.expired_served += len(result.expired_served)
        self.superseded_by_clock += result.superseded_by_clock
        self.packets_lost += result.packets_lost
        self.packets_delayed += result.packets_delayed
        self.false_offline += len(result.false_offline)
        self.view_samples += result.view_samples
        if result.rereplication_seconds is not None:
            self.max_rereplication_seconds = max(self.max_rereplication_seconds, result.rereplication_seconds)
        if result.view_divergence_seconds is not None:
            self.max_view_divergence_seconds = max(self.max_view_divergence_seconds, result.view_divergence_seconds)

    def lines(self) -> list[str]:
        return [
            f"plans run: {len(self.plans)} ({', '.join(self.plans) or 'none'})",
            f"faults injected: {self.faults_injected}",
            f"writes acknowledged (>= 2 replicas): {self.writes_acknowledged}, lost: {self.writes_lost}",
            f"acknowledged writes superseded by a writer's clock running ahead: {self.superseded_by_clock}",
            f"expired values served: {self.expired_served}",
            f"max time to re-replicate: {self.max_rereplication_seconds:.1f} s",
            f"max time to reschedule app instances: {self.max_reschedule_seconds:.1f} s",
            f"max member-view divergence: {self.max_view_divergence_seconds:.1f} s",
            f"max RSS growth of a node: {self.max_rss_growth_bytes / 2**20:.1f} MiB",
            f"UDP packets dropped by loss rules: {self.packets_lost}, held by delay rules: {self.packets_delayed}",
            f"running nodes listed offline under loss or delay: {self.false_offline}"
            f" in {self.view_samples} view samples",
            *self.notes,
        ]


class ChaosRunner:
    """Applies fault plans to one started devnet and keeps the write ledger across plans."""

    def __init__(self, network, report: ChaosReport, seed: int, partition: Partition | None = None) -> None:
        self.network = network
        self.report = report
        self.rng = random.Random(seed)
        self.partition = partition or Partition()
        self.ledger = WriteLedger()
        self.node_ids = {node.index: node.fetch_node_id() for node in network.nodes}
        self.clock_offsets: dict[int, int] = {}
        self.killed: set[int] = set()
        self.frozen: set[int] = set()
        self.disks: dict[int, TmpfsDataDir] = {}
        # A PrivateDockerd that the engine_stop and engine_start steps act on.
        self.docker_engine = None
        self.unclean_exits: dict[int, int | None] = {}
        self.last_fault_at = time.monotonic()
        self._result: PlanResult | None = None
        self._plan_keys: list[str] = []
        self._key_counter = 0

    # -- nodes ---------------------------------------------------------------------

    @property
    def nodes(self) -> list:
        return self.network.nodes

    def node(self, index: int):
        return self.nodes[index]

    def reachable(self) -> list:
        """Nodes that run and are not frozen."""
        return [node for node in self.nodes if node.index not in self.killed and node.index not in self.frozen]

    def _stop_node(self, index: int) -> None:
        code = self.node(index).stop(STOP_TIMEOUT_SECONDS)
        if code != 0:
            self.unclean_exits[index] = code

    def _start_node(self, index: int) -> None:
        node = self.node(index)
        node.start()
        node.wait_ready(READY_TIMEOUT_SECONDS)

    def restart_node(self, index: int, env: dict[str, str] | None) -> int | None:
        """Stop a node with SIGTERM and start it with the environment overrides `env`.

        Returns the exit code of the stop. Outside a plan, for a test's own setup.
        """
        node = self.node(index)
        code = node.stop(STOP_TIMEOUT_SECONDS)
        node.env = env
        self._start_node(index)
        return code

    # -- plans ---------------------------------------------------------------------

    def run(self, plan: FaultPlan) -> PlanResult:
        """Apply every step of `plan`, settle, check the invariants; always settle on error."""
        started = time.monotonic()
        self._result = PlanResult(plan.name)
        self._plan_keys = []
        self.unclean_exits = {}
        acknowledged_before = self.ledger.acknowledged
        superseded_before = self.ledger.superseded_by_clock()
        failures_before = len(self.ledger.failures)
        logger.info("chaos plan %s: %d steps", plan.name, len(plan.steps))
        try:
            for action in plan.steps:
                getattr(self, f"_do_{action.action}")(**action.args)
        finally:
            self.settle()
        result = self._result
        self._check(result)
        result.acknowledged = self.ledger.acknowledged - acknowledged_before
        result.superseded_by_clock = self.ledger.superseded_by_clock() - superseded_before
        result.unclean_exits = dict(self.unclean_exits)
        result.store_failures = self.ledger.failures[failures_before:]
        result.duration_seconds = time.monotonic() - started
        self.report.add(result)
        return result

    def settle(self) -> None:
        """Undo every fault still active, so the network can recover."""
        for index in sorted(self.frozen):
            self._do_thaw(index)
        self._heal_network()
        if self.docker_engine is not None and not self.docker_engine.running:
            self.docker_engine.start()
        for index in sorted(self.disks):
            self._do_disk_free(index)
        for index in sorted(self.clock_offsets):
            self._do_unskew(index)
        for index in sorted(self.killed):
            self._start_node(index)
        self.killed.clear()
        self.last_settled_at = time.monotonic()

    def _check(self, result: PlanResult) -> None:
        nodes = self.nodes
        result.crashed = {node.index: node.returncode for node in nodes if not node.is_running()}

        # Membership first: reads and repairs go to the members a node lists.
        ids = set(self.node_ids.values())
        outcome = wait_for(lambda: views_converged(nodes, ids), CONVERGE_TIMEOUT_SECONDS, POLL_SECONDS)
        result.views = outcome
        if outcome is True:
            result.view_divergence_seconds = time.monotonic() - self.last_settled_at
        # Lookups follow the routing tables, so each must again contain every other node.
        result.routing = wait_for(lambda: routing_tables_complete(nodes), CONVERGE_TIMEOUT_SECONDS, POLL_SECONDS)

        outcome = wait_for(lambda: not under_replicated(self.ledger, nodes), REREPLICATION_TIMEOUT_SECONDS, POLL_SECONDS)
        if outcome is True:
            result.rereplication_seconds = max(result.rereplication_seconds or 0.0, time.monotonic() - self.last_settled_at)
        result.under_replicated = under_replicated(self.ledger, nodes)

        result.lost = check_ledger(self.ledger, nodes)
        result.expired_served = check_expired_not_served(self.ledger, nodes)

    # -- workload steps --------------------------------------------------------------

    def _new_key(self, prefix: str) -> str:
        self._key_counter += 1
        return f"chaos-{prefix}-{self._key_counter}"

    def _writer(self, writers: list[int] | None):
        candidates = [node for node in self.reachable() if writers is None or node.index in writers]
        if not candidates:
            raise FaultError(f"no reachable writer among {writers}")
        return self.rng.choice(candidates)

    def _store(self, node, key: str, value: Any, ttl: int, replicas: int) -> None:
        offset = self.clock_offsets.get(node.index, 0)
        self.ledger.store(node, key, value, ttl=ttl, replicas=replicas, clock_offset_s=offset)

    def _do_write(self, count: int, ttl: int = 600, replicas: int = 3, writers: list[int] | None = None) -> None:
        for _ in range(count):
            key = self._new_key(self._result.name)
            writer = self._writer(writers)
            self._store(writer, key, {"plan": self._result.name, "n": self._key_counter, "by": writer.index}, ttl, replicas)
            self._plan_keys.append(key)

    def _do_overwrite(self, writers: list[int] | None = None, replicas: int = 3) -> None:
        # Same-key writes must be over a second apart for the ledger to order them.
        time.sleep(1.1)
        for key in self._plan_keys:
            writer = self._writer(writers)
            self._store(writer, key, {"plan": self._result.name, "rewritten_by": writer.index, "at": time.time()}, 600, replicas)

    def _do_short_ttl(self, count: int, ttl: int = 2, replicas: int = 3) -> None:
        for _ in range(count):
            key = self._new_key(self._result.name + "-short")
            writer = self._writer(None)
            self._store(writer, key, {"short": True}, ttl, replicas)

    def _do_sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def _do_call(self, function) -> None:
        function()

    # -- process faults ---------------------------------------------------------------

    def _resolve(self, node: int | str) -> int:
        if node != "holder":
            return int(node)
        # A node holding a copy of one of this plan's keys, not node 0 (everyone's bootstrap).
        for key in self._plan_keys:
            holders = [n.index for n in self.reachable() if n.index != 0 and copies_held([n], key)]
            if holders:
                return self.rng.choice(holders)
        return self.rng.choice([n.index for n in self.reachable() if n.index != 0])

    def _fault(self) -> None:
        self._result.faults += 1
        self.last_fault_at = time.monotonic()

    def _do_kill(self, node: int | str) -> None:
        index = self._resolve(node)
        self.node(index).kill()
        self.killed.add(index)
        self._fault()

    def _do_freeze(self, node: int | str) -> None:
        index = self._resolve(node)
        self.node(index).freeze()
        self.frozen.add(index)
        self._fault()

    def _do_thaw(self, node: int) -> None:
        self.node(node).thaw()
        self.frozen.discard(node)

    def _do_restart(self, node: int | str) -> None:
        index = self._resolve(node)
        self._stop_node(index)
        self._start_node(index)
        self._fault()

    def _do_partition(self, groups: list[list[int]]) -> None:
        first, second = groups
        self.partition.split([self.node(i).api_host for i in first], [self.node(i).api_host for i in second])
        self._fault()

    def _do_heal(self) -> None:
        self._heal_network()

    def _heal_network(self) -> None:
        """Lift partition, loss and delay, and add their packet counts to the plan's result."""
        counts = self.partition.packet_counts()
        delayed_before = self.partition.delayed_reported
        self.partition.heal()
        if self._result is not None:
            self._result.packets_lost += counts["lost"]
            # The rules count the packets sent to the queue, and the delay process counts
            # those it released. The larger count is kept.
            self._result.packets_delayed += max(counts["delayed"], self.partition.delayed_reported - delayed_before)

    def _others(self, indexes: list[int]) -> tuple[list[str], list[str]]:
        chosen = [self.node(i).api_host for i in indexes]
        others = [node.api_host for node in self.nodes if node.index not in indexes]
        return chosen, others

    def _do_loss(self, nodes: list[int], probability: float) -> None:
        chosen, others = self._others(nodes)
        self.partition.lose(chosen, others, probability)
        self._fault()

    def _do_delay(self, nodes: list[int], milliseconds: float, jitter_milliseconds: float = 0.0) -> None:
        chosen, others = self._others(nodes)
        self.partition.delay(chosen, others, milliseconds / 1000, jitter_milliseconds / 1000)
        self._fault()

    def _do_watch_views(self, seconds: float) -> None:
        index_by_id = {node_id: index for index, node_id in self.node_ids.items()}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            running = {node.index for node in self.reachable()}
            for observer in self.reachable():
                for node_id, status in member_view(observer).items():
                    subject = index_by_id.get(node_id)
                    if status == "offline" and subject in running:
                        self._result.false_offline.append((observer.index, subject))
                self._result.view_samples += 1
            time.sleep(VIEW_SAMPLE_SECONDS)

    def _do_engine_stop(self) -> None:
        self.docker_engine.stop(wait=False)
        self._fault()

    def _do_engine_start(self) -> None:
        self.docker_engine.start()

    def _do_skew(self, node: int, seconds: int) -> None:
        self._stop_node(node)
        self.node(node).env = faketime_env(seconds)
        self.clock_offsets[node] = seconds
        self._start_node(node)
        self._fault()

    def _do_unskew(self, node: int) -> None:
        self._stop_node(node)
        self.node(node).env = None
        self.clock_offsets.pop(node, None)
        self._start_node(node)

    def _do_disk_full(self, node: int) -> None:
        disk = TmpfsDataDir(self.node(node).data_dir)
        self._stop_node(node)
        try:
            disk.mount()
        finally:
            self._start_node(node)
        self.disks[node] = disk
        disk.fill()
        self._fault()

    def _do_disk_free(self, node: int) -> None:
        disk = self.disks.pop(node)
        self._stop_node(node)
        try:
            disk.unmount()
        finally:
            self._start_node(node)

    def _do_await_rereplication(self) -> None:
        live = self.reachable()
        outcome = wait_for(lambda: not under_replicated(self.ledger, live), REREPLICATION_TIMEOUT_SECONDS, POLL_SECONDS)
        if outcome is True:
            self._result.rereplication_seconds = time.monotonic() - self.last_fault_at

    # -- cleanup ---------------------------------------------------------------------

    def close(self) -> None:
        """Undo every fault and remove the iptables chain; safe after any failure."""
        with contextlib.suppress(Exception):
            self.settle()
        self.partition.remove()
        for disk in list(self.disks.values()):
            disk.unmount()


def sample_rss(network) -> dict[int, int]:
    """Return {node index: RSS bytes} of the running nodes."""
    return {node.index: rss_bytes(node) for node in network.nodes if node.is_running()}

