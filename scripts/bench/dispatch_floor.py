#!/usr/bin/env python3
"""The kernel's floor under the cached dispatch path (issue 16): what sending cached entries to a
consumer over loopback TCP and receiving its acknowledgements costs in system time, with no
broker in between. Compare its system time per delivered message with the broker's user +
system time per delivered message (`drain_round.sh`), in the same minutes.

The server does only the system calls dispatch cannot do without: it sends each entry (128
messages of 1 KiB with their metadata, as the `pulsar` crate batches them) as one MESSAGE-sized
frame (entries taken in turn from --pool-mib of distinct bytes, so not in the CPU's caches),
all that --window allows ahead of the consumer's acknowledgements (its permits) in one
writev, and reads the acknowledgements (without --nagle, woken once an entry's worth is in). The consumer reads
one entry at a time (paced to --rate) and answers each message with an ACK-sized write
(--ack-bytes), as the `pulsar` crate does; with --nagle its small writes share segments as the
crate's do (the broker receives about one segment per entry from it), without it each is a
segment; --bulk-acks writes an entry's ACKs at once. Reported: the server's system time per
delivered message (its user time is Python's and is not counted), its voluntary context
switches and the TCP segments it received per entry.

    python3 scripts/bench/dispatch_floor.py                       # 3 rounds of 8 s
    python3 scripts/bench/dispatch_floor.py --rate 43000 --nagle  # as drain_round.sh's consumer
    python3 scripts/bench/dispatch_floor.py --rounds 5 --seconds 5 --window 1000
"""
import argparse, resource, socket, sys, time
from multiprocessing import Pipe, Process


def consumer(port, args):
    """Reads entries and answers each message with an ACK-sized frame, until the server closes;
    with a `rate`, no faster than that many messages per second (a consumer that sets the pace:
    the broker's drain runs at the `pulsar` crate consumer's rate)."""
    sock = socket.create_connection(("127.0.0.1", port))
    if not args.nagle:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        consume(sock, args)
    except ConnectionError:
        pass  # the server's window is over
    sock.close()


def consume(sock, args):
    """One entry at a time, as an application takes the messages: it is read whole, the pace is
    kept, then its messages are acknowledged."""
    entry = memoryview(bytearray(args.entry_bytes))
    ack = b"a" * args.ack_bytes
    started, consumed = time.monotonic(), 0
    while True:
        got = 0
        while got < len(entry):
            received = sock.recv_into(entry[got:])
            if received == 0:
                return
            got += received
        consumed += args.messages_per_entry
        if args.rate:
            ahead = consumed / args.rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        if args.bulk_acks:
            sock.sendall(ack * args.messages_per_entry)
        else:
            for _ in range(args.messages_per_entry):
                sock.sendall(ack)


def tcp_segments_in(sock):
    """`tcpi_segs_in` of the socket's `struct tcp_info` (Linux): segments received."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int.from_bytes(info[140:144], "little")


def send_all(sock, slices):
    """Sends every slice, with as few `sendmsg` calls (one `writev` each) as the socket allows."""
    while slices:
        sent = sock.sendmsg(slices)
        while slices and sent >= len(slices[0]):
            sent -= len(slices[0])
            slices.pop(0)
        if sent:
            slices[0] = slices[0][sent:]


def server(listener, args, conn):
    sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Distinct entries over --pool-mib, sent in turn: like a drain of cached entries, the bytes
    # are not in the CPU's caches when they are sent.
    pool = memoryview(bytearray(b"m" * (args.pool_mib << 20)))
    entries_in_pool = len(pool) // args.entry_bytes
    acks = bytearray(1 << 20)
    window_entries = max(1, args.window // args.messages_per_entry)
    sent = acked_bytes = 0
    ack_per_entry = args.ack_bytes * args.messages_per_entry
    if not args.nagle:
        # Woken once an entry's acknowledgements are in, not by each of its ACK segments. Not
        # with --nagle: the consumer's last small write would wait for an ACK this socket
        # delays until it reads (up to 40 ms), and the drain would stall.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, ack_per_entry)
    usage, first, segments = None, 0, 0
    deadline = time.monotonic() + args.seconds + args.warmup
    while time.monotonic() < deadline:
        acked = acked_bytes // ack_per_entry
        if sent - acked < window_entries:
            # Every entry the window allows, in one send (the broker's writer drains its
            # queue in one writev).
            count = window_entries - (sent - acked)
            slices = []
            for number in range(sent, sent + count):
                offset = (number % entries_in_pool) * args.entry_bytes
                slices.append(pool[offset:offset + args.entry_bytes])
            send_all(sock, slices)
            sent += count
        received = sock.recv_into(acks)
        if received == 0:
            break
        acked_bytes += received
        if usage is None and time.monotonic() > deadline - args.seconds:
            usage, started, first = resource.getrusage(resource.RUSAGE_SELF), time.monotonic(), acked
            segments = tcp_segments_in(sock)
    end = resource.getrusage(resource.RUSAGE_SELF)
    if usage is None:
        raise SystemExit("the consumer went away before the measured window began")
    entries = acked_bytes // ack_per_entry - first
    delivered = entries * args.messages_per_entry
    segments = tcp_segments_in(sock) - segments
    sock.close()
    conn.send({
        "messages": delivered,
        "seconds": time.monotonic() - started,
        "sys_us_per_msg": 1e6 * (end.ru_stime - usage.ru_stime) / delivered,
        "voluntary_switches_per_entry": (end.ru_nvcsw - usage.ru_nvcsw) / entries,
        "segments_in_per_entry": segments / entries,
    })


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages-per-entry", type=int, default=128)
    parser.add_argument("--entry-bytes", type=int, default=0,
                        help="bytes of one MESSAGE frame (default: --messages-per-entry messages of 1 KiB, "
                        "48 bytes of metadata each)")
    parser.add_argument("--pool-mib", type=int, default=256,
                        help="distinct bytes the entries are taken from in turn (the drain's cached fill)")
    parser.add_argument("--ack-bytes", type=int, default=40, help="bytes of one ACK frame")
    parser.add_argument("--bulk-acks", action="store_true",
                        help="the consumer writes an entry's ACK frames in one send (default: one send each, "
                        "as the pulsar crate writes them)")
    parser.add_argument("--nagle", action="store_true",
                        help="the consumer leaves Nagle's algorithm on, as the pulsar crate does (its small "
                        "writes may then share segments); default: TCP_NODELAY, one segment per send")
    parser.add_argument("--window", type=int, default=1000,
                        help="messages in flight (the consumer's permits), rounded down to whole entries; "
                        "at most 16 entries (more could fill both directions' socket buffers at once)")
    parser.add_argument("--rate", type=float, default=0,
                        help="messages per second the consumer takes at most (0: as fast as it can)")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not args.entry_bytes:
        args.entry_bytes = args.messages_per_entry * (1024 + 48)
    if not 1 <= args.window // args.messages_per_entry <= 16:
        parser.error("--window must hold 1 to 16 entries")
    for round_ in range(args.rounds):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        ours, theirs = Pipe()
        process = Process(target=server, args=(listener, args, theirs))
        process.start()
        consumer(listener.getsockname()[1], args)
        result = ours.recv()
        process.join()
        listener.close()
        print("round %d: %d messages in %.1f s (%.0f msg/s), system time %.3f us per delivered message, "
              "%.2f voluntary switches and %.1f segments received per entry"
              % (round_ + 1, result["messages"], result["seconds"], result["messages"] / result["seconds"],
                 result["sys_us_per_msg"], result["voluntary_switches_per_entry"], result["segments_in_per_entry"]))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
