"""Member state: signed node announcements and the member table with SWIM's merge rules.

Each node announces itself with a `NodeInfo` that it signs with its own key: its
addresses, version, capabilities, load and incarnation number. Gossip carries these
announcements verbatim, so no node can claim another node's address or load. Claims
that a member is suspect or dead come from the member's peers and carry only the
member's id and the incarnation they refer to. The member refutes them by announcing
a higher incarnation.

Order of precedence for one member, following SWIM's suspicion mechanism:
- an announcement with a higher incarnation replaces everything older;
- at equal incarnation, suspect overrides online and dead overrides both;
- an announcement with `leaving` set marks the member as left at that incarnation.
"""

import enum
import time
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from voxanode.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Identity,
    dht_id_for,
    readable_node_id,
    verify_signature,
)

INFO_FORMAT_VERSION = 1
MAX_INFO_BYTES = 1024
MAX_CAPABILITIES = 8
MAX_TEXT_CHARS = 64


class MemberStatus(str, enum.Enum):
    """A member's status in this node's view; the values appear in the API."""

    ONLINE = "online"
    SUSPECT = "suspect"
    OFFLINE = "offline"
    LEFT = "left"


class InfoError(ValueError):
    """A node announcement is malformed or its signature does not match."""


@dataclass(frozen=True)
class NodeLoad:
    """A node's load when it last announced itself."""

    cpu_percent: float = 0.0
    memory_percent: float = 0.0
    active_apps: int = 0
    memory_free_mb: int = 0
    cpu_free_cores: float = 0.0
    cpu_cores: int = 0

    def encode(self) -> list:
        return [
            round(self.cpu_percent, 1),
            round(self.memory_percent, 1),
            self.active_apps,
            self.memory_free_mb,
            round(self.cpu_free_cores, 2),
            self.cpu_cores,
        ]

    @classmethod
    def decode(cls, fields: Any) -> "NodeLoad":
        if not isinstance(fields, list) or len(fields) != 6:
            raise InfoError("load must be a list of 6 numbers")
        cpu, memory, apps, free_mb, free_cores, cores = fields
        for value in fields:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise InfoError("load values must be non-negative numbers")
        if not all(isinstance(value, int) for value in (apps, free_mb, cores)):
            raise InfoError("active apps, free memory and cores must be integers")
        return cls(float(cpu), float(memory), apps, free_mb, float(free_cores), cores)


@dataclass(frozen=True)
class NodeInfo:
    """A node's signed announcement of itself."""

    public_key: bytes
    incarnation: int
    sequence: int
    peer_address: tuple[str, int]
    api_address: tuple[str, int]
    version: str
    capabilities: tuple[str, ...]
    load: NodeLoad
    leaving: bool
    signature: bytes = b""
    encoded: bytes = field(default=b"", compare=False, repr=False)

    @property
    def dht_id(self) -> bytes:
        return dht_id_for(self.public_key)

    @property
    def node_id(self) -> str:
        return readable_node_id(self.dht_id)

    @property
    def order(self) -> tuple[int, int]:
        """Newer announcements of the same node compare greater."""
        return (self.incarnation, self.sequence)


def _signed_fields(info: NodeInfo) -> list:
    return [
        INFO_FORMAT_VERSION,
        info.public_key,
        info.incarnation,
        info.sequence,
        list(info.peer_address),
        list(info.api_address),
        info.version,
        list(info.capabilities),
        info.load.encode(),
        info.leaving,
    ]


def sign_node_info(identity: Identity, info: NodeInfo) -> NodeInfo:
    """Return `info` signed with this node's key, with its encoded form filled in."""
    fields = _signed_fields(info)
    signed = msgpack.packb(["voxanode-node-info"] + fields, use_bin_type=True)
    signature = identity.sign(signed)
    encoded = msgpack.packb(fields + [signature], use_bin_type=True)
    return replace(info, signature=signature, encoded=encoded)


def _address(value: Any, name: str) -> tuple[str, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], str)
        or not 0 < len(value[0]) <= MAX_TEXT_CHARS
        or not isinstance(value[1], int)
        or isinstance(value[1], bool)
        or not 0 < value[1] < 65536
    ):
        raise InfoError(f"{name} must be [host, port]")
    return (value[0], value[1])


