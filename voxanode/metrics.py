"""Prometheus metrics of one node: `build_registry` and the `NodeCollector` it registers.

The collector reads the counters that the node's parts already keep when `/metrics`
is scraped: the API's RequestStats, the peer protocol, the data service, the member
table, the app controller and its Docker runtime. So the request and datagram paths
pay only for their own plain counters and take no lock. Each node gets a registry of
its own rather than prometheus_client's global one, because tests run several nodes
in one process.

Some parts may be missing, such as the peer socket before it is bound or the app
controller before it is created, or may be test stand-ins for the real classes.
The scrape leaves out such a part with its metric families.
"""

import logging
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from voxanode import __version__
from voxanode.api.stats import LATENCY_BUCKET_BOUNDS_MS, RequestStats
from voxanode.apps.catalogue import APP_PHASES, INSTANCE_STATES
from voxanode.dht.records import now_millis
from voxanode.dht.service import DataService
from voxanode.dht.store import RecordStore, StoreError
from voxanode.membership.state import MemberStatus
from voxanode.membership.swim import Membership
from voxanode.peer.protocol import PeerProtocol

# Peer methods of the SWIM membership protocol start with this prefix. Their counts
# are reported as gossip messages by kind (the method without the prefix), and every
# other peer method as a DHT RPC.
GOSSIP_METHOD_PREFIX = "swim_"
MS_PER_SECOND = 1000.0

logger = logging.getLogger(__name__)


def build_registry(node: Any, stats: RequestStats, router: web.UrlDispatcher) -> CollectorRegistry:
    """Return a new registry with the node's collector and the process collector."""
    registry = CollectorRegistry()
    registry.register(NodeCollector(node, stats, router))
    ProcessCollector(registry=registry)
    return registry


class NodeCollector(Collector):
    """The `voxanode_*` metric families of one node, read from its counters at scrape time."""

    def __init__(self, node: Any, stats: RequestStats, router: web.UrlDispatcher):
        self.node = node
        self.stats = stats
        self.router = router
        self._route_labels: dict[str, str] | None = None

    def describe(self) -> list[Metric]:
        # Without describe() the registry would call collect() when the collector is
        # registered, before the node's parts exist. No names are checked for clashes.
        return []

    def collect(self) -> Iterator[Metric]:
        yield _node_info(self.node)
        yield from self._http_families()
        protocol = getattr(self.node, "protocol", None)
        if isinstance(protocol, PeerProtocol):
            yield from peer_families(protocol)
        store = getattr(self.node, "store", None)
        if isinstance(store, RecordStore):
            yield from records_held_families(store)
        data = getattr(self.node, "data", None)
        if isinstance(data, DataService):
            yield from data_families(data)
        membership = getattr(self.node, "membership", None)
        if isinstance(membership, Membership):
            yield from membership_families(membership)
        # The app controller is imported late with the Docker SDK, so it is not
        # checked by class here; only the node sets this attribute.
        apps = getattr(self.node, "apps", None)
        if apps is not None:
            yield from app_families(apps)

    # -- HTTP ------------------------------------------------------------------------

    def route_labels(self) -> dict[str, str]:
        """Map each route template to its label: the first registered of its slash twins.

        `add_get` and `add_post` register a path and then its twin with the trailing
        slash added or removed, so both forms of a route count under the documented one.
        """
        if self._route_labels is None:
            labels: dict[str, str] = {}
            first_of_pair: dict[str, str] = {}
            for resource in self.router.resources():
                template = resource.canonical
                pair_key = template.rstrip("/") or "/"
                labels[template] = first_of_pair.setdefault(pair_key, template)
            self._route_labels = labels
        return self._route_labels

    def _http_families(self) -> Iterator[Metric]:
        labels = self.route_labels()
        requests = CounterMetricFamily(
            "voxanode_http_requests",
            "API responses sent, by route template ('unmatched' for unknown paths and"
            " methods a path does not serve), HTTP method and status. App traffic through"
            " /proxy/ is not counted here but in voxanode_ingress_requests.",
            labels=["route", "method", "status"],
        )
        merged: Counter[tuple[str, str, str]] = Counter()
        for (route, method, status), count in self.stats.responses.items():
            merged[(labels.get(route, route), method, str(status))] += count
        for key in sorted(merged):
            requests.add_metric(list(key), merged[key])
        yield requests

        yield http_latency_family(self.stats, labels)


