#!/usr/bin/env python3
"""How long each `fdatasync` takes when a log appends to new files and removes old ones, against
when it writes into files that already have their blocks (issue 16's tail latency; the reason
for recycled segment files).

At a steady rate (default 646 writes/s: 82,750 msg/s of 1 KiB messages in 128 KiB batches, half
the broker's maximum on this machine), writes 128 KiB with `pwrite` and then `fdatasync`s, into
128 MiB files as the broker's segments are:

  append    each file is new and grows; when one is full the next is created and the one
            before it removed (what trimming did before recycling: a 128 MiB unlink)
  recycle   three files are written once with zeros first (not timed), then written over
            in turn (what a recycled segment file is: no growth, no removal)

and prints the fdatasync latency percentiles and how many took over 5 ms.

    python3 scripts/bench/fsync_tail.py append 30
    python3 scripts/bench/fsync_tail.py recycle 30 --rate 646 --dir /tmp/pt-tail
"""
import argparse, os, shutil, time

SEGMENT = 128 << 20
BATCH = 128 << 10


def new_file(directory, index, fill):
    path = os.path.join(directory, 'segment-%d' % index)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    if fill:
        zeros = bytes(1 << 20)
        for _ in range(SEGMENT >> 20):
            os.write(fd, zeros)
        os.fsync(fd)
    return fd, path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('mode', choices=['append', 'recycle'])
    parser.add_argument('seconds', type=float)
    parser.add_argument('--rate', type=float, default=646, help='writes per second')
    parser.add_argument('--dir', default='/tmp/pt-tail', help='on the disk to measure')
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    data = os.urandom(BATCH)
    pool = [new_file(args.dir, index, True) for index in range(3)] if args.mode == 'recycle' else []
    fd, path = pool[0] if pool else new_file(args.dir, 0, False)
    full = []
    latencies = []
    offset, index = 0, 0
    started = next_write = time.time()
    try:
        while time.time() - started < args.seconds:
            next_write += 1.0 / args.rate
            pause = next_write - time.time()
            if pause > 0:
                time.sleep(pause)
            os.pwrite(fd, data, offset)
            offset += BATCH
            before = time.perf_counter()
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - before)
            if offset >= SEGMENT:
                index, offset = index + 1, 0
                if pool:
                    fd, path = pool[index % len(pool)]
                else:
                    full.append((fd, path))
                    fd, path = new_file(args.dir, index, False)
                    if len(full) > 1:
                        old_fd, old_path = full.pop(0)
                        os.close(old_fd)
                        os.remove(old_path)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    latencies.sort()
    at = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
    print('%s: %d fdatasyncs, p50 %.2f p99 %.2f p99.9 %.2f max %.2f ms, %d over 5 ms'
          % (args.mode, len(latencies), at(.5), at(.99), at(.999), latencies[-1] * 1000,
             sum(1 for latency in latencies if latency > 0.005)))


if __name__ == '__main__':
    main()