def decode_node_info(data: bytes) -> NodeInfo:
    """Parse an announcement and verify its signature; raise InfoError if it fails."""
    if not isinstance(data, bytes) or len(data) > MAX_INFO_BYTES:
        raise InfoError("announcement must be bytes within the size limit")
    try:
        fields = msgpack.unpackb(
            data,
            raw=False,
            max_bin_len=MAX_INFO_BYTES,
            max_str_len=MAX_INFO_BYTES,
            max_array_len=16,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as error:
        raise InfoError(f"announcement is not valid msgpack ({type(error).__name__})") from None
    if not isinstance(fields, list) or len(fields) != 11:
        raise InfoError("announcement must be a list of 11 fields")

    (version_tag, public_key, incarnation, sequence, peer, api, version, capabilities,
     load, leaving, signature) = fields
    if version_tag != INFO_FORMAT_VERSION:
        raise InfoError(f"unsupported announcement format {version_tag!r}")
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise InfoError("public key must be 32 bytes")
    for name, number in (("incarnation", incarnation), ("sequence", sequence)):
        if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number < 2**63:
            raise InfoError(f"{name} must be a non-negative integer")
    if not isinstance(version, str) or len(version) > MAX_TEXT_CHARS:
        raise InfoError("version must be a short string")
    if (
        not isinstance(capabilities, list)
        or len(capabilities) > MAX_CAPABILITIES
        or not all(isinstance(c, str) and 0 < len(c) <= MAX_TEXT_CHARS for c in capabilities)
    ):
        raise InfoError("capabilities must be a short list of names")
    if not isinstance(leaving, bool):
        raise InfoError("leaving must be a boolean")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise InfoError("signature must be 64 bytes")

    info = NodeInfo(
        public_key=public_key,
        incarnation=incarnation,
        sequence=sequence,
        peer_address=_address(peer, "peer address"),
        api_address=_address(api, "API address"),
        version=version,
        capabilities=tuple(capabilities),
        load=NodeLoad.decode(load),
        leaving=leaving,
        signature=signature,
        encoded=data,
    )
    signed = msgpack.packb(["voxanode-node-info"] + _signed_fields(info), use_bin_type=True)
    if not verify_signature(public_key, signature, signed):
        raise InfoError("announcement signature does not match its public key")
    return info


class Change(str, enum.Enum):
    """The kind of change a merge made to a member, for events and logs."""

    JOINED = "joined"
    REJOINED = "rejoined"
    UPDATED = "updated"
    SUSPECTED = "suspected"
    FAILED = "failed"
    LEFT = "left"


@dataclass
class Member:
    """One node in this node's member view."""

    info: NodeInfo
    status: MemberStatus
    # The incarnation the status refers to; a suspicion is only cleared by an
    # announcement with a higher one.
    status_incarnation: int
    last_seen: float
    status_since: float

    @property
    def dht_id(self) -> bytes:
        return self.info.dht_id

    @property
    def node_id(self) -> str:
        return self.info.node_id

    @property
    def reachable(self) -> bool:
        return self.status in (MemberStatus.ONLINE, MemberStatus.SUSPECT)


class MemberTable:
    """The members in this node's view, itself included, merged by SWIM's rules."""

    def __init__(self, own_id: bytes):
        self.own_id = own_id
        self.members: dict[bytes, Member] = {}

    def get(self, dht_id: bytes) -> Member | None:
        return self.members.get(dht_id)

    def __len__(self) -> int:
        return len(self.members)

    def others(self) -> list[Member]:
        return [m for m in self.members.values() if m.dht_id != self.own_id]

    def reachable_others(self) -> list[Member]:
        return [m for m in self.others() if m.reachable]

    def is_news(self, dht_id: bytes, incarnation: int, sequence: int) -> bool:
        """Return whether an announcement with this order would change anything here.

        Checked before the signature, so repeats of known announcements cost nothing.
        """
        member = self.members.get(dht_id)
        return member is None or (incarnation, sequence) > member.info.order

    def apply_info(self, info: NodeInfo, now: float) -> Change | None:
        """Merge a verified announcement; return what changed, or None if it was old."""
        member = self.members.get(info.dht_id)
        if member is None:
            status = MemberStatus.LEFT if info.leaving else MemberStatus.ONLINE
            self.members[info.dht_id] = Member(info, status, info.incarnation, now, now)
            return Change.LEFT if info.leaving else Change.JOINED
        if info.order <= member.info.order:
            return None

        previous = member.status
        member.info = info
        member.last_seen = now
        if info.leaving:
            status = MemberStatus.LEFT
        elif info.incarnation > member.status_incarnation:
            # A higher incarnation refutes any suspicion or failure claim.
            status = MemberStatus.ONLINE
        else:
            # Same incarnation: the load and details change, a suspicion remains.
            status = previous
        if status is not previous or info.incarnation > member.status_incarnation:
            member.status_incarnation = info.incarnation
        if status is not previous:
            member.status = status
            member.status_since = now

        if status is MemberStatus.LEFT and previous is not MemberStatus.LEFT:
            return Change.LEFT
        if previous in (MemberStatus.OFFLINE, MemberStatus.LEFT) and status is MemberStatus.ONLINE:
            return Change.REJOINED
        return Change.UPDATED

    def apply_suspect(self, dht_id: bytes, incarnation: int, now: float) -> Change | None:
        """Mark a member suspect if the claim refers to its current incarnation or later."""
        member = self.members.get(dht_id)
        if member is None or incarnation < member.info.incarnation:
            return None
        if member.status is not MemberStatus.ONLINE:
            return None
        member.status = MemberStatus.SUSPECT
        member.status_incarnation = incarnation
        member.status_since = now
        return Change.SUSPECTED

    def apply_dead(self, dht_id: bytes, incarnation: int, now: float) -> Change | None:
        """Mark a member offline if the claim refers to its current incarnation or later."""
        member = self.members.get(dht_id)
        if member is None or incarnation < member.info.incarnation:
            return None
        if member.status in (MemberStatus.OFFLINE, MemberStatus.LEFT):
            return None
        member.status = MemberStatus.OFFLINE
        member.status_incarnation = incarnation
        member.status_since = now
        return Change.FAILED

    def touch(self, dht_id: bytes, now: float) -> None:
        """Record that a member was heard from directly."""
        member = self.members.get(dht_id)
        if member is not None and member.reachable:
            member.last_seen = now

    def forget_older_than(self, cutoff: float) -> list[Member]:
        """Drop offline and left members whose status is older than `cutoff`."""
        forgotten = [m for m in self.others() if not m.reachable and m.status_since < cutoff]
        for member in forgotten:
            del self.members[member.dht_id]
        return forgotten


def monotonic_incarnation() -> int:
    """Return a start incarnation that grows across restarts: the wall clock in ms."""
    return int(time.time() * 1000)