def http_latency_family(stats: RequestStats, route_labels: Mapping[str, str]) -> Metric:
    """Build the latency histogram of the API's responses by route from `stats`."""
    histogram = HistogramMetricFamily(
        "voxanode_http_request_duration_seconds",
        "Time from the start of the API middleware to the handler's response, by route."
        " App traffic through /proxy/ is not counted.",
        labels=["route"],
    )
    bucket_counts: dict[str, list[int]] = {}
    totals_ms: Counter[str] = Counter()
    for route, latency in stats.latencies.items():
        label = route_labels.get(route, route)
        counts = bucket_counts.setdefault(label, [0] * len(latency.bucket_counts))
        for index, count in enumerate(latency.bucket_counts):
            counts[index] += count
        totals_ms[label] += latency.total_ms

    bounds = [floatToGoString(bound / MS_PER_SECOND) for bound in LATENCY_BUCKET_BOUNDS_MS]
    bounds.append("+Inf")
    for label in sorted(bucket_counts):
        cumulative = 0
        buckets = []
        for bound, count in zip(bounds, bucket_counts[label]):
            cumulative += count
            buckets.append((bound, cumulative))
        histogram.add_metric([label], buckets, totals_ms[label] / MS_PER_SECOND)
    return histogram


# -- the peer protocol: RPCs, gossip messages, datagrams --------------------------------


def peer_families(protocol: PeerProtocol) -> Iterator[Metric]:
    """Build the DHT RPC, gossip message and datagram families of the peer protocol."""
    outcomes = (
        ("sent", "sent by this node", protocol.requests_sent),
        ("received", "received from peers and accepted for handling", protocol.requests_received),
        ("failed", "sent by this node that the peer answered with an error", protocol.requests_failed),
        ("timed_out", "sent by this node that got no reply in time", protocol.requests_timed_out),
    )
    for outcome, meaning, counts in outcomes:
        rpcs = CounterMetricFamily(
            f"voxanode_dht_rpcs_{outcome}",
            f"DHT requests {meaning}, by method.",
            labels=["method"],
        )
        messages = CounterMetricFamily(
            f"voxanode_gossip_messages_{outcome}",
            f"Membership (SWIM) messages {meaning}, by kind.",
            labels=["kind"],
        )
        for method, count in sorted(counts.items()):
            if method.startswith(GOSSIP_METHOD_PREFIX):
                messages.add_metric([method.removeprefix(GOSSIP_METHOD_PREFIX)], count)
            else:
                rpcs.add_metric([method], count)
        yield rpcs
        yield messages

    dropped = CounterMetricFamily(
        "voxanode_peer_datagrams_dropped",
        "Incoming peer datagrams dropped, by reason; 'unsealed' counts datagrams that"
        " did not open with the network key.",
        labels=["reason"],
    )
    for reason, count in sorted(protocol.dropped.items()):
        dropped.add_metric([reason], count)
    yield dropped

    for name, documentation, value in (
        ("voxanode_peer_datagrams_sent", "Peer datagrams sent.", protocol.datagrams_sent),
        ("voxanode_peer_datagrams_received", "Peer datagrams received, dropped ones included.", protocol.datagrams_received),
        ("voxanode_peer_sent_bytes", "Bytes of peer datagrams sent.", protocol.bytes_sent),
        ("voxanode_peer_received_bytes", "Bytes of peer datagrams received.", protocol.bytes_received),
    ):
        yield CounterMetricFamily(name, documentation, value=value)
    yield GaugeMetricFamily(
        "voxanode_dht_routing_table_peers",
        "Contacts in this node's Kademlia routing table.",
        value=sum(len(bucket) for bucket in protocol.router.buckets),
    )


# -- records and membership --------------------------------------------------------------


def records_held_families(store: RecordStore) -> Iterator[Metric]:
    """Build the gauge of unexpired records held, left out when the query fails.

    NOTE: the count is a SQLite query over the expiry index, so a scrape takes time
    that grows with the records held.
    """
    try:
        records = store.count(now_millis())
    except (sqlite3.Error, StoreError) as error:
        logger.warning("metrics: cannot count the records held in %s: %s", store.path, error)
        return
    yield GaugeMetricFamily(
        "voxanode_dht_records", "Unexpired records held by this node.", value=records
    )


def data_families(data: DataService) -> Iterator[Metric]:
    """Build the republish and rejection counters of the data service."""
    for name, documentation, value in (
        (
            "voxanode_dht_republish_rounds",
            "Republish rounds run, each checking every held record on its closest nodes.",
            data.republish_rounds,
        ),
        (
            "voxanode_dht_records_republished",
            "Records stored on a peer by republish rounds because it lacked them.",
            data.records_republished,
        ),
        (
            "voxanode_dht_records_rejected",
            "Records from peers rejected as invalid (signature, size or times).",
            data.records_rejected,
        ),
    ):
        yield CounterMetricFamily(name, documentation, value=value)


