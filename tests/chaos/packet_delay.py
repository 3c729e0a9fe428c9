"""Hold the packets that iptables queues to an NFQUEUE queue for a set time, then accept them.

Usage: python packet_delay.py --queue N --delay-ms D [--jitter-ms J]

The kernel of the CI machine has no netem qdisc, so the delay comes from user space.
An iptables rule `-j NFQUEUE --queue-num N --queue-bypass` hands each matching packet
to this program through netfilter's netlink queue protocol (linux/netfilter/
nfnetlink_queue.h). The program keeps the packet's id and, once D ms (plus a uniform
random 0..J ms) have passed, sends the kernel an ACCEPT verdict for it. Only packet
metadata is copied to user space. The queue fails open: when it is full, packets pass
at once instead of being dropped. With --queue-bypass in the rule, packets also pass
while no program is bound to the queue.

It prints "ready" once bound to the queue and "delayed N packets" when it ends, which
is on SIGTERM or when its parent process ends. Exit codes: 0 after a stop, 2 when the
queue cannot be bound (for example, another process has bound it).
"""

import argparse
import heapq
import os
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
NLMSG_HEADER = struct.Struct("=IHHII")
NFGEN_HEADER_BYTES = 4
ATTRIBUTE_HEADER = struct.Struct("=HH")
# Attribute types carry flag bits above the type number.
ATTRIBUTE_TYPE_MASK = 0x3FFF
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN = 0x1
NF_ACCEPT = 1
QUEUE_MAX_PACKETS = 8192
RECEIVE_BUFFER_BYTES = 8 * 1024 * 1024
RECEIVE_CHUNK_BYTES = 256 * 1024
# How often, at most, the program checks whether its parent still runs.
PARENT_CHECK_SECONDS = 1.0
EXIT_BIND_FAILED = 2


def attribute(kind: int, payload: bytes) -> bytes:
    length = ATTRIBUTE_HEADER.size + len(payload)
    padding = b"\0" * (-length % 4)
    return ATTRIBUTE_HEADER.pack(length, kind) + payload + padding


class NetfilterQueue:
    """One bound NFQUEUE queue: receives packet ids, sends verdicts."""

    def __init__(self, queue: int) -> None:
        self.queue = queue
        self.sequence = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)

    def _message(self, kind: int, flags: int, attributes: list[bytes]) -> bytes:
        self.sequence += 1
        # nfgenmsg: address family, netlink version 0, and the queue number (big-endian).
        body = struct.pack("!BBH", socket.AF_UNSPEC, 0, self.queue) + b"".join(attributes)
        header = NLMSG_HEADER.pack(NLMSG_HEADER.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, self.sequence, 0)
        return header + body

    def _configure(self, attributes: list[bytes]) -> None:
        """Send one config message and raise OSError when the kernel rejects it."""
        self.sock.send(self._message(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, attributes))
        reply = self.sock.recv(RECEIVE_CHUNK_BYTES)
        _, kind, _, _, _ = NLMSG_HEADER.unpack_from(reply)
        if kind == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", reply, NLMSG_HEADER.size)
            if error:
                raise OSError(-error, f"{os.strerror(-error)} (queue {self.queue})")

    def bind(self) -> None:
        # The queue number (in the message header) is what binds; the iptables rules choose the packets.
        self._configure([attribute(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET))])
        self._configure([attribute(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))])
        self._configure([attribute(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAX_PACKETS))])
        fail_open = struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)
        self._configure([attribute(NFQA_CFG_MASK, fail_open), attribute(NFQA_CFG_FLAGS, fail_open)])

    def receive_packet_ids(self) -> list[int]:
        """Read one batch of netlink messages and return the ids of the queued packets."""
        data = self.sock.recv(RECEIVE_CHUNK_BYTES)
        ids = []
        offset = 0
        while offset + NLMSG_HEADER.size <= len(data):
            length, kind, _, _, _ = NLMSG_HEADER.unpack_from(data, offset)
            if length < NLMSG_HEADER.size:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                ids.extend(self._packet_ids(data, offset + NLMSG_HEADER.size + NFGEN_HEADER_BYTES, offset + length))
            offset += (length + 3) & ~3
        return ids

    @staticmethod
    def _packet_ids(data: bytes, start: int, end: int) -> list[int]:
        position = start
        while position + ATTRIBUTE_HEADER.size <= end:
            length, kind = ATTRIBUTE_HEADER.unpack_from(data, position)
            if length < ATTRIBUTE_HEADER.size:
                break
            if kind & ATTRIBUTE_TYPE_MASK == NFQA_PACKET_HDR:
                # nfqnl_msg_packet_hdr: packet id (big-endian u32), hardware protocol, hook.
                return [struct.unpack_from("!I", data, position + ATTRIBUTE_HEADER.size)[0]]
            position += (length + 3) & ~3
        return []

    def accept(self, packet_id: int) -> None:
        verdict = attribute(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))
        # Without NLM_F_REQUEST the kernel ignores the message.
        self.sock.send(self._message(NFQNL_MSG_VERDICT, NLM_F_REQUEST, [verdict]))


def run(queue: NetfilterQueue, delay_seconds: float, jitter_seconds: float, stop_requested) -> int:
    """Delay packets until `stop_requested()` or the parent ends; return how many were delayed."""
    parent = os.getppid()
    pending: list[tuple[float, int]] = []
    delayed = 0
    next_parent_check = time.monotonic() + PARENT_CHECK_SECONDS
    while not stop_requested():
        now = time.monotonic()
        if now >= next_parent_check:
            if os.getppid() != parent:
                break
            next_parent_check = now + PARENT_CHECK_SECONDS
        wait = min(PARENT_CHECK_SECONDS, pending[0][0] - now) if pending else PARENT_CHECK_SECONDS
        try:
            readable, _, _ = select.select([queue.sock], [], [], max(0.0, wait))
        except InterruptedError:
            continue
        if readable:
            try:
                packet_ids = queue.receive_packet_ids()
            except OSError as error:
                # ENOBUFS: the kernel dropped messages the socket had no room for.
                print(f"receiving from queue {queue.queue} failed: {error}", file=sys.stderr, flush=True)
                packet_ids = []
            received_at = time.monotonic()
            for packet_id in packet_ids:
                due = received_at + delay_seconds + random.uniform(0.0, jitter_seconds)
                heapq.heappush(pending, (due, packet_id))
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, packet_id = heapq.heappop(pending)
            queue.accept(packet_id)
            delayed += 1
    # Packets still held pass now rather than wait for a verdict that never comes.
    for _, packet_id in pending:
        queue.accept(packet_id)
    return delayed + len(pending)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue", type=int, required=True, help="NFQUEUE queue number, 0-65535")
    parser.add_argument("--delay-ms", type=float, required=True, help="time each packet is held, in milliseconds")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="random extra hold time, 0 to this many milliseconds")
    args = parser.parse_args(argv)

    stopping = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    queue = NetfilterQueue(args.queue)
    try:
        queue.bind()
    except OSError as error:
        print(f"binding NFQUEUE queue failed: {error}", file=sys.stderr, flush=True)
        return EXIT_BIND_FAILED
    print("ready", flush=True)
    delayed = run(queue, args.delay_ms / 1000, args.jitter_ms / 1000, lambda: bool(stopping))
    print(f"delayed {delayed} packets", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
