#!/usr/bin/env python3
"""The kernel's floor under the batched publish path (issue 16): what receiving a 128 KiB batch
over loopback TCP, appending it to a file with one `pwrite` + `fdatasync`, and sending a small
receipt costs in system time, with no broker in between. The server process does only those
system calls per batch; its user time is Python's and is not reported. Compare its system time
per 1 KiB message with the broker's (`produce_cpu.py`, user + sys per message) in the same minutes.

    python3 scripts/bench/produce_floor.py                      # 3 rounds, 128 KiB batches of 1 KiB messages
    python3 scripts/bench/produce_floor.py --batch 131072 --in-flight 16 --seconds 8
    python3 scripts/bench/produce_floor.py --mode prealloc     # overwriting a zero-filled file
    python3 scripts/bench/produce_floor.py --zero-fill-mib 256  # what zero-filling costs per batch
    python3 scripts/bench/produce_floor.py --mode wal --batch 22528 --group 11 --in-flight 44
        # 100 topics' entries (22 messages) through the entry WAL, 11 per fdatasync, in turn
        # into 100 segment files

The file is written in --dir (default /tmp: the file system of the data directory) and removed.
"""
import argparse, mmap, os, resource, socket, sys, time
from multiprocessing import Process, Pipe

RECEIPT = b"r" * 48


def server(listener, batch, directory, conn, mode, wrap, chunk, group, files):
    sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    path = os.path.join(directory, "produce-floor-%d.dat" % os.getpid())
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
    if mode == "wal":
        return wal_server(sock, batch, path, conn, wrap, group, files)
    if mode in ("prealloc", "direct"):
        # Zero-filled and made durable before the window: appends then overwrite written blocks
        # (no block allocation, no size change for fdatasync to journal).
        fd = os.open(path, flags, 0o644)
        chunk = b"\0" * (1 << 20)
        for _ in range(wrap >> 20):
            os.write(fd, chunk)
        os.fsync(fd)
        os.close(fd)
        flags = os.O_RDWR | (os.O_DIRECT if mode == "direct" else 0)
    fd = os.open(path, flags, 0o644)
    # Page-aligned, as O_DIRECT wants.
    buffer = mmap.mmap(-1, batch)
    view = memoryview(buffer)
    offset = 0
    allocated = 0
    zeros = memoryview(bytes(chunk)) if chunk else None
    batches = 0
    usage = None
    try:
        while True:
            receive_batch(sock, view)
            if usage is None and batches == 200:  # warm-up over: start the window
                usage, started, first = resource.getrusage(resource.RUSAGE_SELF), time.monotonic(), batches
            if mode == "chunked" and offset + batch > allocated:
                # The batch and the zeros after it in one write: the next batches overwrite them.
                os.pwritev(fd, [view, zeros], offset)
                allocated = offset + batch + chunk
            else:
                os.pwrite(fd, view, offset)
            os.fdatasync(fd)
            offset = (offset + batch) % wrap if mode in ("prealloc", "direct") else offset + batch
            sock.sendall(RECEIPT)
            batches += 1
    except (EOFError, ConnectionError):
        pass
    finally:
        end = resource.getrusage(resource.RUSAGE_SELF)
        os.close(fd)
        os.remove(path)
    report(conn, batches - first, started, usage, end)


def receive_batch(sock, view):
    """Fills `view` from the socket; EOFError once the client is done."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got)
        if n == 0:
            raise EOFError
        got += n


def report(conn, counted, started, usage, end):
    """Sends the measured window's figures to the parent: `counted` batches since `started`,
    with the process's resource usage at its start and end."""
    conn.send({
        "batches": counted,
        "seconds": time.monotonic() - started,
        "sys_us_per_batch": 1e6 * (end.ru_stime - usage.ru_stime) / counted,
        "voluntary_switches_per_batch": (end.ru_nvcsw - usage.ru_nvcsw) / counted,
    })


