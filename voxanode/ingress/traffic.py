"""Request counters of app traffic per app, and how the counts of several nodes combine.

Each node counts the requests that pass through its own proxy in one `AppTraffic` per
app: requests, errors, the sum of response times, a fixed-bucket latency histogram
(the bounds of the API's histogram, `LATENCY_BUCKET_BOUNDS_MS`), responses by status
class and failed connections to instances. The counts start at the node's start.

`get_app_status` requests the counters of every reachable member (`TrafficSnapshot`,
carried in the reply of `/internal/instances/report`) and adds them up with
`merge_traffic`. The 95th percentile is then read from the merged histogram with
`percentile_ms`, so it is an estimate within one bucket, as Prometheus's
`histogram_quantile` is.
"""

import bisect
from dataclasses import dataclass, field
from typing import Any

from voxanode.api.stats import LATENCY_BUCKET_BOUNDS_MS

BUCKET_COUNT = len(LATENCY_BUCKET_BOUNDS_MS) + 1
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
FIRST_SERVER_ERROR_STATUS = 500
P95_QUANTILE = 0.95
# Apps whose counters one snapshot from a peer may carry, a bound on what is parsed.
MAX_SNAPSHOT_APPS = 10_000


class TrafficError(ValueError):
    """Counters from a peer that do not parse."""


@dataclass
class AppTraffic:
    """Request counters of one app on one node."""

    requests: int = 0
    # Responses with status 500 or more, the proxy's own 502, 503 and 504 included.
    errors: int = 0
    total_ms: float = 0.0
    bucket_counts: list[int] = field(default_factory=lambda: [0] * BUCKET_COUNT)
    status_classes: dict[str, int] = field(default_factory=dict)
    # Attempts whose connection to an instance failed or was reset before a response,
    # or whose response did not parse.
    upstream_failures: int = 0

    def record(self, status: int, response_ms: float) -> None:
        """Count one response with its status and its time in milliseconds."""
        self.requests += 1
        self.total_ms += response_ms
        if status >= FIRST_SERVER_ERROR_STATUS:
            self.errors += 1
        self.bucket_counts[bisect.bisect_left(LATENCY_BUCKET_BOUNDS_MS, response_ms)] += 1
        status_class = f"{status // 100}xx"
        self.status_classes[status_class] = self.status_classes.get(status_class, 0) + 1

    def add(self, other: "AppTraffic") -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.total_ms += other.total_ms
        for index, count in enumerate(other.bucket_counts):
            self.bucket_counts[index] += count
        for status_class, count in other.status_classes.items():
            self.status_classes[status_class] = self.status_classes.get(status_class, 0) + count
        self.upstream_failures += other.upstream_failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "total_ms": round(self.total_ms, 3),
            "buckets": list(self.bucket_counts),
            "status_classes": dict(self.status_classes),
            "upstream_failures": self.upstream_failures,
        }

    @classmethod
    def from_dict(cls, data: Any) -> "AppTraffic":
        """Read counters sent by a peer, raising TrafficError on any malformed field."""
        if not isinstance(data, dict):
            raise TrafficError("app traffic must be an object")
        buckets = data.get("buckets")
        if not isinstance(buckets, list) or len(buckets) != BUCKET_COUNT:
            raise TrafficError(f"buckets must be a list of {BUCKET_COUNT} counts")
        classes = data.get("status_classes", {})
        if not isinstance(classes, dict) or not all(name in STATUS_CLASSES for name in classes):
            raise TrafficError(f"status_classes keys must be among {', '.join(STATUS_CLASSES)}")
        total_ms = data.get("total_ms")
        if not isinstance(total_ms, (int, float)) or isinstance(total_ms, bool) or total_ms < 0:
            raise TrafficError("total_ms must be a number of at least 0")
        return cls(
            requests=_count(data.get("requests"), "requests"),
            errors=_count(data.get("errors"), "errors"),
            total_ms=float(total_ms),
            bucket_counts=[_count(count, "buckets") for count in buckets],
            status_classes={name: _count(count, "status_classes") for name, count in classes.items()},
            upstream_failures=_count(data.get("upstream_failures", 0), "upstream_failures"),
        )


@dataclass(frozen=True)
class TrafficSnapshot:
    """One node's counters of every app it routed, as sent to the node serving a status request.

    `started_at` (the node's start, epoch seconds) distinguishes a restarted node's
    fresh counters from the ones it had before.
    """

    node_id: str
    started_at: float
    apps: dict[str, AppTraffic]

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "started_at": self.started_at,
            "apps": {app_id: traffic.to_dict() for app_id, traffic in self.apps.items()},
        }

    @classmethod
    def from_dict(cls, data: Any) -> "TrafficSnapshot":
        if not isinstance(data, dict):
            raise TrafficError("a traffic snapshot must be an object")
        node_id = data.get("node_id")
        started_at = data.get("started_at")
        apps = data.get("apps")
        if not isinstance(node_id, str) or not node_id:
            raise TrafficError("node_id must be a non-empty string")
        if not isinstance(started_at, (int, float)) or isinstance(started_at, bool):
            raise TrafficError("started_at must be a number")
        if not isinstance(apps, dict) or len(apps) > MAX_SNAPSHOT_APPS:
            raise TrafficError(f"apps must be an object of at most {MAX_SNAPSHOT_APPS} apps")
        return cls(
            node_id=node_id,
            started_at=float(started_at),
            apps={str(app_id): AppTraffic.from_dict(item) for app_id, item in apps.items()},
        )


def merge_traffic(parts: list[AppTraffic]) -> AppTraffic:
    """Return the sum of the counters of one app from several nodes."""
    total = AppTraffic()
    for part in parts:
        total.add(part)
    return total


def percentile_ms(traffic: AppTraffic, quantile: float = P95_QUANTILE) -> float:
    """Estimate a latency quantile in milliseconds from the histogram; 0 without requests.

    The estimate interpolates linearly inside the bucket that contains the quantile.
    Past the last bound the estimate is that bound, because the bucket has no top.
    """
    total = sum(traffic.bucket_counts)
    if total == 0:
        return 0.0
    rank = quantile * total
    cumulative = 0
    for index, count in enumerate(traffic.bucket_counts):
        if count and cumulative + count >= rank:
            if index >= len(LATENCY_BUCKET_BOUNDS_MS):
                return LATENCY_BUCKET_BOUNDS_MS[-1]
            lower = LATENCY_BUCKET_BOUNDS_MS[index - 1] if index > 0 else 0.0
            upper = LATENCY_BUCKET_BOUNDS_MS[index]
            return lower + (upper - lower) * (rank - cumulative) / count
        cumulative += count
    return LATENCY_BUCKET_BOUNDS_MS[-1]


def status_metrics(traffic: AppTraffic) -> dict[str, Any]:
    """Return the `metrics` object of get_app_status for merged counters."""
    if traffic.requests == 0:
        return {
            "total_requests": 0,
            "avg_response_time_ms": 0.0,
            "error_rate_percent": 0.0,
            "p95_response_time_ms": 0.0,
        }
    return {
        "total_requests": traffic.requests,
        "avg_response_time_ms": round(traffic.total_ms / traffic.requests, 3),
        "error_rate_percent": round(100.0 * traffic.errors / traffic.requests, 3),
        "p95_response_time_ms": round(percentile_ms(traffic), 3),
    }


def _count(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TrafficError(f"{name} must hold integers of at least 0")
    return value
