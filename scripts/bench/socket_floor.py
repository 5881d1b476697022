#!/usr/bin/env python3
"""The kernel's cost of sending bytes over loopback TCP, without a broker (issue 16).

A sender writes CHUNK bytes at a time (as the broker's connection writer hands a batch of
MESSAGE frames to one `writev`) to a reader in another process that reads READ bytes at a time
and, with --pause, sleeps between reads (a consumer slower than the sender, as the `pulsar`
crate's is in the drain benchmarks). Prints the sender's system and user CPU per KiB sent:
the floor under the broker's system time per delivered 1 KiB message.

    python3 scripts/bench/socket_floor.py                            # 730 KiB writes, fast reader
    python3 scripts/bench/socket_floor.py --pause 0.0005 --read 65536 # a slow reader
    python3 scripts/bench/socket_floor.py --source-mib 200            # from 200 MiB of memory
"""
import argparse
import os
import socket
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk", type=int, default=730 * 1024, help="bytes per send")
    parser.add_argument("--mib", type=int, default=400, help="MiB sent in all")
    parser.add_argument("--read", type=int, default=1 << 20, help="bytes per read")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds the reader sleeps after each read")
    parser.add_argument(
        "--source-mib",
        type=int,
        default=0,
        help="send successive slices of a buffer this large (cold memory, as a drain's entries) "
        "instead of the same chunk again",
    )
    options = parser.parse_args()

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    reader = os.fork()
    if reader == 0:
        connection = socket.create_connection(("127.0.0.1", port))
        buffer = bytearray(options.read)
        while connection.recv_into(buffer):
            if options.pause:
                time.sleep(options.pause)
        os._exit(0)
    connection, _ = server.accept()
    source_len = max(options.source_mib * 1024 * 1024, options.chunk)
    source = memoryview(bytearray(os.urandom(1024)) * (source_len // 1024 + 1))
    total = options.mib * 1024 * 1024
    before = os.times()
    sent = 0
    at = 0
    while sent < total:
        if at + options.chunk > source_len:
            at = 0
        connection.sendall(source[at : at + options.chunk])
        at += options.chunk
        sent += options.chunk
    after = os.times()
    connection.close()
    os.waitpid(reader, 0)
    kib = sent / 1024
    print(
        f"chunk {options.chunk} B, reader {options.read} B every {options.pause} s: sender "
        f"system {(after.system - before.system) * 1e6 / kib:.3f} us/KiB, "
        f"user {(after.user - before.user) * 1e6 / kib:.3f} us/KiB (10 ms ticks)"
    )


if __name__ == "__main__":
    main()
