"""Choosing an instance per request: strategies, circuit breakers and each app's rotation.

An app's `Rotation` contains one `Backend` per instance that may take traffic: running,
healthy, on a node that membership reports online. `pick()` returns one of them by the
app's strategy, skipping backends whose circuit is open:

- `round_robin`: each backend in turn;
- `least_connections`: the backend with the fewest requests in flight, ties in turn;
- `latency`: the lowest cost, where cost is the EWMA of the time to the response
  headers times (requests in flight + 1), so a slow or busy backend gets less. A
  backend not yet measured costs 0, so each one gets measured first.

Each backend has a `CircuitBreaker`: after `failure_threshold` failures in a row it
opens, and the backend gets no requests for `cooldown_seconds`. Then one trial
request is let through (half-open): its success closes the circuit, its failure opens
it for another cool-down. The proxy decides what a failure is (see
`voxanode.ingress.proxy`) and tells the breaker whether the instance replied.

When no backend may take a request, `pick()` falls back to panic routing: the
backends whose circuit opened on a reply (a 502, 503 or 504 from the instance) take
traffic again, by the same strategy, so that the client gets the app's own reply
instead of the proxy's 503. Backends whose last failure was a failed connection or a
timeout stay out until their cool-down ends.

Everything here runs on the event loop's thread and takes no lock.
"""

import enum
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

