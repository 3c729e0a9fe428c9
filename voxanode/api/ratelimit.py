"""Per-client rate limits of the REST API: request categories, client addresses, headers.

Each request falls in one category, chosen by the route it matches:

- deployments: `POST /apps/add_app/`, every request counted, rejected ones included;
- data: routes under `/data/`;
- status: routes under `/status/`, and `/metrics`, so that the status budget also
  covers monitoring scrapes;
- ingress: app traffic through `/proxy/{app}/...` and the host-routed `ingress_port`,
  so that app traffic never spends the API budget;
- default: every other request, including requests that match no route (404, 405);
- routes under `/internal/` are never limited: only member nodes call them, and the
  handlers reject any request without a member's signature.

Each client IP address has its own budget per category, set by the `rate_limit_*`
settings. A category whose setting is "unlimited" is not counted. A limited response,
success or error, carries `X-RateLimit-Limit`, `X-RateLimit-Remaining` (after this
request) and `X-RateLimit-Reset` (epoch seconds when the window ends). A request over
the budget gets 429 RATE_LIMIT_EXCEEDED with `Retry-After` in whole seconds.

The client address is the socket peer. Only when the peer is one of the
`trusted_proxies`, the right-most address in `X-Forwarded-For` that is not a trusted
proxy is used instead.

The counters are fixed windows in the memory storage of the `limits` package, in this
process's memory, so each node counts on its own, and a restart starts every budget
afresh.
"""

import ipaddress
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import limits
from aiohttp import web
from limits.storage import MemoryStorage

from voxanode.api.errors import ApiError, ErrorCode
from voxanode.api.keys import request_id_of
from voxanode.api.response_headers import (
    LIMIT_HEADER,
    RATE_LIMIT_STATE_KEY,
    REMAINING_HEADER,
    RESET_HEADER,
)
from voxanode.api.routes import slash_variants
from voxanode.api.routes.apps import ADD_APP_PATH
from voxanode.api.routes.metrics import METRICS_PATH
from voxanode.api.routes.proxy import HOST_ROUTE_TEMPLATE, PROXY_PREFIX
from voxanode.settings import IpNetwork, Settings, format_rate_limit

RETRY_AFTER_HEADER = "Retry-After"
FORWARDED_FOR_HEADER = "X-Forwarded-For"
# The key of requests whose peer address is not known, such as on a Unix socket.
UNKNOWN_CLIENT = "unknown"
MIN_RETRY_AFTER_SECONDS = 1
# Entries of the limiter's caches of peer addresses and of storage keys. A cache that
# reaches its size is emptied, so memory stays bounded however many clients connect.
MAX_CACHED_PEERS = 4096
MAX_CACHED_KEYS = 4096

INTERNAL_PREFIX = "/internal/"
STATUS_PREFIX = "/status/"
# Route templates outside STATUS_PREFIX that count in the status category.
STATUS_PATHS = frozenset(slash_variants(METRICS_PATH))
DATA_PREFIX = "/data/"

logger = logging.getLogger(__name__)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class RateLimitCategory(StrEnum):
    """The request groups that have separate budgets per client."""

    DEFAULT = "default"
    DEPLOYMENTS = "deployments"
    DATA = "data"
    STATUS = "status"
    INGRESS = "ingress"


CATEGORY_DESCRIPTIONS = {
    RateLimitCategory.DEFAULT: "API requests",
    RateLimitCategory.DEPLOYMENTS: "deployments (POST /apps/add_app/)",
    RateLimitCategory.DATA: "data requests (/data/)",
    RateLimitCategory.STATUS: "status requests (/status/ and /metrics)",
    RateLimitCategory.INGRESS: "app traffic (/proxy/ and the ingress port)",
}


@dataclass(slots=True)
class RateLimitState:
    """One counted request: its client, category and the budget left after it."""

    client: str
    category: RateLimitCategory
    limit: limits.RateLimitItem
    allowed: bool
    remaining: int
    reset_epoch_seconds: int
    retry_after_seconds: int

    def headers(self) -> dict[str, str]:
        """Return the X-RateLimit-* headers that every limited response carries."""
        return {
            LIMIT_HEADER: str(self.limit.amount),
            REMAINING_HEADER: str(self.remaining),
            RESET_HEADER: str(self.reset_epoch_seconds),
        }


