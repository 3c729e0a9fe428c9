"""Choosing nodes for new instances of an app.

A node is a candidate when it offers app deployment and has at least as many cores as
the app's CPU limit. Its gossiped free memory must also cover the app's memory
request, after subtracting what this placement already put on it. Among candidates, a node
with fewer instances of the app wins (replicas spread across nodes before any node
gets a second one), then a node whose idle CPU covers the request, then the less
loaded node. Idle CPU is a preference rather than a condition: the CPU figure is a
moving average of the whole machine, and a short burst must not refuse a deployment.
"""

from dataclasses import dataclass, field

BYTES_PER_MIB = 1024 * 1024
# Weight of one running app in the load score, next to CPU and memory fractions.
ACTIVE_APP_WEIGHT = 0.05


@dataclass
class NodeCapacity:
    """The figures placement uses for one node: room left, load, and this app's instances."""

    node_id: str
    memory_free_bytes: int
    cpu_free_cores: float
    cpu_cores: int
    cpu_percent: float
    memory_percent: float
    active_apps: int
    app_instances: int = 0
    excluded: bool = False
    placed: int = field(default=0)

    def score(self) -> float:
        return (
            self.cpu_percent / 100
            + self.memory_percent / 100
            + ACTIVE_APP_WEIGHT * (self.active_apps + self.placed)
        )


@dataclass(frozen=True)
class PlacementShortfall:
    """The reason an app did not fit: what one instance requests and the most any node offers."""

    placed: int
    wanted: int
    memory_asked_bytes: int | None
    cpu_asked: float | None
    best_node_id: str | None
    best_memory_free_bytes: int
    best_cpu_free_cores: float
    best_cpu_cores: int
    candidates: int

    def describe(self) -> str:
        asked = []
        if self.memory_asked_bytes is not None:
            asked.append(f"{self.memory_asked_bytes // BYTES_PER_MIB} MiB of memory")
        if self.cpu_asked is not None:
            asked.append(f"{self.cpu_asked:g} CPU")
        if self.candidates == 0:
            return "no node that offers app deployment is online"
        best = (
            f"the roomiest node {self.best_node_id} has "
            f"{self.best_memory_free_bytes // BYTES_PER_MIB} MiB free and {self.best_cpu_cores} cores"
        )
        return (
            f"placed {self.placed} of {self.wanted} instances; each asks "
            f"{' and '.join(asked) or 'no reserved resources'}; {best}"
        )

    def details(self) -> dict:
        return {
            "instances_wanted": self.wanted,
            "instances_placeable": self.placed,
            "memory_asked_mb": None
            if self.memory_asked_bytes is None
            else round(self.memory_asked_bytes / BYTES_PER_MIB, 1),
            "cpu_asked": self.cpu_asked,
            "best_node_id": self.best_node_id,
            "best_node_memory_free_mb": self.best_memory_free_bytes // BYTES_PER_MIB,
            "best_node_cpu_free": round(self.best_cpu_free_cores, 2),
            "best_node_cpu_cores": self.best_cpu_cores,
            "candidate_nodes": self.candidates,
        }


class PlacementError(Exception):
    def __init__(self, shortfall: PlacementShortfall):
        super().__init__(shortfall.describe())
        self.shortfall = shortfall


def _fits(node: NodeCapacity, memory_bytes: int | None, cpu: float | None) -> bool:
    if node.excluded:
        return False
    if memory_bytes is not None and node.memory_free_bytes < memory_bytes:
        return False
    return cpu is None or node.cpu_cores >= cpu


def _cpu_short(node: NodeCapacity, cpu: float | None) -> bool:
    return cpu is not None and node.cpu_free_cores < cpu


def place(
    nodes: list[NodeCapacity], count: int, memory_bytes: int | None, cpu: float | None
) -> list[str]:
    """Return a node id for each of `count` new instances, or raise PlacementError.

    The capacities in `nodes` are reduced by what is placed, so the caller can see
    what remains. Nothing is placed unless every instance fits.
    """
    chosen: list[str] = []
    for _ in range(count):
        fitting = [node for node in nodes if _fits(node, memory_bytes, cpu)]
        if not fitting:
            raise PlacementError(_shortfall(nodes, len(chosen), count, memory_bytes, cpu))
        best = min(
            fitting, key=lambda n: (n.app_instances, _cpu_short(n, cpu), n.score(), n.node_id)
        )
        best.app_instances += 1
        best.placed += 1
        if memory_bytes is not None:
            best.memory_free_bytes -= memory_bytes
        if cpu is not None:
            best.cpu_free_cores -= cpu
        chosen.append(best.node_id)
    return chosen


def _shortfall(
    nodes: list[NodeCapacity], placed: int, wanted: int, memory_bytes: int | None, cpu: float | None
) -> PlacementShortfall:
    usable = [node for node in nodes if not node.excluded]
    best = max(usable, key=lambda n: (n.memory_free_bytes, n.cpu_cores), default=None)
    return PlacementShortfall(
        placed=placed,
        wanted=wanted,
        memory_asked_bytes=memory_bytes,
        cpu_asked=cpu,
        best_node_id=best.node_id if best else None,
        best_memory_free_bytes=best.memory_free_bytes if best else 0,
        best_cpu_free_cores=best.cpu_free_cores if best else 0.0,
        best_cpu_cores=best.cpu_cores if best else 0,
        candidates=len(usable),
    )


def choose_extras(instances: dict[str, str], count: int, load_of: dict[str, float]) -> list[str]:
    """Pick `count` instance ids to remove, from the nodes that hold the most of them.

    `instances` maps instance id to node id; ties go to the more loaded node.
    """
    remaining = dict(instances)
    removed: list[str] = []
    for _ in range(min(count, len(remaining))):
        per_node: dict[str, int] = {}
        for node_id in remaining.values():
            per_node[node_id] = per_node.get(node_id, 0) + 1
        node_id = max(per_node, key=lambda n: (per_node[n], load_of.get(n, 0.0), n))
        instance_id = max(i for i, n in remaining.items() if n == node_id)
        removed.append(instance_id)
        del remaining[instance_id]
    return removed