def membership_families(membership: Membership) -> Iterator[Metric]:
    """Build the member count by state and the rejected update counter."""
    by_state = Counter(member.status for member in membership.table.members.values())
    members = GaugeMetricFamily(
        "voxanode_members",
        "Members in this node's view of the network, this node included, by state.",
        labels=["state"],
    )
    for status in MemberStatus:
        members.add_metric([status.value], by_state.get(status, 0))
    yield members
    yield CounterMetricFamily(
        "voxanode_gossip_updates_rejected",
        "Member announcements rejected as malformed or wrongly signed.",
        value=membership.rejected_updates,
    )


# -- apps ------------------------------------------------------------------------------


def app_families(apps: Any) -> Iterator[Metric]:
    """Build the app and instance counts and the Docker runtime's families."""
    local = apps.agent.report().instances.values()
    yield _state_gauge(
        "voxanode_app_instances",
        "App instances on this node, by state.",
        (state.status for state in local),
    )
    catalogue = apps.catalogue
    yield _state_gauge(
        "voxanode_catalogue_app_instances",
        "App instances on every node as this node's catalogue has them, by state.",
        (
            state.status
            for report in catalogue.reports.values()
            for state in report.instances.values()
        ),
    )
    phases = GaugeMetricFamily(
        "voxanode_catalogue_apps", "Apps in this node's catalogue, by phase.", labels=["phase"]
    )
    by_phase = Counter(record.phase for record in catalogue.apps.values())
    for phase in APP_PHASES:
        phases.add_metric([phase], by_phase.get(phase, 0))
    yield phases

    runtime = getattr(apps, "runtime", None)
    if runtime is not None:
        yield GaugeMetricFamily(
            "voxanode_docker_engine_available",
            "1 when the Docker engine answered the runtime's last call, else 0.",
            value=1 if runtime.available else 0,
        )
        for family in runtime.call_durations.collect():
            # Each series' creation time is not a figure an operator charts.
            family.samples = [sample for sample in family.samples if not sample.name.endswith("_created")]
            yield family

    ingress = getattr(apps, "ingress", None)
    if ingress is not None:
        yield from ingress_families(ingress)


def ingress_families(ingress: Any) -> Iterator[Metric]:
    """Build the families of app traffic that passed through this node's ingress."""
    requests = CounterMetricFamily(
        "voxanode_ingress_requests",
        "App traffic requests forwarded by this node's ingress, by app id and status"
        " class; the proxy's own 502, 503 and 504 count as 5xx.",
        labels=["app", "status_class"],
    )
    failures = CounterMetricFamily(
        "voxanode_ingress_upstream_failures",
        "Forwarding attempts whose connection to an instance failed, timed out or was"
        " reset before a response, or whose response did not parse, by app id.",
        labels=["app"],
    )
    durations = HistogramMetricFamily(
        "voxanode_ingress_request_duration_seconds",
        "Time from the request's arrival to the end of the app's reply, by app id.",
        labels=["app"],
    )
    bounds = [floatToGoString(bound / MS_PER_SECOND) for bound in LATENCY_BUCKET_BOUNDS_MS]
    bounds.append("+Inf")
    for app_id, traffic in sorted(ingress.traffic.items()):
        for status_class, count in sorted(traffic.status_classes.items()):
            requests.add_metric([app_id, status_class], count)
        failures.add_metric([app_id], traffic.upstream_failures)
        cumulative = 0
        buckets = []
        for bound, count in zip(bounds, traffic.bucket_counts):
            cumulative += count
            buckets.append((bound, cumulative))
        durations.add_metric([app_id], buckets, traffic.total_ms / MS_PER_SECOND)
    yield requests
    yield failures
    yield durations

    circuits = GaugeMetricFamily(
        "voxanode_ingress_circuits",
        "Instances in this node's ingress rotation, by app id and circuit breaker state"
        " (closed, open, half_open).",
        labels=["app", "state"],
    )
    for app_id, state, count in ingress.circuit_states():
        circuits.add_metric([app_id, state], count)
    yield circuits


def _state_gauge(name: str, documentation: str, states: Iterable[str]) -> Metric:
    gauge = GaugeMetricFamily(name, documentation, labels=["state"])
    counts = Counter(states)
    for state in INSTANCE_STATES:
        gauge.add_metric([state], counts.get(state, 0))
    return gauge


def _node_info(node: Any) -> Metric:
    info = GaugeMetricFamily(
        "voxanode_node_info",
        "Always 1; the labels give this node's id and software version.",
        labels=["node_id", "version"],
    )
    info.add_metric([str(getattr(node, "node_id", "")), __version__], 1)
    return info