STRATEGY_ROUND_ROBIN = "round_robin"
STRATEGY_LEAST_CONNECTIONS = "least_connections"
STRATEGY_LATENCY = "latency"
STRATEGIES = (STRATEGY_ROUND_ROBIN, STRATEGY_LEAST_CONNECTIONS, STRATEGY_LATENCY)
# Weight of the newest sample in the latency EWMA.
EWMA_NEW_SAMPLE_WEIGHT = 0.3
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive-failure circuit breaker of one backend."""

    __slots__ = (
        "failure_threshold",
        "cooldown_seconds",
        "clock",
        "failures",
        "state",
        "open_until",
        "trial_running",
        "last_failure_was_reply",
    )

    def __init__(self, failure_threshold: int, cooldown_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.failure_threshold = failure_threshold
        self.cooldown_seconds = cooldown_seconds
        self.clock = clock
        self.failures = 0
        self.state = CircuitState.CLOSED
        self.open_until = 0.0
        self.trial_running = False
        # Whether the latest failure was a reply of the instance (reachable, but
        # failing) rather than a failed connection or a timeout.
        self.last_failure_was_reply = False

    def allows(self) -> bool:
        """Return whether a request may go to the backend now (no state change)."""
        if self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN:
            return self.clock() >= self.open_until
        return not self.trial_running

    def acquire(self) -> None:
        """Note that a request goes to the backend; an expired open circuit turns half-open."""
        if self.state is CircuitState.OPEN and self.clock() >= self.open_until:
            self.state = CircuitState.HALF_OPEN
        if self.state is CircuitState.HALF_OPEN:
            self.trial_running = True

    def succeeded(self) -> bool:
        """Record a success; return True when this closed an open or half-open circuit."""
        self.failures = 0
        self.trial_running = False
        if self.state is not CircuitState.CLOSED:
            self.state = CircuitState.CLOSED
            return True
        return False

    def failed(self, reply: bool = False) -> bool:
        """Record a failure; return True when this opened the circuit.

        `reply` is True when the failure is a reply of the instance, such as a 503.
        """
        self.trial_running = False
        self.last_failure_was_reply = reply
        if self.state is CircuitState.HALF_OPEN:
            self._open()
            return True
        self.failures += 1
        if self.state is CircuitState.CLOSED and self.failures >= self.failure_threshold:
            self._open()
            return True
        return False

    def abandon(self) -> None:
        """Forget a request that ended without a result, such as a cancelled one."""
        self.trial_running = False

    def open_on_reply(self) -> bool:
        """Return whether the circuit is open or half-open after a failing reply."""
        return self.state is not CircuitState.CLOSED and self.last_failure_was_reply

    def _open(self) -> None:
        self.state = CircuitState.OPEN
        self.open_until = self.clock() + self.cooldown_seconds


@dataclass(frozen=True)
class Target:
    """The address at which one instance takes traffic."""

    instance_id: str
    node_id: str
    host: str
    port: int


class Backend:
    """One instance in a rotation, with its load and latency figures and circuit."""

    __slots__ = ("target", "base_url", "in_flight", "ewma_ms", "breaker")

    def __init__(self, target: Target, breaker: CircuitBreaker):
        self.target = target
        host = f"[{target.host}]" if ":" in target.host else target.host
        self.base_url = f"http://{host}:{target.port}"
        self.in_flight = 0
        self.ewma_ms = 0.0
        self.breaker = breaker

    @property
    def instance_id(self) -> str:
        return self.target.instance_id

    def observe_latency(self, milliseconds: float) -> None:
        if self.ewma_ms == 0.0:
            self.ewma_ms = milliseconds
        else:
            self.ewma_ms += EWMA_NEW_SAMPLE_WEIGHT * (milliseconds - self.ewma_ms)

    def cost(self) -> float:
        return self.ewma_ms * (self.in_flight + 1)


class Rotation:
    """The backends of one app on this node and the strategy that picks among them."""

    def __init__(self, app_id: str, strategy: str, failure_threshold: int, cooldown_seconds: float):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        self.app_id = app_id
        self.strategy = strategy
        self.failure_threshold = failure_threshold
        self.cooldown_seconds = cooldown_seconds
        self.backends: list[Backend] = []
        self._by_instance: dict[str, Backend] = {}
        self._turn = itertools.count()

    def update(self, targets: Iterable[Target]) -> tuple[list[Target], list[Target]]:
        """Make the backends match `targets`; return the (added, removed) targets.

        A backend whose instance stays keeps its figures and circuit; one whose address
        changed starts afresh.
        """
        wanted = {target.instance_id: target for target in targets}
        added, removed = [], []
        for instance_id, backend in list(self._by_instance.items()):
            if wanted.get(instance_id) != backend.target:
                removed.append(backend.target)
                del self._by_instance[instance_id]
        for instance_id, target in wanted.items():
            if instance_id not in self._by_instance:
                breaker = CircuitBreaker(self.failure_threshold, self.cooldown_seconds)
                self._by_instance[instance_id] = Backend(target, breaker)
                added.append(target)
        self.backends = sorted(self._by_instance.values(), key=lambda backend: backend.instance_id)
        return added, removed

    def pick(self, exclude: tuple[Backend, ...] = ()) -> Backend | None:
        """Return the backend for the next request, or None when none may take it.

        Backends whose circuit allows a request come first. When there are none, the
        backends whose circuit opened on a failing reply are picked (panic routing).
        """
        backend = self._pick_among(exclude, CircuitBreaker.allows)
        if backend is None:
            backend = self._pick_among(exclude, CircuitBreaker.open_on_reply)
        return backend

    def _pick_among(
        self, exclude: tuple[Backend, ...], eligible: Callable[[CircuitBreaker], bool]
    ) -> Backend | None:
        backends = self.backends
        count = len(backends)
        if count == 0:
            return None
        if self.strategy == STRATEGY_ROUND_ROBIN:
            start = next(self._turn)
            for offset in range(count):
                backend = backends[(start + offset) % count]
                if backend not in exclude and eligible(backend.breaker):
                    return backend
            return None
        candidates = [b for b in backends if b not in exclude and eligible(b.breaker)]
        if not candidates:
            return None
        if self.strategy == STRATEGY_LEAST_CONNECTIONS:
            fewest = min(b.in_flight for b in candidates)
            tied = [b for b in candidates if b.in_flight == fewest]
        else:
            lowest = min(b.cost() for b in candidates)
            tied = [b for b in candidates if b.cost() == lowest]
        return tied[next(self._turn) % len(tied)]