def zero_filled(path, size):
    """A file of `size` zero bytes, durable: writes over it then change no metadata."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    chunk = bytes(1 << 20)
    for _ in range(size >> 20):
        os.write(fd, chunk)
    os.fsync(fd)
    return fd


# The broker checkpoints its entry WAL every 64 MiB: each open segment file is fsynced then.
CHECKPOINT_BYTES = 64 << 20


def wal_server(sock, batch, path, conn, wrap, group, files):
    """The entry WAL's path: each batch is appended to the next of `files` segment files (one
    per topic, in turn) without an fsync, and every `group` batches go to the WAL (a
    zero-filled file written over, as the broker's recycled WAL files are) with one vectored
    write and one `fdatasync`; then their receipts are sent. Every 64 MiB of WAL every segment
    file is fsynced, as the broker's checkpoint does."""
    paths = ["%s.%d" % (path, number) for number in range(files)]
    segments = [os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644) for name in paths]
    offsets = [0] * files
    wal_path = path + ".wal"
    wal = zero_filled(wal_path, wrap)
    buffers = [memoryview(bytearray(batch)) for _ in range(group)]
    wal_offset = since_checkpoint = 0
    batches = 0
    usage = None
    try:
        while True:
            for view in buffers:
                receive_batch(sock, view)
                number = batches % files
                os.pwrite(segments[number], view, offsets[number])
                offsets[number] += batch
                batches += 1
            if usage is None and batches >= 200:  # warm-up over: start the window
                usage, started, first = resource.getrusage(resource.RUSAGE_SELF), time.monotonic(), batches
            if wal_offset + batch * group > wrap:
                wal_offset = 0
            os.pwritev(wal, buffers, wal_offset)
            os.fdatasync(wal)
            wal_offset += batch * group
            sock.sendall(RECEIPT * group)
            since_checkpoint += batch * group
            if since_checkpoint >= CHECKPOINT_BYTES:
                for fd in segments:
                    os.fdatasync(fd)
                since_checkpoint = 0
    except (EOFError, ConnectionError):
        pass
    finally:
        end = resource.getrusage(resource.RUSAGE_SELF)
        for fd in segments + [wal]:
            os.close(fd)
        for name in paths + [wal_path]:
            os.remove(name)
    report(conn, batches - first, started, usage, end)


def client(port, batch, in_flight, seconds):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = os.urandom(batch)
    pending = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        while pending < in_flight:
            sock.sendall(payload)
            pending += 1
        received = 0
        while received < len(RECEIPT):
            received += len(sock.recv(len(RECEIPT) - received))
        pending -= 1
    sock.shutdown(socket.SHUT_WR)
    while pending:
        if not sock.recv(65536):
            break
        pending -= 1
    sock.close()


def zero_fill_cost(directory, mebibytes, batch):
    """System time of writing `mebibytes` of zeros and one fsync: what preparing a preallocated
    file costs, per `batch` bytes."""
    path = os.path.join(directory, "produce-floor-zeros-%d.dat" % os.getpid())
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    chunk = bytes(1 << 20)
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    for _ in range(mebibytes):
        os.write(fd, chunk)
    os.fsync(fd)
    after = resource.getrusage(resource.RUSAGE_SELF)
    os.close(fd)
    os.remove(path)
    per_batch = 1e6 * (after.ru_stime - before.ru_stime) * batch / (mebibytes << 20)
    print("zero-filling %d MiB: %.2f s, system time %.1f us per %d bytes" % (mebibytes, time.monotonic() - started, per_batch, batch))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=131072, help="bytes per batch (one pwrite + fdatasync)")
    parser.add_argument("--message", type=int, default=1024, help="bytes per message, for the per-message figure")
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--mode", choices=["append", "chunked", "prealloc", "direct", "wal"], default="append",
                        help="append: grow the file (as the broker does); prealloc: overwrite a zero-filled "
                        "file; direct: the same with O_DIRECT (no page cache); chunked: grow the file by "
                        "--chunk-kib of zeros written after a batch, which the next batches overwrite; "
                        "wal: the entry WAL's path (each batch appended to one of --files segment files "
                        "without fsync, every --group batches written to a WAL file with one fdatasync, "
                        "every segment file fsynced every 64 MiB of WAL)")
    parser.add_argument("--files", type=int, default=100,
                        help="wal mode: segment files the batches are appended to in turn (one per topic)")
    parser.add_argument("--group", type=int, default=11,
                        help="wal mode: batches per WAL write and fdatasync (the broker's groups held 11 "
                        "at 100 topics)")
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--wrap-mib", type=int, default=512,
                        help="size of the zero-filled file; writes wrap around in it")
    parser.add_argument("--zero-fill-mib", type=int, default=0,
                        help="instead: measure what zero-filling this many MiB costs (preparing a preallocated file)")
    args = parser.parse_args()
    if args.mode == "wal" and args.in_flight < args.group:
        parser.error("--in-flight must be at least --group: a group is written once it is complete")
    if args.zero_fill_mib:
        zero_fill_cost(args.dir, args.zero_fill_mib, args.batch)
        return
    for round_ in range(args.rounds):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        ours, theirs = Pipe()
        process = Process(target=server, args=(listener, args.batch, args.dir, theirs, args.mode, args.wrap_mib << 20, args.chunk_kib << 10, args.group, args.files))
        process.start()
        client(listener.getsockname()[1], args.batch, args.in_flight, args.seconds)
        result = ours.recv()
        process.join()
        listener.close()
        per_message = result["sys_us_per_batch"] * args.message / args.batch
        print("%s round %d: %d batches in %.1f s (%.0f msg/s), system time %.1f us per batch = %.2f us per %d-byte message, %.1f voluntary switches per batch"
              % (args.mode, round_ + 1, result["batches"], result["seconds"], result["batches"] * args.batch / args.message / result["seconds"],
                 result["sys_us_per_batch"], per_message, args.message, result["voluntary_switches_per_batch"]))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
