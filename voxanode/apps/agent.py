"""The local agent: makes this node's containers match the instances assigned to it.

The catalogue lists the instances each node should run. `converge()` compares that
with the containers Docker keeps under this node's label: it starts assigned
instances that never ran here, adopts containers that already run (after a daemon
restart), marks instances whose container exited or vanished as failed (the
responsible node replaces them), and stops and removes containers of instances that
are no longer assigned here. The result is this node's `InstanceReport`, which the
controller spreads to the other nodes.

While the controller reports the Docker engine lost (`engine_lost()`), every instance
assigned here is reported failed with kind "engine_unavailable": the node can neither
see nor start its containers, so the responsible node replaces them elsewhere. Once
the engine answers again (`engine_regained()`), converging removes the containers of
instances that moved and adopts those still assigned.

Health checks (HTTP or TCP against the published host port) and Docker stats run in
their own loops and update the report in place.
"""

import asyncio
import logging
import time
from datetime import datetime
from collections.abc import Callable
from dataclasses import replace

import aiohttp

from voxanode.apps.catalogue import (
    INSTANCE_STOPPING,
    HEALTH_HEALTHY,
    HEALTH_STARTING,
    HEALTH_UNHEALTHY,
    INSTANCE_FAILED,
    INSTANCE_RUNNING,
    INSTANCE_STARTING,
    STATE_ACTIVE,
    AppRecord,
    Catalogue,
    InstanceReport,
    InstanceState,
)
from voxanode.apps.runtime import ContainerInfo, ContainerRequest, DockerRuntime, DockerRuntimeError, ErrorKind

logger = logging.getLogger(__name__)

RUNNING_STATES = ("running",)
EXITED_STATES = ("exited", "dead")


def _parse_docker_time(text: str | None) -> float | None:
    if not text or text.startswith("0001-"):
        return None
    # Docker gives nanoseconds; Python parses microseconds.
    trimmed = text.rstrip("Z")
    if "." in trimmed:
        head, fraction = trimmed.split(".", 1)
        trimmed = f"{head}.{fraction[:6]}"
    try:
        return datetime.fromisoformat(trimmed + "+00:00").timestamp()
    except ValueError:
        return None


