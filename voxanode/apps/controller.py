"""The app controller: deploy, scale and stop apps, keep their replicas, report status.

Each app has one responsible node: the online member offering app deployment whose
DHT id is XOR-closest to the SHA-1 of the app's name. Every change of an app (deploy,
scale, stop, and replacing lost or crashed instances) is made by that node, which
writes the next version of the app record and sends it to every member; the node a
user asked forwards the request there with a signed call. Because one node writes
each app, two deploys of one name cannot both succeed, and versions do not fork.
When the responsible node dies, the next closest takes over.

A node offers app deployment only while its Docker engine responds. When the engine
stops responding, the node withdraws the capability, which membership gossip spreads,
and reports its instances failed so that they are replaced on other nodes. It pings
the engine every reconcile interval and offers app deployment again once it responds.

Every node holds the whole catalogue (records and each node's instance report), so
list and status answer from local state and give the same answer on every node once
the last change has spread. A periodic digest exchange with a random member repairs
what a lost push missed.
"""

import asyncio
import hashlib
import logging
import os
import random
import time
from dataclasses import replace
from typing import Any

import aiohttp

from voxanode.api.errors import ApiError, ErrorCode
from voxanode.api.timestamps import isoformat_utc
from voxanode.apps.agent import LocalAgent
from voxanode.apps.catalogue import (
    HEALTH_HEALTHY,
    INSTANCE_FAILED,
    INSTANCE_RUNNING,
    INSTANCE_STARTING,
    PHASE_DEGRADED,
    PHASE_DEPLOYING,
    PHASE_FAILED,
    PHASE_RUNNING,
    PHASE_STOPPED,
    STATE_ACTIVE,
    STATE_FAILED,
    STATE_STOPPED,
    AppFailure,
    AppRecord,
    Catalogue,
    CatalogueError,
    InstanceReport,
    InstanceState,
)
from voxanode.apps.peer_calls import PeerCallError, PeerCalls
from voxanode.apps.placement import NodeCapacity, PlacementError, choose_extras, place
from voxanode.apps.runtime import DockerRuntime, DockerRuntimeError, ErrorKind
from voxanode.apps.spec import AppSpec
from voxanode.ingress.proxy import Ingress
from voxanode.membership.state import Member, MemberStatus

logger = logging.getLogger(__name__)

CAPABILITY = "app-deployment"
BYTES_PER_MIB = 1024 * 1024
# After this many failed instances in a row with none running, an app shows "failed".
FAILURES_BEFORE_FAILED = 3
# Replacement of crashed instances backs off from this delay, doubling up to the max.
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
# Error kinds after which the same node is not tried again for the app.
NODE_SPECIFIC_FAILURES = ("image_missing", "pull_refused", "registry_not_allowed", "engine_unavailable")
# Time between attempts to reach a Docker engine that has not responded since the node
# started. An engine that responded before is tried every reconcile interval.
ENGINE_RETRY_SECONDS = 30.0
PUSH_TIMEOUT_SECONDS = 5.0
STATUS_FETCH_TIMEOUT_SECONDS = 2.0
COMMAND_CALL_TIMEOUT_SECONDS = 120.0
# Time after start before an assigned node that membership never heard of is lost.
UNKNOWN_NODE_GRACE_SECONDS = 60.0
HEALTH_LOOP_SECONDS = 1.0


def new_app_id() -> str:
    return "app-" + os.urandom(6).hex()


def new_instance_id() -> str:
    return "inst-" + os.urandom(6).hex()


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else isoformat_utc(epoch)


