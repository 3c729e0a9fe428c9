"""The discovery route: `GET /data/discover_nodes/`, the members in this node's view.

Optional query filters, each given at most once: `status` (online, suspect, offline,
left) and `capability` (matched without regard to case). The reply lists every member
of the local member view that passes them, this node included, with the load it last
announced; `address` is the member's API address. `total_nodes` and `online_nodes`
count the members listed.
"""

from aiohttp import web

from voxanode.api.errors import invalid_field
from voxanode.api.keys import NODE_KEY
from voxanode.api.routes import add_get
from voxanode.api.timestamps import isoformat_utc
from voxanode.membership.state import Member, MemberStatus

DISCOVER_PATH = "/data/discover_nodes/"
STATUS_NAMES = [status.value for status in MemberStatus]
MAX_CAPABILITY_CHARS = 64
FILTER_PARAMETERS = ("status", "capability")


def add_routes(app: web.Application) -> None:
    add_get(app, DISCOVER_PATH, discover_nodes)


async def discover_nodes(request: web.Request) -> web.Response:
    """Return the local member view, filtered by `status` and `capability` if given."""
    node = request.app[NODE_KEY]
    for name in FILTER_PARAMETERS:
        if len(request.query.getall(name, [])) > 1:
            raise invalid_field(name, "must be given at most once")
    status_filter = request.query.get("status")
    capability = request.query.get("capability")
    if status_filter is not None and status_filter not in STATUS_NAMES:
        raise invalid_field("status", f"must be one of {', '.join(STATUS_NAMES)}")
    if capability is not None and not 0 < len(capability) <= MAX_CAPABILITY_CHARS:
        raise invalid_field("capability", f"must be 1 to {MAX_CAPABILITY_CHARS} characters")
    if capability is not None:
        # Capability names are lower case, so APP-DEPLOYMENT finds app-deployment.
        capability = capability.lower()

    members = sorted(node.membership.table.members.values(), key=lambda m: m.node_id)
    shown = [
        member
        for member in members
        if (status_filter is None or member.status.value == status_filter)
        and (capability is None or capability in member.info.capabilities)
    ]
    return web.json_response(
        {
            "success": True,
            "nodes": [_describe(member, node.node_id) for member in shown],
            "total_nodes": len(shown),
            "online_nodes": sum(1 for m in shown if m.status is MemberStatus.ONLINE),
        }
    )


def _describe(member: Member, own_node_id: str) -> dict:
    info = member.info
    load = info.load
    return {
        "node_id": member.node_id,
        "address": f"{info.api_address[0]}:{info.api_address[1]}",
        "peer_address": f"{info.peer_address[0]}:{info.peer_address[1]}",
        "status": member.status.value,
        "capabilities": list(info.capabilities),
        "load": {
            # Announcements carry one decimal, but this node's own entry is its unrounded sample.
            "cpu_percent": round(load.cpu_percent, 1),
            "memory_percent": round(load.memory_percent, 1),
            "active_apps": load.active_apps,
            "memory_free_mb": load.memory_free_mb,
            "cpu_free_cores": round(load.cpu_free_cores, 2),
            "cpu_cores": load.cpu_cores,
        },
        # A node hears from itself all the time: its own entry is seen now.
        "last_seen": isoformat_utc(None if member.node_id == own_node_id else member.last_seen),
        "version": info.version,
        "incarnation": info.incarnation,
        "sequence": info.sequence,
        "is_self": member.node_id == own_node_id,
    }