class LocalAgent:
    """Runs the containers of the instances assigned to this node."""

    def __init__(
        self,
        node_id: str,
        catalogue: Catalogue,
        runtime: DockerRuntime,
        host_ip: str,
        on_report_changed: Callable[[], None],
    ):
        self.node_id = node_id
        self.catalogue = catalogue
        self.runtime = runtime
        self.host_ip = host_ip
        self.on_report_changed = on_report_changed
        self._lock = asyncio.Lock()
        held = catalogue.reports.get(node_id)
        self._states: dict[str, InstanceState] = dict(held.instances) if held else {}
        self._sequence = held.sequence if held else 0
        # Consecutive failed health checks and the time of the next check, per instance.
        self._health_failures: dict[str, int] = {}
        self._next_check: dict[str, float] = {}
        self._published_view: dict[str, tuple] = {}
        self._removing: set[str] = set()
        self._removals: set[asyncio.Task] = set()
        # Why the Docker engine is lost, while the controller reports it lost.
        self._engine_lost_reason: str | None = None

    # -- the report -------------------------------------------------------------------

    def report(self) -> InstanceReport:
        return InstanceReport(self.node_id, self._sequence, dict(self._states))

    def states_of(self, app_id: str) -> list[InstanceState]:
        return [s for s in self._states.values() if s.app_id == app_id]

    def running_count(self) -> int:
        return sum(1 for s in self._states.values() if s.status == INSTANCE_RUNNING)

    def active_app_count(self) -> int:
        """Return the number of apps with at least one running instance here."""
        return len({s.app_id for s in self._states.values() if s.status == INSTANCE_RUNNING})

    async def close(self) -> None:
        """Wait briefly for removals in progress; they continue in Docker if cut short."""
        if self._removals:
            await asyncio.wait(self._removals, timeout=2)

    def _commit(self, push: bool = True) -> None:
        """Store the report under a new sequence; tell the controller if states changed."""
        self._sequence = max(self._sequence + 1, int(time.time() * 1000))
        self.catalogue.merge_report(self.report())
        view = {iid: (s.status, s.health, s.error, tuple(sorted(s.host_ports.items())))
                for iid, s in self._states.items()}
        if push and view != self._published_view:
            self._published_view = view
            self.on_report_changed()

    # -- converging ------------------------------------------------------------------

    def _assigned(self) -> dict[str, AppRecord]:
        assigned = {}
        for record in self.catalogue.apps.values():
            if record.state != STATE_ACTIVE:
                continue
            for instance_id, node_id in record.assignments.items():
                if node_id == self.node_id:
                    assigned[instance_id] = record
        return assigned

    async def engine_lost(self, reason: str) -> None:
        """Report every instance assigned here failed until `engine_regained()`."""
        async with self._lock:
            self._engine_lost_reason = reason
            self._report_engine_unavailable()

    def engine_regained(self) -> None:
        self._engine_lost_reason = None

    def _report_engine_unavailable(self) -> None:
        """Report the assigned instances that have not failed yet as failed, with kind engine_unavailable."""
        error = f"the Docker engine of node {self.node_id} is not reachable: {self._engine_lost_reason}"
        marked = []
        for instance_id, record in self._assigned().items():
            held = self._states.get(instance_id)
            if held is not None and held.status == INSTANCE_FAILED:
                continue
            base = held or InstanceState(
                instance_id=instance_id, app_id=record.app_id, node_id=self.node_id,
                status=INSTANCE_FAILED, health=HEALTH_UNHEALTHY, created_at=time.time(),
            )
            self._states[instance_id] = replace(
                base, status=INSTANCE_FAILED, health=HEALTH_UNHEALTHY, error=error,
                error_kind=ErrorKind.ENGINE_UNAVAILABLE.value, exit_code=None,
            )
            marked.append(instance_id)
        if marked:
            logger.warning(
                "instances failed with the Docker engine node=%s instances=%s reason=%s",
                self.node_id, ",".join(sorted(marked)), self._engine_lost_reason,
            )
            self._commit()

    async def converge(self) -> None:
        """Start, adopt, mark failed and remove containers until they match the catalogue.

        Without an engine it only reports newly assigned instances failed, while the
        engine is reported lost.
        """
        if not self.runtime.available:
            if self._engine_lost_reason is not None and not self.runtime.closed:
                self._report_engine_unavailable()
            return
        async with self._lock:
            try:
                containers = {c.instance_id: c for c in await self.runtime.list_own()}
            except DockerRuntimeError as error:
                logger.warning("cannot list containers node=%s: %s", self.node_id, error.reason)
                return
            assigned = self._assigned()
            to_start = []
            for instance_id, record in assigned.items():
                container = containers.get(instance_id)
                held = self._states.get(instance_id)
                if container is not None:
                    self._adopt(record, container)
                elif held is None:
                    to_start.append((instance_id, record))
                elif held.status != INSTANCE_FAILED:
                    self._states[instance_id] = replace(
                        held, status=INSTANCE_FAILED, health=HEALTH_UNHEALTHY,
                        error="the container disappeared", error_kind="lost",
                    )
                    logger.warning(
                        "instance container disappeared node=%s app=%s instance=%s",
                        self.node_id, record.app_id, instance_id,
                    )
            if to_start:
                await asyncio.gather(*(self._start(iid, rec) for iid, rec in to_start))
            # Removals run on their own, so a graceful stop that waits out its timeout
            # holds up neither this pass nor the call that asked for it.
            for instance_id, container in containers.items():
                if instance_id not in assigned and instance_id not in self._removing:
                    self._removing.add(instance_id)
                    task = asyncio.get_running_loop().create_task(self._remove(instance_id, container))
                    self._removals.add(task)
                    task.add_done_callback(self._removals.discard)
            for instance_id in list(self._states):
                if instance_id not in assigned and instance_id not in containers:
                    del self._states[instance_id]
                elif instance_id not in assigned and self._states[instance_id].status != INSTANCE_STOPPING:
                    self._states[instance_id] = replace(self._states[instance_id], status=INSTANCE_STOPPING)
            self._commit()

    def _adopt(self, record: AppRecord, container: ContainerInfo) -> None:
        held = self._states.get(container.instance_id)
        started = _parse_docker_time(container.started_at)
        if container.state in RUNNING_STATES:
            status = INSTANCE_RUNNING
            if record.spec.health_check is None:
                health = HEALTH_HEALTHY
            else:
                health = held.health if held and held.status == INSTANCE_RUNNING else HEALTH_STARTING
            error = None
        elif container.state in EXITED_STATES:
            status, health = INSTANCE_FAILED, HEALTH_UNHEALTHY
            reason = "killed: out of memory" if container.oom_killed else f"exited with code {container.exit_code}"
            if container.error:
                reason += f": {container.error}"
            error = reason
            if held is None or held.status != INSTANCE_FAILED:
                logger.warning(
                    "instance stopped on its own node=%s app=%s instance=%s reason=%s",
                    self.node_id, record.app_id, container.instance_id, reason,
                )
        else:
            status, health, error = INSTANCE_STARTING, HEALTH_STARTING, None
        if held is None:
            logger.info(
                "adopted container node=%s app=%s instance=%s container=%s state=%s",
                self.node_id, record.app_id, container.instance_id, container.container_id[:12], container.state,
            )
        base = held or InstanceState(
            instance_id=container.instance_id,
            app_id=record.app_id,
            node_id=self.node_id,
            status=status,
            health=health,
            created_at=_parse_docker_time(container.created_at) or time.time(),
        )
        self._states[container.instance_id] = replace(
            base,
            status=status,
            health=health,
            error=error,
            error_kind="exited" if status == INSTANCE_FAILED else None,
            host_ip=self.host_ip,
            exit_code=container.exit_code if status == INSTANCE_FAILED else None,
            started_at=started,
            host_ports=dict(container.host_ports),
            container_id=container.container_id,
        )

    async def _start(self, instance_id: str, record: AppRecord) -> None:
        spec = record.spec
        request = ContainerRequest(
            app_id=record.app_id,
            app_name=record.name,
            instance_id=instance_id,
            image=spec.image,
            memory_bytes=spec.memory_bytes,
            cpu=spec.cpu,
            environment=dict(spec.environment),
            ports=[(port.container_port, port.protocol) for port in spec.ports],
            command=list(spec.command) if spec.command else None,
            capabilities=list(spec.capabilities),
            restart=spec.restart,
        )
        created = time.time()
        self._states[instance_id] = InstanceState(
            instance_id=instance_id, app_id=record.app_id, node_id=self.node_id,
            status=INSTANCE_STARTING, health=HEALTH_STARTING, created_at=created,
        )
        try:
            container = await self.runtime.run(request)
        except DockerRuntimeError as error:
            self._states[instance_id] = replace(
                self._states[instance_id], status=INSTANCE_FAILED, health=HEALTH_UNHEALTHY,
                error=error.reason, error_kind=error.kind,
            )
            logger.warning(
                "instance did not start node=%s app=%s instance=%s kind=%s reason=%s",
                self.node_id, record.app_id, instance_id, error.kind, error.reason,
            )
            return
        logger.info(
            "instance started node=%s app=%s instance=%s container=%s ports=%s",
            self.node_id, record.app_id, instance_id, container.container_id[:12],
            ",".join(f"{k}->{v}" for k, v in container.host_ports.items()) or "none",
        )
        self._next_check.pop(instance_id, None)
        self._health_failures.pop(instance_id, None)
        self._adopt(record, container)

    async def _remove(self, instance_id: str, container: ContainerInfo) -> None:
        record = self.catalogue.apps.get(container.app_id)
        force = bool(record and record.force_stop)
        timeout = record.stop_timeout_seconds if record else 10.0
        if record is None:
            reason = "its app is unknown to this node"
        elif record.state != STATE_ACTIVE:
            reason = f"the app is {record.state}"
        elif instance_id in record.assignments:
            reason = f"the instance moved to node {record.assignments[instance_id]}"
        else:
            reason = "the instance is no longer assigned (scaled down or replaced)"
        logger.info(
            "removing instance node=%s app=%s instance=%s force=%s because %s",
            self.node_id, container.app_id, instance_id, force, reason,
        )
        try:
            await self.runtime.stop(container.container_id, timeout_seconds=timeout, force=force)
        except DockerRuntimeError as error:
            logger.warning(
                "cannot remove container node=%s app=%s instance=%s: %s",
                self.node_id, container.app_id, instance_id, error.reason,
            )
            return
        finally:
            self._removing.discard(instance_id)
        self._states.pop(instance_id, None)
        self._health_failures.pop(instance_id, None)
        self._next_check.pop(instance_id, None)
        self._commit()

    # -- health and stats -----------------------------------------------------------------

    async def check_health_once(self, session: aiohttp.ClientSession) -> None:
        """Run the health checks that are due; mark instances healthy or unhealthy."""
        now = time.time()
        due = []
        for instance_id, state in self._states.items():
            if state.status != INSTANCE_RUNNING:
                continue
            record = self.catalogue.apps.get(state.app_id)
            check = record.spec.health_check if record else None
            if check is None or self._next_check.get(instance_id, 0.0) > now:
                continue
            due.append((instance_id, state, check))
        if not due:
            return
        results = await asyncio.gather(
            *(self._probe(session, state, check) for _, state, check in due)
        )
        changed = False
        for (instance_id, state, check), (ok, detail) in zip(due, results):
            current = self._states.get(instance_id)
            if current is None or current.status != INSTANCE_RUNNING:
                continue
            self._next_check[instance_id] = time.time() + check.interval_seconds
            in_start_period = (
                current.started_at is not None
                and time.time() - current.started_at < check.start_period_seconds
            )
            if ok:
                self._health_failures[instance_id] = 0
                health = HEALTH_HEALTHY
            else:
                failures = self._health_failures.get(instance_id, 0) + (0 if in_start_period else 1)
                self._health_failures[instance_id] = failures
                if failures >= check.retries:
                    health = HEALTH_UNHEALTHY
                else:
                    health = current.health
                if current.health != health:
                    logger.warning(
                        "instance unhealthy node=%s app=%s instance=%s: %s",
                        self.node_id, current.app_id, instance_id, detail,
                    )
            if health != current.health:
                changed = True
            self._states[instance_id] = replace(current, health=health, last_health_check=time.time())
        self._commit(push=changed)

    async def _probe(self, session: aiohttp.ClientSession, state: InstanceState, check) -> tuple[bool, str]:
        host_port = state.host_ports.get(f"{check.port}/tcp")
        if host_port is None:
            return False, f"container port {check.port}/tcp is not published"
        try:
            if check.kind == "http":
                url = f"http://{self.host_ip}:{host_port}{check.path or '/'}"
                async with session.get(
                    url, timeout=aiohttp.ClientTimeout(total=check.timeout_seconds), allow_redirects=False
                ) as response:
                    await response.read()
                    if response.status < 400:
                        return True, f"HTTP {response.status}"
                    return False, f"HTTP {response.status}"
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host_ip, host_port), timeout=check.timeout_seconds
            )
            writer.close()
            return True, "connected"
        except (OSError, aiohttp.ClientError, TimeoutError) as error:
            return False, f"{type(error).__name__}: {error}"

    async def collect_stats_once(self) -> None:
        """Refresh CPU, memory and network figures of running instances from Docker."""
        running = [s for s in self._states.values() if s.status == INSTANCE_RUNNING and s.container_id]
        if not running:
            return
        figures = await asyncio.gather(
            *(self.runtime.stats(s.container_id) for s in running), return_exceptions=True
        )
        for state, stats in zip(running, figures):
            if isinstance(stats, BaseException) or stats is None:
                continue
            current = self._states.get(state.instance_id)
            if current is None:
                continue
            self._states[state.instance_id] = replace(
                current,
                cpu_percent=round(stats.cpu_percent, 2),
                memory_mb=round(stats.memory_mb, 1),
                network_rx_bytes=stats.network_rx_bytes,
                network_tx_bytes=stats.network_tx_bytes,
            )
        self._commit(push=False)
