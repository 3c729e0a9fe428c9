"""The app catalogue every node keeps: app records and the nodes' instance reports.

An `AppRecord` is the desired state of one app: its spec, the number of replicas,
whether it is active, and which node each instance is assigned to. Records are
written by the node responsible for the app and ordered by (version, writer), so
every node that has seen the same writes has the same record. An `InstanceReport`
is one node's account of its own containers; only that node writes it, and a higher
`sequence` replaces a lower one.

Both are kept in SQLite under the data dir, so a restarted node serves the catalogue
it had, and the controller's digest exchange (`voxanode.apps.controller`) brings it up
to date.
"""

import json
import logging
import sqlite3
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from voxanode.apps.spec import AppSpec

DATABASE_FILE_NAME = "apps.sqlite3"
SCHEMA_VERSION = 1

# App states, as the user asked them.
STATE_ACTIVE = "active"
STATE_STOPPED = "stopped"
STATE_FAILED = "failed"
APP_STATES = (STATE_ACTIVE, STATE_STOPPED, STATE_FAILED)

# App phases as the API shows them, decided by the responsible node.
PHASE_DEPLOYING = "deploying"
PHASE_RUNNING = "running"
PHASE_DEGRADED = "degraded"
PHASE_STOPPED = "stopped"
PHASE_FAILED = "failed"
APP_PHASES = (PHASE_DEPLOYING, PHASE_RUNNING, PHASE_DEGRADED, PHASE_STOPPED, PHASE_FAILED)

# Instance states in a node's report.
INSTANCE_STARTING = "starting"
INSTANCE_RUNNING = "running"
INSTANCE_FAILED = "failed"
INSTANCE_STOPPING = "stopping"
INSTANCE_STATES = (INSTANCE_STARTING, INSTANCE_RUNNING, INSTANCE_FAILED, INSTANCE_STOPPING)

