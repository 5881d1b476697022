"""The file system's own cost of durable appends, for comparison with the broker's: rounds of
`pwrite` + `fdatasync` on one file, growing it (appending) or over a zero-filled preallocated
file, alternating, twice each. Prints per round the wall time, system CPU time and voluntary
context switches, and the latency quantiles of one write + fdatasync.

    python3 scripts/bench/fsync_raw.py --size 131072 --rounds 400    # system time per 128 KiB
    python3 scripts/bench/fsync_raw.py --size 16384 --rounds 3000     # latency of 16 KiB appends
    python3 scripts/bench/fsync_raw.py --size 20480 --rounds 3000 --direct   # and with O_DIRECT

With --direct, each of the four runs is followed by the same one on a file opened with
`O_DIRECT` (the page cache bypassed; the data comes from a page-aligned buffer, so --size must
be a multiple of 4096): what a write path without the page cache would cost.

The file is written in --dir (default /tmp, which should be on the data directory's file
system) and removed afterwards.
"""

import argparse
import mmap
import os
import resource
import time


def run(directory, size, rounds, preallocated, direct=False):
    path = os.path.join(directory, f"fsync-raw-{os.getpid()}.dat")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        if preallocated:
            os.write(fd, b"\0" * (rounds * size))
            os.fsync(fd)
        data = os.urandom(size)
        if direct:
            os.close(fd)
            fd = os.open(path, os.O_RDWR | os.O_DIRECT)
            # O_DIRECT needs an aligned buffer: an anonymous mapping is page-aligned.
            data = mmap.mmap(-1, size)
            data.write(os.urandom(size))
        latencies = []
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for index in range(rounds):
            sent = time.perf_counter()
            os.pwritev(fd, [data], index * size)
            os.fdatasync(fd)
            latencies.append((time.perf_counter() - sent) * 1000)
        elapsed, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    finally:
        os.close(fd)
        os.remove(path)
    latencies.sort()

    def quantile(q):
        return latencies[min(len(latencies) - 1, int(len(latencies) * q))]

    kind = ("preallocated" if preallocated else "appending   ") + (", O_DIRECT" if direct else "          ")
    print(f"{kind}: {elapsed / rounds * 1e6:6.0f} us/round wall, "
          f"system {(after.ru_stime - before.ru_stime) / rounds * 1e6:5.0f} us/round, "
          f"{(after.ru_nvcsw - before.ru_nvcsw) / rounds:.1f} voluntary switches/round; "
          f"latency p50 {quantile(0.5):.2f} p99 {quantile(0.99):.2f} "
          f"p99.9 {quantile(0.999):.2f} max {latencies[-1]:.2f} ms", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=128 * 1024)
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--direct", action="store_true",
                        help="follow each run by the same with O_DIRECT")
    options = parser.parse_args()
    if options.direct and options.size % 4096:
        parser.error("--direct needs a --size that is a multiple of 4096")
    for preallocated in (False, True, False, True):
        run(options.dir, options.size, options.rounds, preallocated)
        if options.direct:
            run(options.dir, options.size, options.rounds, preallocated, direct=True)


if __name__ == "__main__":
    main()