class ApiRateLimiter:
    """Request budgets per category and client address, kept in this process's memory.

    It counts with the storage calls of the fixed window strategy of `limits`
    (`FixedWindowRateLimiter.hit` is one `MemoryStorage.incr` with the window length
    as expiry), and reads the window's end with `get_expiry`. Those are two storage
    calls per request, where `hit` and `get_window_stats` together made four calls
    and built the storage key three times.

    It uses a fixed window, not the moving window of `limits`, for memory. In limits
    5.8.0 the memory storage's expiry task (`MemoryStorage.__expire_events`, run by a
    timer thread 10 ms after a hit) deletes a fixed-window counter once its window
    ends, so memory follows the clients seen in the last window. For moving windows
    it only trims each client's list of entries and keeps the empty list, so memory
    would grow with every client address ever seen. A moving window also keeps one
    entry per counted request (about 150 bytes each, measured with tracemalloc),
    where a fixed window keeps one counter per client and category. The cost is that
    a client can spend up to twice its budget in a short span around a window's end.
    The storage is the synchronous one, because the asyncio storage of limits 5.8.0
    runs that expiry scan on the event loop after nearly every hit. Its calls only
    touch memory, so they do not block the loop.

    NOTE: that expiry task scans every counter, at most once per 10 ms while requests
    arrive, so its cost grows with the clients tracked. In one run on a 2-core
    machine, a loop of 1,000 limiter calls a second used 0.07 of a core with one
    counter in memory and 0.45 with 50,000.
    """

    def __init__(
        self,
        limits_by_category: Mapping[RateLimitCategory, limits.RateLimitItem | None],
        trusted_proxies: tuple[IpNetwork, ...] = (),
    ):
        self.limits_by_category = dict(limits_by_category)
        self.trusted_proxies = tuple(trusted_proxies)
        self._storage = MemoryStorage()
        # (category, client) -> the storage key, as limit.key_for(category, client) builds it.
        self._keys: dict[tuple[RateLimitCategory, str], str] = {}
        # Socket peer text -> (canonical address text, whether it is a trusted proxy).
        self._peers: dict[str, tuple[str, bool]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> "ApiRateLimiter":
        """Build the limiter from the `rate_limit_*` and `trusted_proxies` settings."""
        return cls(
            {
                RateLimitCategory.DEFAULT: settings.rate_limit_default,
                RateLimitCategory.DEPLOYMENTS: settings.rate_limit_deployments,
                RateLimitCategory.DATA: settings.rate_limit_data,
                RateLimitCategory.STATUS: settings.rate_limit_status,
                RateLimitCategory.INGRESS: settings.rate_limit_ingress,
            },
            settings.trusted_proxies,
        )

    def reconfigure(self, settings: Settings) -> None:
        """Take new `rate_limit_*` and `trusted_proxies` settings, as on a reload.

        A category whose limit changed starts a new window for every client.
        """
        fresh = ApiRateLimiter.from_settings(settings)
        self.limits_by_category = fresh.limits_by_category
        self.trusted_proxies = fresh.trusted_proxies
        self._keys.clear()
        self._peers.clear()

    @property
    def tracked_windows(self) -> int:
        """Number of (category, client) counters in memory, expired ones not yet removed."""
        return len(self._storage.storage)

    def limit_for(self, category: RateLimitCategory) -> limits.RateLimitItem | None:
        """Return the budget of `category`, or None when it is not limited."""
        return self.limits_by_category.get(category)

    def hit(self, category: RateLimitCategory, client: str) -> RateLimitState:
        """Count one request of `client` in a limited `category` and return its state."""
        limit = self.limits_by_category[category]
        if limit is None:
            raise ValueError(f"category {category} is not limited, so it has no budget to count")

        key = self._storage_key(limit, category, client)
        count = self._storage.incr(key, limit.get_expiry())
        reset_time = self._storage.get_expiry(key)
        now = time.time()
        allowed = count <= limit.amount
        if not allowed:
            self._log_first_rejection(limit, category, client, count, reset_time - now)
        return RateLimitState(
            client=client,
            category=category,
            limit=limit,
            allowed=allowed,
            remaining=max(0, limit.amount - count),
            reset_epoch_seconds=math.ceil(reset_time),
            retry_after_seconds=max(MIN_RETRY_AFTER_SECONDS, math.ceil(reset_time - now)),
        )

    def peer_of(self, remote: str) -> tuple[str, bool]:
        """Return the canonical text of a socket peer address and whether it is a trusted proxy.

        A peer that is not an IP address keeps its text and is not trusted.
        """
        known = self._peers.get(remote)
        if known is not None:
            return known
        if len(self._peers) >= MAX_CACHED_PEERS:
            self._peers.clear()
        known = _classify_peer(remote, self.trusted_proxies)
        self._peers[remote] = known
        return known

    def _storage_key(
        self, limit: limits.RateLimitItem, category: RateLimitCategory, client: str
    ) -> str:
        key = self._keys.get((category, client))
        if key is None:
            if len(self._keys) >= MAX_CACHED_KEYS:
                self._keys.clear()
            key = limit.key_for(category, client)
            self._keys[(category, client)] = key
        return key

    def _log_first_rejection(
        self,
        limit: limits.RateLimitItem,
        category: RateLimitCategory,
        client: str,
        count: int,
        seconds_left: float,
    ) -> None:
        # The fixed window counts rejected requests too, so the first rejection in a
        # window is the one that brings the counter to the limit plus one. Logging only
        # that one keeps a client that keeps trying to one line per window.
        if count == limit.amount + 1:
            logger.info(
                "rate limit reached client=%s category=%s limit=%s window_ends_in=%.0fs",
                client,
                category,
                format_rate_limit(limit),
                seconds_left,
            )


RATE_LIMITER_KEY = web.AppKey("rate_limiter", ApiRateLimiter)
# The category of requests that match no route, when an app sets it: the ingress
# port's app sets `ingress`, because every request it gets is app traffic.
UNMATCHED_CATEGORY_KEY = web.AppKey("unmatched_rate_limit_category", RateLimitCategory)


def setup_rate_limits(app: web.Application, settings: Settings) -> None:
    """Store the limiter built from `settings` on `app`.

    Call it before the app starts, on every app whose API middleware runs
    `count_request`.
    """
    limiter = ApiRateLimiter.from_settings(settings)
    app[RATE_LIMITER_KEY] = limiter

    limits_text = " ".join(
        f"{category}={format_rate_limit(limit)}"
        for category, limit in limiter.limits_by_category.items()
    )
    logger.info(
        "API rate limits per client address: %s trusted_proxies=%d",
        limits_text,
        len(limiter.trusted_proxies),
    )


def setup_node_rate_limits(app: web.Application, node: Any) -> None:
    """Store the node's limiter on `app`, built from the node's settings on first use.

    The API app and the ingress port's app share it, so a client has one budget per
    category on both ports, and a reload of the API's limiter applies to both.
    """
    limiter = getattr(node, "rate_limiter", None)
    if limiter is None:
        setup_rate_limits(app, node.settings)
        node.rate_limiter = app[RATE_LIMITER_KEY]
    else:
        app[RATE_LIMITER_KEY] = limiter


def count_request(request: web.Request) -> None:
    """Count the request in its category's budget, and raise 429 when the budget is spent.

    Needs `setup_rate_limits` on the app. It runs as a check of the API middleware
    (`build_api_middleware` in `voxanode.api.middlewares`), which renders the 429
    ApiError as the error envelope and adds the `X-RateLimit-*` headers.
    """
    limiter = request.app.get(RATE_LIMITER_KEY)
    if limiter is None:
        raise RuntimeError(
            "count_request found no limiter: call setup_rate_limits(app, settings)"
            " before the app starts"
        )

    category = request_category(request)
    if category is None or limiter.limit_for(category) is None:
        request[RATE_LIMIT_STATE_KEY] = None
        return

    client = client_address(request, limiter.trusted_proxies, limiter)
    state = limiter.hit(category, client)
    request[RATE_LIMIT_STATE_KEY] = state
    if not state.allowed:
        logger.debug(
            "rate limited request_id=%s client=%s category=%s retry_after=%ds",
            request_id_of(request),
            client,
            category,
            state.retry_after_seconds,
        )
        raise rate_limit_error(state)


def rate_limit_error(state: RateLimitState) -> ApiError:
    """Build the 429 error for a request over its budget, with Retry-After and the limits."""
    limit_text = format_rate_limit(state.limit)
    description = CATEGORY_DESCRIPTIONS[state.category]
    return ApiError(
        429,
        ErrorCode.RATE_LIMIT_EXCEEDED,
        f"rate limit of {limit_text} for {description} from {state.client} exceeded;"
        f" retry in {state.retry_after_seconds} s",
        {
            "category": str(state.category),
            "limit": limit_text,
            "retry_after_seconds": state.retry_after_seconds,
        },
        headers={**state.headers(), RETRY_AFTER_HEADER: str(state.retry_after_seconds)},
    )


def request_category(request: web.Request) -> RateLimitCategory | None:
    """Return the category of the request's route, or None for the unlimited `/internal/`.

    The route template decides, so a path that matches no route (404, 405) is in the
    default category, whatever it starts with, unless the app sets another one under
    `UNMATCHED_CATEGORY_KEY`.
    """
    resource = request.match_info.route.resource
    if resource is None:
        return request.app.get(UNMATCHED_CATEGORY_KEY, RateLimitCategory.DEFAULT)

    template = resource.canonical
    if template.startswith(INTERNAL_PREFIX):
        return None
    if template.startswith(PROXY_PREFIX) or template == HOST_ROUTE_TEMPLATE:
        return RateLimitCategory.INGRESS
    if template.startswith(STATUS_PREFIX) or template in STATUS_PATHS:
        return RateLimitCategory.STATUS
    if template.startswith(DATA_PREFIX):
        return RateLimitCategory.DATA
    # The apps routes also match the path without its trailing slash.
    if request.method == "POST" and template.rstrip("/") == ADD_APP_PATH.rstrip("/"):
        return RateLimitCategory.DEPLOYMENTS
    return RateLimitCategory.DEFAULT


def client_address(
    request: web.BaseRequest,
    trusted_proxies: tuple[IpNetwork, ...],
    limiter: ApiRateLimiter | None = None,
) -> str:
    """Return the client IP address that the request's budget belongs to.

    That is the socket peer, unless the peer is a trusted proxy and sent a well-formed
    `X-Forwarded-For`. Then it is the right-most address of that header that is not a
    trusted proxy, or the left-most when every address is one. A header with an entry
    that is not a bare IP address is ignored as a whole. With a `limiter`, whose
    trusted proxies must be `trusted_proxies`, the peer is looked up in its cache.

    NOTE: every IPv6 address has a budget of its own, so a client that controls a
    whole /64 network can spread its requests over many budgets.
    """
    # aiohttp takes request.remote from the socket's peer name and never from headers.
    remote = request.remote
    if not remote:
        return UNKNOWN_CLIENT
    if limiter is not None:
        peer, trusted = limiter.peer_of(remote)
    else:
        peer, trusted = _classify_peer(remote, trusted_proxies)
    if not trusted:
        return peer

    header_values = request.headers.getall(FORWARDED_FOR_HEADER, [])
    if not header_values:
        return peer
    entries = [entry.strip() for value in header_values for entry in value.split(",")]
    try:
        forwarded = [_canonical_address(entry) for entry in entries]
    except ValueError:
        logger.debug(
            "ignored malformed X-Forwarded-For request_id=%s from=%s entries=%d",
            request_id_of(request),
            peer,
            len(entries),
        )
        return peer

    for address in reversed(forwarded):
        if not _is_trusted(address, trusted_proxies):
            return str(address)
    return str(forwarded[0])


def _classify_peer(remote: str, trusted_proxies: tuple[IpNetwork, ...]) -> tuple[str, bool]:
    """Return the canonical text of a peer address and whether it is a trusted proxy."""
    try:
        address = _canonical_address(remote)
    except ValueError:
        return remote, False
    return str(address), _is_trusted(address, trusted_proxies)


def _canonical_address(text: str) -> IpAddress:
    """Parse an IP address; an IPv4-mapped IPv6 address becomes the IPv4 address."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_trusted(address: IpAddress, trusted_proxies: tuple[IpNetwork, ...]) -> bool:
    # A network of the other IP version contains no address of this one.
    return any(address in network for network in trusted_proxies)