class AppController:
    """Apps of the network as seen and changed from this node."""

    def __init__(self, node: Any, catalogue: Catalogue, runtime: DockerRuntime, calls: PeerCalls):
        self.node = node
        self.settings = node.settings
        self.node_id: str = node.node_id
        self.catalogue = catalogue
        self.runtime = runtime
        self.calls = calls
        self.agent = LocalAgent(
            self.node_id, catalogue, runtime, runtime.host_ip, self._own_report_changed
        )
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._reconcile_requested = asyncio.Event()
        self._converge_requested = asyncio.Event()
        self._report_push_requested = asyncio.Event()
        self._name_locks: dict[str, asyncio.Lock] = {}
        self._retry_after: dict[str, float] = {}
        self._excluded_nodes: dict[str, dict[str, float]] = {}
        self._kept_failures: set[str] = set()
        # Whether the engine responded at the last attempt; None before the first.
        self._engine_reachable: bool | None = None
        self._engine_responded_once = False
        # Members last seen offering app deployment, to notice when one offers it again.
        self._offering: set[str] = set()
        self._started_at = time.monotonic()
        self._health_session: aiohttp.ClientSession | None = None
        self.ingress = Ingress(self)

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        await self.ingress.start()
        await self._connect_engine()
        loops = [
            ("apps-converge", self._converge_loop()),
            ("apps-reconcile", self._reconcile_loop()),
            ("apps-sync", self._sync_loop()),
            ("apps-report-push", self._report_push_loop()),
            ("apps-health", self._health_loop()),
            ("apps-stats", self._stats_loop()),
        ]
        for name, coroutine in loops:
            task = asyncio.get_running_loop().create_task(coroutine, name=f"voxanode-{name}")
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("app loop %s stopped node=%s: %r", task.get_name(), self.node_id, task.exception())

    async def stop(self) -> None:
        self._stop.set()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._health_session is not None:
            await self._health_session.close()
        await self.ingress.stop()
        await self.agent.close()
        await self.calls.close()
        await self.runtime.close()

    async def _connect_engine(self) -> None:
        """Reach the Docker engine, and offer app deployment only while it responds.

        When an engine that responded before stops responding, the local instances are
        reported failed, so the responsible nodes place them elsewhere.
        """
        reachable = await self.runtime.start()
        if reachable is self._engine_reachable:
            return
        first_attempt = self._engine_reachable is None
        self._engine_reachable = reachable
        self._set_capability(reachable)
        if reachable:
            if not first_attempt:
                logger.info("Docker engine responds again node=%s", self.node_id)
            self._engine_responded_once = True
            self.agent.engine_regained()
            self._forget_exclusions(self.node_id)
            self._converge_requested.set()
            return
        if not first_attempt:
            logger.warning(
                "Docker engine lost node=%s reason=%s; instances here are reported failed",
                self.node_id, self.runtime.unavailable_reason,
            )
        await self.agent.engine_lost(self.runtime.unavailable_reason)

    def _forget_exclusions(self, node_id: str) -> None:
        """Let placement use `node_id` again for every app that excluded it.

        Called when the node offers app deployment again: a node whose engine came
        back, or was replaced, deserves a new try.
        """
        cleared = [app_id for app_id, nodes in self._excluded_nodes.items() if nodes.pop(node_id, None) is not None]
        if cleared:
            logger.info("node=%s may run instances again apps=%s", node_id, ",".join(sorted(cleared)))

    def _set_capability(self, available: bool) -> None:
        membership = self.node.membership
        if membership is None:
            return
        capabilities = [c for c in membership.own_info.capabilities if c != CAPABILITY]
        if available:
            capabilities.append(CAPABILITY)
        if tuple(capabilities) != tuple(membership.own_info.capabilities):
            membership.update_own(capabilities=tuple(capabilities))
            logger.info("app deployment %s node=%s", "offered" if available else "not offered", self.node_id)

    # -- members ----------------------------------------------------------------------

    def _members(self) -> dict[str, Member]:
        membership = self.node.membership
        if membership is None:
            return {}
        return {m.node_id: m for m in membership.table.members.values()}

    def members(self) -> dict[str, Member]:
        """Return the members of this node's view by node id."""
        return self._members()

    def _deploy_nodes(self, statuses=(MemberStatus.ONLINE,)) -> list[Member]:
        return [
            m for m in self._members().values()
            if m.status in statuses and CAPABILITY in m.info.capabilities and not m.info.leaving
        ]

    def _node_alive(self, node_id: str) -> bool:
        member = self._members().get(node_id)
        return member is not None and member.status in (MemberStatus.ONLINE, MemberStatus.SUSPECT)

    def _node_lost(self, node_id: str) -> bool:
        """Return whether a node's instances must be replaced elsewhere.

        A node that membership reports offline or left is lost. A node not heard of
        since this one started is lost only after a grace period. Right after a
        restart the member list is still filling, and replacing the instances of every
        node not yet heard from would run them twice.
        """
        member = self._members().get(node_id)
        if member is not None:
            return member.status in (MemberStatus.OFFLINE, MemberStatus.LEFT)
        return time.monotonic() - self._started_at > UNKNOWN_NODE_GRACE_SECONDS

    def responsible_for(self, name: str) -> Member | None:
        """Return the member that makes the changes of the app named `name`."""
        candidates = self._deploy_nodes((MemberStatus.ONLINE, MemberStatus.SUSPECT))
        if not candidates:
            candidates = [m for m in self._members().values() if m.reachable]
        if not candidates:
            return None
        target = int.from_bytes(hashlib.sha1(name.encode()).digest(), "big")
        return min(candidates, key=lambda m: int.from_bytes(m.dht_id, "big") ^ target)

    def on_member_change(self, member: Member, change: Any) -> None:
        """Membership changed: recheck the apps, and share the catalogue with newcomers."""
        self._reconcile_requested.set()
        self.ingress.view_changed()
        if CAPABILITY not in member.info.capabilities:
            self._offering.discard(member.node_id)
        elif member.node_id not in self._offering:
            self._offering.add(member.node_id)
            self._forget_exclusions(member.node_id)
        if change.value in ("joined", "rejoined") and member.node_id != self.node_id:
            self._spawn(self._sync_with(member))

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    # -- public operations (any node) ----------------------------------------------------

    async def deploy(self, spec: AppSpec, request_id: str) -> dict:
        return await self._route(spec.name, {"op": "deploy", "spec": spec.to_dict()}, request_id)

    async def scale(self, app_id: str, replicas: int, request_id: str) -> dict:
        record = self._record_or_404(app_id)
        return await self._route(
            record.name, {"op": "scale", "app_id": app_id, "replicas": replicas}, request_id
        )

    async def stop_app(self, app_id: str, force: bool, request_id: str) -> dict:
        record = self._record_or_404(app_id)
        return await self._route(record.name, {"op": "stop", "app_id": app_id, "force": force}, request_id)

    def _record_or_404(self, app_id: str) -> AppRecord:
        record = self.catalogue.apps.get(app_id)
        if record is None:
            raise ApiError(
                404, ErrorCode.RESOURCE_NOT_FOUND, f"no app with id {app_id}", {"field": "app_id", "app_id": app_id}
            )
        return record

    async def _route(self, name: str, command: dict, request_id: str) -> dict:
        """Run `command` on the node responsible for `name`, here or by a signed call."""
        responsible = self.responsible_for(name)
        if responsible is None or responsible.node_id == self.node_id:
            return await self.execute(command, request_id)
        logger.info(
            "forwarding app command op=%s name=%s to node=%s request=%s",
            command["op"], name, responsible.node_id, request_id,
        )
        try:
            status, answer = await self.calls.call(
                responsible.node_id,
                tuple(responsible.info.api_address),
                "POST",
                "/internal/apps/command",
                {"command": command, "request_id": request_id},
                timeout=COMMAND_CALL_TIMEOUT_SECONDS,
            )
        except PeerCallError as error:
            raise ApiError(
                503,
                ErrorCode.SERVICE_UNAVAILABLE,
                f"the node responsible for app {name} did not answer; try again shortly",
                {"node_id": responsible.node_id, "reason": error.reason},
                headers={"Retry-After": "5"},
            ) from error
        if status == 200 and isinstance(answer, dict) and answer.get("success") is not False:
            self._merge_payload(answer.pop("_sync", None))
            return answer
        if isinstance(answer, dict):
            self._merge_payload(answer.pop("_sync", None))
        error = answer.get("error", {}) if isinstance(answer, dict) else {}
        try:
            code = ErrorCode(error.get("code"))
        except ValueError:
            code = ErrorCode.INTERNAL_ERROR
        raise ApiError(status, code, str(error.get("message", "app command failed")), error.get("details") or {})

    # -- commands (responsible node) ------------------------------------------------------

    async def execute(self, command: dict, request_id: str) -> dict:
        op = command.get("op")
        if op == "deploy":
            spec = AppSpec.from_dict(command["spec"])
            async with self._lock_for(spec.name):
                return await self._deploy_here(spec, request_id)
        record = self._record_or_404(str(command.get("app_id")))
        async with self._lock_for(record.name):
            if op == "scale":
                return await self._scale_here(record.app_id, int(command["replicas"]), request_id)
            if op == "stop":
                return await self._stop_here(record.app_id, bool(command.get("force")), request_id)
        raise ApiError(400, ErrorCode.INVALID_REQUEST, f"unknown app command {op!r}")

    def _lock_for(self, name: str) -> asyncio.Lock:
        return self._name_locks.setdefault(name, asyncio.Lock())

    def _capacities(self, record: AppRecord | None) -> list[NodeCapacity]:
        excluded = self._excluded_nodes.get(record.app_id, {}) if record else {}
        now = time.time()
        capacities = []
        for member in self._deploy_nodes():
            load = member.info.load
            on_node = 0
            if record is not None:
                on_node = sum(1 for n in record.assignments.values() if n == member.node_id)
            capacities.append(
                NodeCapacity(
                    node_id=member.node_id,
                    memory_free_bytes=load.memory_free_mb * BYTES_PER_MIB,
                    cpu_free_cores=load.cpu_free_cores,
                    cpu_cores=load.cpu_cores,
                    cpu_percent=load.cpu_percent,
                    memory_percent=load.memory_percent,
                    active_apps=load.active_apps,
                    app_instances=on_node,
                    excluded=excluded.get(member.node_id, 0.0) > now,
                )
            )
        return capacities

    async def _deploy_here(self, spec: AppSpec, request_id: str) -> dict:
        existing = self.catalogue.find_by_name(spec.name, (STATE_ACTIVE,))
        if existing is not None:
            raise ApiError(
                409,
                ErrorCode.RESOURCE_CONFLICT,
                f"an app named {spec.name} is already deployed; stop it first or choose another name",
                {"field": "name", "app_id": existing.app_id},
            )
        app_id = new_app_id()
        try:
            nodes = place(self._capacities(None), spec.replicas, spec.memory_bytes, spec.cpu)
        except PlacementError as error:
            logger.warning("app does not fit name=%s request=%s: %s", spec.name, request_id, error)
            raise ApiError(
                503,
                ErrorCode.DEPLOYMENT_FAILED,
                f"app {spec.name} does not fit on the network: {error}",
                error.shortfall.details(),
            ) from error

        now = time.time()
        record = AppRecord(
            app_id=app_id,
            name=spec.name,
            spec=spec,
            desired=spec.replicas,
            state=STATE_ACTIVE,
            phase=PHASE_DEPLOYING,
            assignments={new_instance_id(): node_id for node_id in nodes},
            created_at=now,
            updated_at=now,
            version=1,
            writer=self.node_id,
            stop_timeout_seconds=self.settings.apps_stop_timeout_seconds,
        )
        logger.info(
            "deploying app=%s name=%s replicas=%d nodes=%s request=%s",
            app_id, spec.name, spec.replicas, ",".join(sorted(set(nodes))), request_id,
        )
        states = await self._publish_and_apply(record)
        # An instance that already exited with code 0 under a policy that keeps it has
        # done its work: it is not a failed start.
        started = [
            s for s in states
            if s.status in (INSTANCE_RUNNING, INSTANCE_STARTING)
            or (s.status == INSTANCE_FAILED and s.exit_code == 0 and not self._replaces(record, s))
        ]
        failed = [s for s in states if s not in started]
        if not started:
            reason = failed[0].error if failed else "no node answered the start request"
            failure = self._failure_from(failed[0] if failed else None, reason)
            final = self.catalogue.apps[app_id].next_version(
                self.node_id, state=STATE_FAILED, phase=PHASE_FAILED, assignments={},
                desired=0, last_error=failure, failures=len(states) or 1,
            )
            await self._publish_and_apply(final)
            logger.warning("app failed to deploy app=%s name=%s request=%s: %s", app_id, spec.name, request_id, reason)
            raise ApiError(
                422,
                ErrorCode.DEPLOYMENT_FAILED,
                f"app {spec.name} could not start on any node: {reason}",
                {"app_id": app_id, "reason": reason, "kind": failure.kind, "image": spec.image,
                 "instances_failed": len(failed)},
            )
        if failed:
            self._reconcile_requested.set()
        return {
            "success": True,
            "message": "Application deployed successfully"
            if not failed
            else f"Application deploying; {len(failed)} instance(s) failed and will be replaced",
            "app_id": app_id,
            "deployment_details": {
                "nodes_deployed": len({s.node_id for s in started}),
                "instances_created": len(started),
                "status": PHASE_DEPLOYING,
            },
        }

    def _failure_from(self, state: InstanceState | None, reason: str) -> AppFailure:
        kind = state.error_kind if state is not None and state.error_kind else "start_failed"
        return AppFailure(
            reason=reason,
            kind=kind,
            node_id=state.node_id if state else None,
            instance_id=state.instance_id if state else None,
            at=time.time(),
        )

    async def _scale_here(self, app_id: str, replicas: int, request_id: str) -> dict:
        record = self.catalogue.apps[app_id]
        if record.state != STATE_ACTIVE:
            raise ApiError(
                409, ErrorCode.RESOURCE_CONFLICT,
                f"app {record.name} is {record.state}; deploy it again instead of scaling",
                {"field": "app_id", "app_id": app_id, "state": record.state},
            )
        previous = record.desired
        spec = record.spec.with_replicas(replicas) if replicas > 0 else record.spec
        assignments = dict(record.assignments)
        if replicas > len(assignments):
            try:
                nodes = place(self._capacities(record), replicas - len(assignments), spec.memory_bytes, spec.cpu)
            except PlacementError as error:
                raise ApiError(
                    503, ErrorCode.DEPLOYMENT_FAILED,
                    f"app {record.name} cannot grow to {replicas} replicas: {error}",
                    error.shortfall.details(),
                ) from error
            for node_id in nodes:
                assignments[new_instance_id()] = node_id
        elif replicas < len(assignments):
            for instance_id in choose_extras(assignments, len(assignments) - replicas, self._load_scores()):
                del assignments[instance_id]
        updated = record.next_version(
            self.node_id, desired=replicas, spec=spec, assignments=assignments,
        )
        updated = replace(updated, phase=self._phase(updated))
        logger.info(
            "scaling app=%s from=%d to=%d request=%s", app_id, previous, replicas, request_id
        )
        await self._publish_and_apply(updated)
        return {
            "success": True,
            "message": "Application scaled successfully",
            "app_id": app_id,
            "previous_replicas": previous,
            "new_replicas": replicas,
            "scaling_status": "completed" if previous == replicas else "in_progress",
        }

    async def _stop_here(self, app_id: str, force: bool, request_id: str) -> dict:
        record = self.catalogue.apps[app_id]
        if record.state == STATE_STOPPED:
            raise ApiError(
                409, ErrorCode.RESOURCE_CONFLICT, f"app {record.name} is already stopped",
                {"field": "app_id", "app_id": app_id, "state": record.state},
            )
        instances = len(record.assignments)
        stopped = record.next_version(
            self.node_id, state=STATE_STOPPED, phase=PHASE_STOPPED, desired=0,
            assignments={}, force_stop=force,
        )
        logger.info("stopping app=%s instances=%d force=%s request=%s", app_id, instances, force, request_id)
        await self._publish_and_apply(stopped, apply_to=set(record.assignments.values()))
        return {
            "success": True,
            "message": "Application stopped successfully",
            "app_id": app_id,
            "instances_stopped": instances,
        }

    def _load_scores(self) -> dict[str, float]:
        return {
            m.node_id: m.info.load.cpu_percent + m.info.load.memory_percent
            for m in self._members().values()
        }

    # -- spreading records ---------------------------------------------------------------

    async def _publish_and_apply(self, record: AppRecord, apply_to: set[str] | None = None) -> list[InstanceState]:
        """Store `record`, have the nodes concerned act on it, and send it to the rest.

        The nodes named in its assignments (or `apply_to`) converge on it before
        replying; their instance states for the app are returned.
        """
        self.merge_record(record)
        targets = set(record.assignments.values()) if apply_to is None else set(apply_to)
        members = self._members()
        calls = []
        for node_id in targets:
            if node_id == self.node_id:
                calls.append(self._apply_locally(record.app_id))
            elif node_id in members:
                calls.append(self._apply_remote(members[node_id], record))
        # The other members get the record before the user gets the reply, so that a
        # read from any node right after a change already shows it.
        others = [
            m for m in members.values()
            if m.reachable and m.node_id != self.node_id and m.node_id not in targets
        ]
        push = self._push_to(others, [record], [])
        results = await asyncio.gather(push, *calls)
        return [state for result in results[1:] for state in result]

    async def _apply_locally(self, app_id: str) -> list[InstanceState]:
        await self.agent.converge()
        return self.agent.states_of(app_id)

    async def _apply_remote(self, member: Member, record: AppRecord) -> list[InstanceState]:
        timeout = self.settings.apps_start_timeout_seconds + record.stop_timeout_seconds
        try:
            status, answer = await self.calls.call(
                member.node_id, tuple(member.info.api_address), "POST", "/internal/instances/apply",
                {"record": record.to_dict()}, timeout=timeout,
            )
        except PeerCallError as error:
            logger.warning("apply call failed app=%s node=%s: %s", record.app_id, member.node_id, error.reason)
            return []
        if status != 200 or not isinstance(answer, dict):
            logger.warning("apply call failed app=%s node=%s status=%s", record.app_id, member.node_id, status)
            return []
        self._merge_payload(answer.get("_sync"))
        return [s for s in self.catalogue.reports.get(member.node_id, InstanceReport(member.node_id, 0, {})).instances.values()
                if s.app_id == record.app_id]

    async def apply_from_peer(self, record_data: Any) -> dict:
        """Handle a signed apply call: merge the record, converge, answer with the report."""
        record = AppRecord.from_dict(record_data)
        self.merge_record(record)
        await self.agent.converge()
        return {"_sync": {"apps": [], "reports": [self.agent.report().to_dict()]}}

    async def _push_to(self, members: list[Member], records: list[AppRecord], reports: list[InstanceReport]) -> None:
        payload = {
            "apps": [r.to_dict() for r in records],
            "reports": [r.to_dict() for r in reports],
        }

        async def push(member: Member) -> None:
            try:
                await self.calls.call(
                    member.node_id, tuple(member.info.api_address), "POST", "/internal/sync/push",
                    payload, timeout=PUSH_TIMEOUT_SECONDS,
                )
            except PeerCallError as error:
                logger.debug("push to node=%s failed: %s", member.node_id, error.reason)

        await asyncio.gather(*(push(m) for m in members))

    def merge_record(self, record: AppRecord) -> bool:
        previous = self.catalogue.merge_app(record)
        if previous is None:
            return False
        self._record_changed(None if previous is record else previous, record)
        return True

    def _merge_payload(self, payload: Any) -> None:
        """Merge records and reports that a peer sent; malformed entries are skipped."""
        if not isinstance(payload, dict):
            return
        for item in payload.get("apps", []) or []:
            try:
                self.merge_record(AppRecord.from_dict(item))
            except CatalogueError as error:
                logger.warning("ignoring a malformed app record from a peer: %s", error)
        for item in payload.get("reports", []) or []:
            try:
                report = InstanceReport.from_dict(item)
            except CatalogueError as error:
                logger.warning("ignoring a malformed instance report from a peer: %s", error)
                continue
            if report.node_id == self.node_id:
                continue
            if self.catalogue.merge_report(report):
                self._reconcile_requested.set()
                self.ingress.view_changed()

    def merge_push(self, payload: Any) -> None:
        self._merge_payload(payload)

    def answer_digest(self, digest: Any) -> dict:
        send_apps, send_reports, want_apps, want_reports = self.catalogue.newer_than(digest)
        return {
            "apps": [r.to_dict() for r in send_apps],
            "reports": [r.to_dict() for r in send_reports],
            "want_apps": want_apps,
            "want_reports": want_reports,
        }

    def _record_changed(self, previous: AppRecord | None, record: AppRecord) -> None:
        """Publish app events for a record change and let the local agent act on it."""
        self._converge_requested.set()
        self._reconcile_requested.set()
        self.ingress.view_changed()
        subject = {"app_id": record.app_id}
        old_phase = previous.phase if previous else None
        if record.phase != old_phase:
            if record.phase == PHASE_RUNNING and old_phase in (None, PHASE_DEPLOYING):
                self.node.events.publish("app_deployed", subject, {"name": record.name, "replicas": record.desired})
            elif record.phase == PHASE_FAILED:
                error = record.last_error
                self.node.events.publish(
                    "app_failed", subject,
                    {"reason": error.reason if error else "unknown", "kind": error.kind if error else "unknown"},
                )
        moved = record.rebalanced
        if moved and moved != (previous.rebalanced if previous else None):
            self.node.events.publish(
                "load_rebalanced", subject,
                {
                    "reason": "node_lost",
                    "from_nodes": list(moved.get("from_nodes", [])),
                    "instances_replaced": moved.get("instances_replaced", 0),
                    "lost_instances": list(moved.get("lost_instances", [])),
                    "instances": sorted(record.assignments),
                },
            )

    def _own_report_changed(self) -> None:
        self._report_push_requested.set()
        self._reconcile_requested.set()
        self.ingress.view_changed()
        self._refresh_load()

    def _refresh_load(self) -> None:
        membership = self.node.membership
        if membership is None:
            return
        running = self.agent.active_app_count()
        if membership.own_info.load.active_apps != running:
            membership.update_own(load=replace(membership.own_info.load, active_apps=running))

    def active_instances(self) -> int:
        """Return the number of apps running here, the `active_apps` of the node's load."""
        return self.agent.active_app_count()

    # -- loops ---------------------------------------------------------------------------

    async def _sleep(self, seconds: float) -> None:
        """Wait `seconds`, or less when the controller stops."""
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    async def _wait(self, event: asyncio.Event, seconds: float) -> None:
        try:
            await asyncio.wait_for(event.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass
        event.clear()

    async def _converge_loop(self) -> None:
        interval = self.settings.apps_reconcile_interval_seconds
        next_engine_try = 0.0
        while not self._stop.is_set():
            await self._wait(self._converge_requested, interval)
            if self.runtime.available:
                try:
                    await self.agent.converge()
                except Exception:  # noqa: BLE001 - one failed pass must not end the loop
                    logger.exception("converging containers failed node=%s", self.node_id)
            if self.runtime.available and self._engine_reachable:
                continue
            # A call just failed to reach the engine (a ping confirms it at once), or
            # the engine is away and is tried again on schedule.
            now = time.monotonic()
            if self._engine_reachable or now >= next_engine_try:
                next_engine_try = now + (interval if self._engine_responded_once else ENGINE_RETRY_SECONDS)
                await self._connect_engine()

    async def _reconcile_loop(self) -> None:
        while not self._stop.is_set():
            await self._wait(self._reconcile_requested, self.settings.apps_reconcile_interval_seconds)
            for record in list(self.catalogue.apps.values()):
                if record.state != STATE_ACTIVE:
                    continue
                responsible = self.responsible_for(record.name)
                if responsible is None or responsible.node_id != self.node_id:
                    continue
                lock = self._lock_for(record.name)
                if lock.locked():
                    continue
                try:
                    async with lock:
                        await self._reconcile(record.app_id)
                except Exception:  # noqa: BLE001 - one app's failure must not stop the others
                    logger.exception("reconciling failed node=%s app=%s", self.node_id, record.app_id)

    def instance_state(self, instance_id: str, node_id: str) -> InstanceState | None:
        """Return an instance as its node last reported it, or None when not reported."""
        return self._instance_state(instance_id, node_id)

    def _instance_state(self, instance_id: str, node_id: str) -> InstanceState | None:
        if node_id == self.node_id:
            return self.agent.report().instances.get(instance_id)
        report = self.catalogue.reports.get(node_id)
        return report.instances.get(instance_id) if report else None

    async def _reconcile(self, app_id: str) -> None:
        """Replace lost and crashed instances, add missing ones, remove extras."""
        record = self.catalogue.apps[app_id]
        now = time.time()
        assignments = dict(record.assignments)
        lost, crashed, crashed_kept, lost_nodes = [], [], [], set()
        for instance_id, node_id in record.assignments.items():
            if self._node_lost(node_id):
                lost.append(instance_id)
                lost_nodes.add(node_id)
                del assignments[instance_id]
                continue
            if not self._node_alive(node_id):
                # Suspect, or not heard of yet: wait before replacing its instances.
                continue
            state = self._instance_state(instance_id, node_id)
            if state is None or state.status != INSTANCE_FAILED:
                continue
            if self._replaces(record, state):
                crashed.append(state)
                del assignments[instance_id]
            elif instance_id not in self._kept_failures:
                # The restart policy keeps this instance as it ended: count it once.
                self._kept_failures.add(instance_id)
                crashed_kept.append(state)
        failures = record.failures
        last_error = record.last_error
        for state in crashed_kept:
            failures += 1
            last_error = self._failure_from(state, state.error or "failed")
        for state in crashed:
            failures += 1
            last_error = self._failure_from(state, state.error or "failed")
            if last_error.kind in NODE_SPECIFIC_FAILURES:
                self._excluded_nodes.setdefault(app_id, {})[state.node_id] = now + RETRY_MAX_SECONDS
        if crashed:
            delay = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** min(failures, 10))
            self._retry_after[app_id] = now + delay
            logger.warning(
                "replacing crashed instances app=%s count=%d failures=%d next_try_in=%.0fs reason=%s",
                app_id, len(crashed), failures, delay, last_error.reason if last_error else "-",
            )
        if lost:
            logger.warning("replacing instances of lost nodes app=%s count=%d", app_id, len(lost))

        missing = record.desired - len(assignments)
        if missing > 0 and (lost or self._retry_after.get(app_id, 0.0) <= now):
            try:
                for node_id in place(self._capacities(replace(record, assignments=assignments)),
                                     missing, record.spec.memory_bytes, record.spec.cpu):
                    assignments[new_instance_id()] = node_id
            except PlacementError as error:
                # Place what fits; the rest waits for room.
                placeable = error.shortfall.placed
                if placeable:
                    for node_id in place(self._capacities(replace(record, assignments=assignments)),
                                         placeable, record.spec.memory_bytes, record.spec.cpu):
                        assignments[new_instance_id()] = node_id
                logger.warning("app instances wait for room app=%s: %s", app_id, error)
        elif missing < 0:
            for instance_id in choose_extras(assignments, -missing, self._load_scores()):
                del assignments[instance_id]

        running = self._healthy_running(record, assignments)
        if running >= record.desired and record.desired > 0:
            failures = 0
        candidate = replace(record, assignments=assignments, failures=failures, last_error=last_error)
        phase = self._phase(candidate)
        if assignments == record.assignments and phase == record.phase and failures == record.failures:
            return
        rebalanced = record.rebalanced
        if lost:
            rebalanced = {
                "at": now, "from_nodes": sorted(lost_nodes), "instances_replaced": len(lost),
                "lost_instances": sorted(lost),
            }
        updated = record.next_version(
            self.node_id, assignments=assignments, phase=phase, failures=failures,
            last_error=last_error, rebalanced=rebalanced,
        )
        new_nodes = {n for i, n in assignments.items() if i not in record.assignments}
        gone_nodes = {n for i, n in record.assignments.items() if i not in assignments and self._node_alive(n)}
        await self._publish_and_apply(updated, apply_to=new_nodes | gone_nodes)

    @staticmethod
    def _replaces(record: AppRecord, state: InstanceState) -> bool:
        """Return whether the app's restart policy replaces this ended instance.

        "always" replaces every ended instance, "on-failure" those that did not exit
        with code 0, and "never" none. An instance whose container could not start or
        disappeared is replaced under every policy.
        """
        policy = record.spec.restart
        exited = state.error_kind == "exited"
        if policy == "never" and exited:
            return False
        if policy == "on-failure" and exited and state.exit_code == 0:
            return False
        return True

    def _ended_for_good(self, record: AppRecord) -> list[InstanceState]:
        """Return the ended instances that the restart policy does not replace."""
        ended = []
        for instance_id, node_id in record.assignments.items():
            state = self._instance_state(instance_id, node_id)
            if state is not None and state.status == INSTANCE_FAILED and not self._replaces(record, state):
                ended.append(state)
        return ended

    def _healthy_running(self, record: AppRecord, assignments: dict[str, str]) -> int:
        count = 0
        for instance_id, node_id in assignments.items():
            state = self._instance_state(instance_id, node_id)
            if state is not None and state.status == INSTANCE_RUNNING and state.health == HEALTH_HEALTHY:
                count += 1
        return count

    def _phase(self, record: AppRecord) -> str:
        if record.state == STATE_STOPPED:
            return PHASE_STOPPED
        if record.state == STATE_FAILED:
            return PHASE_FAILED
        if record.desired == 0:
            return PHASE_STOPPED if not record.assignments else PHASE_DEPLOYING
        healthy = self._healthy_running(record, record.assignments)
        if healthy >= record.desired:
            return PHASE_RUNNING
        if record.failures >= FAILURES_BEFORE_FAILED and healthy == 0:
            return PHASE_FAILED
        ended = self._ended_for_good(record)
        if ended and len(ended) == len(record.assignments):
            # Every instance ended and the restart policy keeps them: the app is done.
            return PHASE_FAILED if any(state.exit_code != 0 for state in ended) else PHASE_STOPPED
        if record.phase in (PHASE_RUNNING, PHASE_DEGRADED):
            return PHASE_DEGRADED
        return PHASE_DEPLOYING

    async def _sync_loop(self) -> None:
        while not self._stop.is_set():
            await self._sleep(self.settings.apps_sync_interval_seconds * random.uniform(0.8, 1.2))
            members = [m for m in self._members().values() if m.reachable and m.node_id != self.node_id]
            if members:
                await self._sync_with(random.choice(members))

    async def _sync_with(self, member: Member) -> None:
        """Exchange digests with one member and trade what either side lacks."""
        try:
            status, answer = await self.calls.call(
                member.node_id, tuple(member.info.api_address), "POST", "/internal/sync/digest",
                {"digest": self.catalogue.digest()}, timeout=PUSH_TIMEOUT_SECONDS,
            )
        except PeerCallError as error:
            logger.debug("catalogue sync with node=%s failed: %s", member.node_id, error.reason)
            return
        if status != 200 or not isinstance(answer, dict):
            return
        self._merge_payload(answer)
        requested_apps = [self.catalogue.apps[i] for i in answer.get("want_apps", []) if i in self.catalogue.apps]
        requested_reports = [
            self.catalogue.reports[n] for n in answer.get("want_reports", []) if n in self.catalogue.reports
        ]
        if requested_apps or requested_reports:
            await self._push_to([member], requested_apps, requested_reports)

    async def _report_push_loop(self) -> None:
        while not self._stop.is_set():
            await self._report_push_requested.wait()
            self._report_push_requested.clear()
            # Coalesce the changes of one converge pass into one push.
            await asyncio.sleep(0.05)
            members = [m for m in self._members().values() if m.reachable and m.node_id != self.node_id]
            if members:
                await self._push_to(members, [], [self.agent.report()])

    async def _health_loop(self) -> None:
        self._health_session = aiohttp.ClientSession()
        while not self._stop.is_set():
            await self._sleep(HEALTH_LOOP_SECONDS)
            try:
                await self.agent.check_health_once(self._health_session)
            except Exception:  # noqa: BLE001
                logger.exception("health checks failed node=%s", self.node_id)

    async def _stats_loop(self) -> None:
        while not self._stop.is_set():
            await self._sleep(self.settings.apps_stats_interval_seconds)
            if self.runtime.available:
                try:
                    await self.agent.collect_stats_once()
                except Exception:  # noqa: BLE001
                    logger.exception("collecting container stats failed node=%s", self.node_id)

    # -- views (any node) ---------------------------------------------------------------

    def _instances_of(self, record: AppRecord) -> list[InstanceState]:
        states = []
        for instance_id, node_id in sorted(record.assignments.items()):
            state = self._instance_state(instance_id, node_id) if self._node_alive(node_id) else None
            if state is None:
                state = InstanceState(
                    instance_id=instance_id, app_id=record.app_id, node_id=node_id,
                    status=INSTANCE_STARTING if self._node_alive(node_id) else "lost",
                    health="unknown", created_at=record.updated_at,
                )
            states.append(state)
        return states

    def _counts(self, record: AppRecord) -> dict[str, int]:
        states = self._instances_of(record) if record.state == STATE_ACTIVE else []
        running = [s for s in states if s.status == INSTANCE_RUNNING]
        healthy = [s for s in running if s.health == HEALTH_HEALTHY]
        return {
            "desired": record.desired,
            "running": len(running),
            "healthy": len(healthy),
            "unhealthy": len(running) - len(healthy),
        }

    def list_apps(self, status: str | None, node_id: str | None, limit: int, offset: int) -> dict:
        records = sorted(self.catalogue.apps.values(), key=lambda r: (r.created_at, r.app_id))
        if status is not None:
            records = [r for r in records if r.phase == status]
        if node_id is not None:
            records = [r for r in records if node_id in r.assignments.values()]
        page = records[offset : offset + limit]
        applications = []
        for record in page:
            counts = self._counts(record)
            applications.append(
                {
                    "app_id": record.app_id,
                    "name": record.name,
                    "status": record.phase,
                    "replicas": {k: counts[k] for k in ("desired", "running", "healthy")},
                    "created_at": _iso(record.created_at),
                    "last_updated": _iso(record.updated_at),
                    "nodes": sorted(set(record.assignments.values())),
                }
            )
        return {
            "success": True,
            "applications": applications,
            "total_count": len(records),
            "pagination": {"limit": limit, "offset": offset, "has_more": offset + len(page) < len(records)},
        }

    async def app_status(self, app_id: str) -> dict:
        record = self._record_or_404(app_id)
        await self._refresh_reports(record)
        counts = self._counts(record)
        instances = []
        for state in self._instances_of(record) if record.state == STATE_ACTIVE else []:
            instances.append(
                {
                    "instance_id": state.instance_id,
                    "node_id": state.node_id,
                    "status": state.status,
                    "health": state.health,
                    "created_at": _iso(state.created_at),
                    "started_at": _iso(state.started_at),
                    "last_health_check": _iso(state.last_health_check),
                    "ports": [
                        {
                            "container_port": int(key.split("/")[0]),
                            "protocol": key.split("/")[1],
                            "host_ip": state.host_ip,
                            "host_port": port,
                        }
                        for key, port in sorted(state.host_ports.items())
                    ],
                    "error": state.error,
                    "resource_usage": {
                        "cpu_percent": state.cpu_percent,
                        "memory_mb": state.memory_mb,
                        "network_rx_bytes": state.network_rx_bytes,
                        "network_tx_bytes": state.network_tx_bytes,
                    },
                }
            )
        if record.state != STATE_ACTIVE or record.desired == 0:
            health = "unknown"
        elif counts["healthy"] >= record.desired:
            health = "healthy"
        elif counts["healthy"] > 0:
            health = "degraded"
        else:
            health = "unhealthy"
        error = record.last_error
        return {
            "success": True,
            "app_id": record.app_id,
            "name": record.name,
            "status": record.phase,
            "health": health,
            "image": record.spec.image,
            "created_at": _iso(record.created_at),
            "last_updated": _iso(record.updated_at),
            "replicas": counts,
            "instances": instances,
            "metrics": self.ingress.status_metrics(record.app_id),
            "last_error": None if error is None else {
                "reason": error.reason, "kind": error.kind, "node_id": error.node_id,
                "instance_id": error.instance_id, "at": _iso(error.at),
            },
        }

    async def _refresh_reports(self, record: AppRecord) -> None:
        """Fetch fresh reports and ingress counters from every reachable member.

        The nodes running the app send their instance figures. Every node may have
        forwarded the app's traffic, so all are asked for their counters. A node that
        does not reply in time counts with the counters it sent last.
        NOTE: that is one call per member for each status request, which grows with
        the network.
        """
        members = self._members()
        targets = {n for n, m in members.items() if n != self.node_id and m.reachable}

        async def fetch(node_id: str) -> None:
            member = members.get(node_id)
            if member is None:
                return
            try:
                status, answer = await self.calls.call(
                    node_id, tuple(member.info.api_address), "GET", "/internal/instances/report",
                    timeout=STATUS_FETCH_TIMEOUT_SECONDS,
                )
            except PeerCallError:
                return
            if status == 200:
                self._merge_payload(answer)
                if isinstance(answer, dict) and "ingress" in answer:
                    self.ingress.remember_peer(answer["ingress"])

        if targets:
            await asyncio.gather(*(fetch(n) for n in targets))

    async def local_log_lines(self, instance_id: str, tail: int, follow: bool):
        """Open the log lines of one local instance; return an async iterator of dicts.

        Raises ApiError 404 when the instance has no container here, and 503 when the
        Docker engine does not respond or fails, before any line is sent. An engine
        failure after that ends the iterator early, with a warning in the log.
        """
        state = self.agent.report().instances.get(instance_id)
        if state is None or not state.container_id:
            raise ApiError(
                404, ErrorCode.RESOURCE_NOT_FOUND, f"instance {instance_id} has no container on this node",
                {"field": "instance_id"},
            )
        try:
            await self.runtime.inspect(state.container_id)
        except DockerRuntimeError as error:
            if error.kind == ErrorKind.NOT_FOUND:
                raise ApiError(
                    404, ErrorCode.RESOURCE_NOT_FOUND, f"instance {instance_id} has no container on this node",
                    {"field": "instance_id"},
                ) from error
            raise ApiError(
                503,
                ErrorCode.SERVICE_UNAVAILABLE,
                f"the logs of instance {instance_id} cannot be read because the Docker engine of node"
                f" {self.node_id} failed: {error.reason}; try again when the engine responds",
                {"instance_id": instance_id, "node_id": self.node_id, "kind": error.kind},
                headers={"Retry-After": "5"},
            ) from error
        return self._log_lines(instance_id, state.container_id, tail, follow)

    async def _log_lines(self, instance_id: str, container_id: str, tail: int, follow: bool):
        lines = self.runtime.logs(container_id, tail=tail, follow=follow)
        try:
            async for line in lines:
                yield {"timestamp": line.timestamp, "stream": line.stream, "message": line.message}
        except DockerRuntimeError as error:
            logger.warning(
                "log stream ended early node=%s instance=%s container=%s kind=%s: %s",
                self.node_id, instance_id, container_id[:12], error.kind, error.reason,
            )
        finally:
            await lines.aclose()

    def sync_payload_for(self, app_id: Any) -> dict:
        """Return the record of `app_id` and every held report, sent with a command reply."""
        record = self.catalogue.apps.get(app_id) if isinstance(app_id, str) else None
        return {
            "apps": [record.to_dict()] if record else [],
            "reports": [r.to_dict() for r in self.catalogue.reports.values()],
        }

    def own_report_payload(self) -> dict:
        """Return this node's instance report and its ingress counters of every app."""
        return {
            "apps": [],
            "reports": [self.agent.report().to_dict()],
            "ingress": self.ingress.snapshot().to_dict(),
        }

    def log_sources(self, app_id: str) -> list[tuple[str, str, tuple[str, int] | None]]:
        """Return (instance id, node id, API address or None for this node) of each instance."""
        record = self._record_or_404(app_id)
        members = self._members()
        sources = []
        for instance_id, node_id in sorted(record.assignments.items()):
            if node_id == self.node_id:
                sources.append((instance_id, node_id, None))
            elif node_id in members and self._node_alive(node_id):
                sources.append((instance_id, node_id, tuple(members[node_id].info.api_address)))
        return sources

    def summary(self) -> dict[str, int]:
        records = list(self.catalogue.apps.values())
        return {
            "total_deployed": len(records),
            "running": sum(1 for r in records if r.phase in (PHASE_RUNNING, PHASE_DEGRADED, PHASE_DEPLOYING)),
            "stopped": sum(1 for r in records if r.phase == PHASE_STOPPED),
            "failed": sum(1 for r in records if r.phase == PHASE_FAILED),
        }
