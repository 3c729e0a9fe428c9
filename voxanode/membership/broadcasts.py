"""The queue of membership updates waiting to ride on outgoing messages.

Each update is sent a bounded number of times, `retransmit_mult * ceil(log10(N + 1))`
for N members. With that bound, infection-style dissemination reaches every member
with high probability in O(log N) rounds, which bench/gossip_sim.py measures. The updates sent least often go
first, and a newer update about a member replaces the queued older one.
"""

import math
from dataclasses import dataclass

# Wire tags of the update kinds.
UPDATE_ALIVE = 0
UPDATE_SUSPECT = 1
UPDATE_DEAD = 2


@dataclass
class _Queued:
    entry: list
    size_bytes: int
    transmits: int
    order: int


def transmit_limit(retransmit_mult: int, member_count: int) -> int:
    """Return how many times each update is sent in a network of `member_count` nodes."""
    return retransmit_mult * max(1, math.ceil(math.log10(member_count + 1)))


class BroadcastQueue:
    """Updates about members, each sent at most `transmit_limit` times."""

    def __init__(self, retransmit_mult: int):
        self.retransmit_mult = retransmit_mult
        self._queued: dict[bytes, _Queued] = {}
        self._counter = 0

    def __len__(self) -> int:
        return len(self._queued)

    def add(self, subject_id: bytes, entry: list, size_bytes: int) -> None:
        """Queue an update about `subject_id`, replacing any queued one about it."""
        self._counter += 1
        self._queued[subject_id] = _Queued(entry, size_bytes, 0, self._counter)

    def take(self, member_count: int, max_entries: int, max_bytes: int) -> list[list]:
        """Return updates for one message and count them as sent once more."""
        if not self._queued:
            return []
        limit = transmit_limit(self.retransmit_mult, member_count)
        candidates = sorted(
            self._queued.items(), key=lambda item: (item[1].transmits, -item[1].order)
        )
        chosen: list[list] = []
        used = 0
        for subject_id, queued in candidates:
            if len(chosen) >= max_entries:
                break
            if used + queued.size_bytes > max_bytes:
                continue
            chosen.append(queued.entry)
            used += queued.size_bytes
            queued.transmits += 1
            if queued.transmits >= limit:
                del self._queued[subject_id]
        return chosen