HEALTH_HEALTHY = "healthy"
HEALTH_UNHEALTHY = "unhealthy"
HEALTH_STARTING = "starting"

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS apps (
    app_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    writer TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    node_id TEXT PRIMARY KEY,
    sequence INTEGER NOT NULL,
    body TEXT NOT NULL
);
"""


class CatalogueError(ValueError):
    """A record or report from a peer or the database that does not parse."""


@dataclass(frozen=True)
class AppFailure:
    """The last reason an instance of an app could not run."""

    reason: str
    kind: str
    node_id: str | None
    instance_id: str | None
    at: float


@dataclass(frozen=True)
class AppRecord:
    """The desired state of one app, as its responsible node last wrote it."""

    app_id: str
    name: str
    spec: AppSpec
    desired: int
    state: str
    phase: str
    assignments: dict[str, str]
    created_at: float
    updated_at: float
    version: int
    writer: str
    force_stop: bool = False
    stop_timeout_seconds: float = 10.0
    last_error: AppFailure | None = None
    failures: int = 0
    # The last move of instances away from lost nodes: {"at", "from_nodes", "instances_replaced"}.
    rebalanced: dict[str, Any] | None = None

    @property
    def order(self) -> tuple[int, str]:
        return (self.version, self.writer)

    def to_dict(self) -> dict[str, Any]:
        return {
            "app_id": self.app_id,
            "name": self.name,
            "spec": self.spec.to_dict(),
            "desired": self.desired,
            "state": self.state,
            "phase": self.phase,
            "assignments": dict(sorted(self.assignments.items())),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "version": self.version,
            "writer": self.writer,
            "force_stop": self.force_stop,
            "stop_timeout_seconds": self.stop_timeout_seconds,
            "last_error": asdict(self.last_error) if self.last_error else None,
            "failures": self.failures,
            "rebalanced": self.rebalanced,
        }

    @classmethod
    def from_dict(cls, data: Any) -> "AppRecord":
        try:
            assignments = data["assignments"]
            if not isinstance(assignments, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in assignments.items()
            ):
                raise CatalogueError("assignments must map instance ids to node ids")
            error = data.get("last_error")
            record = cls(
                app_id=_text(data["app_id"]),
                name=_text(data["name"]),
                spec=AppSpec.from_dict(data["spec"]),
                desired=_count(data["desired"]),
                state=_choice(data["state"], APP_STATES),
                phase=_choice(data["phase"], APP_PHASES),
                assignments=dict(assignments),
                created_at=float(data["created_at"]),
                updated_at=float(data["updated_at"]),
                version=_count(data["version"]),
                writer=_text(data["writer"]),
                force_stop=bool(data.get("force_stop", False)),
                stop_timeout_seconds=float(data.get("stop_timeout_seconds", 10.0)),
                last_error=AppFailure(**error) if isinstance(error, dict) else None,
                failures=_count(data.get("failures", 0)),
                rebalanced=data.get("rebalanced") if isinstance(data.get("rebalanced"), dict) else None,
            )
        except CatalogueError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise CatalogueError(f"malformed app record: {error!r}") from error
        return record

    def next_version(self, writer: str, **changes: Any) -> "AppRecord":
        """Return this record changed by `writer`, ordered after this one."""
        return replace(
            self, version=self.version + 1, writer=writer, updated_at=time.time(), **changes
        )


@dataclass(frozen=True)
class InstanceState:
    """One instance as the node running it reports it."""

    instance_id: str
    app_id: str
    node_id: str
    status: str
    health: str
    created_at: float
    started_at: float | None = None
    last_health_check: float | None = None
    host_ports: dict[str, int] = field(default_factory=dict)
    container_id: str | None = None
    host_ip: str | None = None
    exit_code: int | None = None
    error: str | None = None
    # What ended the instance: "exited", "lost", or a Docker runtime error kind.
    error_kind: str | None = None
    cpu_percent: float = 0.0
    memory_mb: float = 0.0
    network_rx_bytes: int = 0
    network_tx_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "InstanceState":
        try:
            state = cls(**data)
        except TypeError as error:
            raise CatalogueError(f"malformed instance state: {error}") from error
        if state.status not in INSTANCE_STATES:
            raise CatalogueError(f"unknown instance status {state.status!r}")
        return state


@dataclass(frozen=True)
class InstanceReport:
    """Every instance one node runs, with a sequence number that only grows."""

    node_id: str
    sequence: int
    instances: dict[str, InstanceState]

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "sequence": self.sequence,
            "instances": [state.to_dict() for state in self.instances.values()],
        }

    @classmethod
    def from_dict(cls, data: Any) -> "InstanceReport":
        try:
            states = [InstanceState.from_dict(item) for item in data["instances"]]
            report = cls(
                node_id=_text(data["node_id"]),
                sequence=_count(data["sequence"]),
                instances={state.instance_id: state for state in states},
            )
        except CatalogueError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise CatalogueError(f"malformed instance report: {error!r}") from error
        if any(state.node_id != report.node_id for state in states):
            raise CatalogueError("a report may only describe its own node's instances")
        return report


class Catalogue:
    """App records and instance reports, in memory and in SQLite.

    The memory copy is the one the node works from. A write to SQLite that fails, as
    on a full disk, is logged and does not undo the merge, because the record is the
    network's current state either way. The ids whose rows are stale are kept and
    written again with the next write that succeeds.
    """

    def __init__(self, path: Path):
        self.path = path
        self.apps: dict[str, AppRecord] = {}
        self.reports: dict[str, InstanceReport] = {}
        self._db: sqlite3.Connection | None = None
        # Ids whose newest record or report is not in SQLite yet, after a failed write.
        self._unsaved_apps: set[str] = set()
        self._unsaved_reports: set[str] = set()
        self._save_failing = False

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            db.close()
            raise CatalogueError(
                f"{self.path} has app catalogue schema {version}, this version reads {SCHEMA_VERSION}"
            )
        self._db = db
        for app_id, body in db.execute("SELECT app_id, body FROM apps"):
            try:
                self.apps[app_id] = AppRecord.from_dict(json.loads(body))
            except (CatalogueError, ValueError) as error:
                logger.warning("skipping unreadable app record app=%s: %s", app_id, error)
        for node_id, body in db.execute("SELECT node_id, body FROM reports"):
            try:
                self.reports[node_id] = InstanceReport.from_dict(json.loads(body))
            except (CatalogueError, ValueError) as error:
                logger.warning("skipping unreadable instance report node=%s: %s", node_id, error)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def merge_app(self, record: AppRecord) -> AppRecord | None:
        """Keep `record` if it is newer than the held one; return the replaced one or None.

        Returns the record itself when there was none before, and raises nothing for an
        older record: it is ignored.
        """
        held = self.apps.get(record.app_id)
        if held is not None and held.order >= record.order:
            return None
        self.apps[record.app_id] = record
        self._unsaved_apps.add(record.app_id)
        self._save_unsaved()
        return held or record

    def merge_report(self, report: InstanceReport) -> bool:
        """Keep `report` if its sequence is higher than the held one's."""
        held = self.reports.get(report.node_id)
        if held is not None and held.sequence >= report.sequence:
            return False
        self.reports[report.node_id] = report
        self._unsaved_reports.add(report.node_id)
        self._save_unsaved()
        return True

    @property
    def unsaved_count(self) -> int:
        """Number of records and reports whose newest version a failed write left out of SQLite."""
        return len(self._unsaved_apps) + len(self._unsaved_reports)

    def _save_unsaved(self) -> None:
        """Write every record and report not yet in SQLite; on failure keep them for later."""
        if self._db is None:
            self._unsaved_apps.clear()
            self._unsaved_reports.clear()
            return
        # Each row is its own autocommitted write, and rewriting a saved row is harmless,
        # so a failure part way through only leaves the rest for the next attempt.
        try:
            for app_id in sorted(self._unsaved_apps):
                record = self.apps[app_id]
                self._db.execute(
                    "INSERT OR REPLACE INTO apps (app_id, version, writer, body) VALUES (?, ?, ?, ?)",
                    (record.app_id, record.version, record.writer, json.dumps(record.to_dict())),
                )
            for node_id in sorted(self._unsaved_reports):
                report = self.reports[node_id]
                self._db.execute(
                    "INSERT OR REPLACE INTO reports (node_id, sequence, body) VALUES (?, ?, ?)",
                    (report.node_id, report.sequence, json.dumps(report.to_dict())),
                )
        except sqlite3.Error as error:
            if not self._save_failing:
                logger.warning(
                    "cannot save app records to %s: %s; %d records and reports are kept in"
                    " memory and saved once a write succeeds",
                    self.path,
                    error,
                    self.unsaved_count,
                )
            self._save_failing = True
            return
        if self._save_failing:
            logger.info("saving app records to %s works again", self.path)
        self._save_failing = False
        self._unsaved_apps.clear()
        self._unsaved_reports.clear()

    def digest(self) -> dict[str, Any]:
        """Versions of everything held, for a sync exchange."""
        return {
            "apps": {app_id: [r.version, r.writer] for app_id, r in self.apps.items()},
            "reports": {node_id: r.sequence for node_id, r in self.reports.items()},
        }

    def newer_than(self, digest: Any) -> tuple[list[AppRecord], list[InstanceReport], list[str], list[str]]:
        """Compare a peer's digest with what is held.

        Returns the records and reports the peer lacks, and the app ids and node ids
        of which the peer has newer versions.
        """
        their_apps = digest.get("apps", {}) if isinstance(digest, dict) else {}
        their_reports = digest.get("reports", {}) if isinstance(digest, dict) else {}
        if not isinstance(their_apps, dict) or not isinstance(their_reports, dict):
            raise CatalogueError("a digest maps app ids and node ids to versions")
        send_apps, send_reports, want_apps, want_reports = [], [], [], []
        for app_id, record in self.apps.items():
            theirs = _order(their_apps.get(app_id))
            if theirs is None or theirs < record.order:
                send_apps.append(record)
        for app_id, value in their_apps.items():
            theirs = _order(value)
            held = self.apps.get(app_id)
            if theirs is not None and (held is None or held.order < theirs):
                want_apps.append(app_id)
        for node_id, report in self.reports.items():
            theirs = their_reports.get(node_id)
            if not isinstance(theirs, int) or theirs < report.sequence:
                send_reports.append(report)
        for node_id, sequence in their_reports.items():
            held = self.reports.get(node_id)
            if isinstance(sequence, int) and (held is None or held.sequence < sequence):
                want_reports.append(node_id)
        return send_apps, send_reports, want_apps, want_reports

    def find_by_name(self, name: str, states: tuple[str, ...]) -> AppRecord | None:
        for record in self.apps.values():
            if record.name == name and record.state in states:
                return record
        return None


def _order(value: Any) -> tuple[int, str] | None:
    if (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], int)
        and isinstance(value[1], str)
    ):
        return (value[0], value[1])
    return None


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise CatalogueError("expected a non-empty string")
    return value


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CatalogueError("expected a non-negative integer")
    return value


def _choice(value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise CatalogueError(f"expected one of {', '.join(choices)}")
    return value
