"""Request counters of this API server, reported by `/info/program_stats` and `/metrics`.

`RequestStats.record` runs once per response on the event loop's thread, so it keeps
plain dicts and lists with no lock: one dict increment for the response count and one
bisect into fixed latency buckets. The metrics collector turns them into Prometheus
counter and histogram families when `/metrics` is scraped.
"""

import bisect
from dataclasses import dataclass, field

from aiohttp import web

FIRST_ERROR_STATUS = 400
# The route label of requests that matched no route: unknown paths (404) and known
# paths with a method they do not serve (405).
UNMATCHED_ROUTE = "unmatched"
# The method label of any method outside KNOWN_METHODS, so that a client cannot add
# label values by sending made-up methods to unknown paths.
OTHER_METHOD = "other"
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)
# Upper bounds of the latency buckets in milliseconds, as Prometheus's `le` labels
# (each bucket counts responses at or below its bound). A last bucket counts the rest.
LATENCY_BUCKET_BOUNDS_MS = (
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
)


@dataclass
class RouteLatency:
    """Response counts of one route per latency bucket, and their total time."""

    # One count per bound of LATENCY_BUCKET_BOUNDS_MS and a last one for larger times.
    bucket_counts: list[int] = field(
        default_factory=lambda: [0] * (len(LATENCY_BUCKET_BOUNDS_MS) + 1)
    )
    total_ms: float = 0.0


@dataclass
class RequestStats:
    """Counts and times of the responses sent since the server started.

    Error responses are those with status 400 or above. `responses` counts responses
    by (route, method, status) and `latencies` keeps each route's latency buckets. A
    route is the path template that matched, such as `/data/retrieve/`, or
    UNMATCHED_ROUTE, never the request path, so both stay as small as the route table.
    """

    requests: int = 0
    errors: int = 0
    total_response_ms: float = 0.0
    responses: dict[tuple[str, str, int], int] = field(default_factory=dict)
    latencies: dict[str, RouteLatency] = field(default_factory=dict)

    def record(self, status: int, response_ms: float, route: str, method: str) -> None:
        """Count one response with its HTTP status, handling time, route and method."""
        self.requests += 1
        self.total_response_ms += response_ms
        if status >= FIRST_ERROR_STATUS:
            self.errors += 1

        if method not in KNOWN_METHODS:
            method = OTHER_METHOD
        key = (route, method, status)
        self.responses[key] = self.responses.get(key, 0) + 1

        latency = self.latencies.get(route)
        if latency is None:
            latency = self.latencies[route] = RouteLatency()
        latency.bucket_counts[bisect.bisect_left(LATENCY_BUCKET_BOUNDS_MS, response_ms)] += 1
        latency.total_ms += response_ms

    @property
    def average_response_ms(self) -> float:
        if self.requests == 0:
            return 0.0
        return self.total_response_ms / self.requests

    @property
    def success_rate_percent(self) -> float:
        """Share of responses below status 400; 100 before the first response."""
        if self.requests == 0:
            return 100.0
        return 100.0 * (self.requests - self.errors) / self.requests


def route_of(request: web.BaseRequest) -> str:
    """Return the path template of the route that the request matched, or UNMATCHED_ROUTE."""
    resource = request.match_info.route.resource
    if resource is None:
        return UNMATCHED_ROUTE
    return resource.canonical
