#!/usr/bin/env python3
"""Context switches and CPU ticks of each thread of a process over a window (issue 16).

Reads /proc/<pid>/task/*/status (voluntary and involuntary switches) and .../stat (user +
system ticks, 10 ms each) at the start and end of the window and prints one line per thread
that lived through it, most voluntary switches first. Threads born or ended within the window
are left out.

    python3 scripts/bench/thread_switches.py <pid> 5      # during a load, e.g. produce_cpu.py
"""
import os
import sys
import time


def sample(pid):
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                status = f.read()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                # Fields after the command name, counted from 0 at the state: utime is the 11th.
                stat = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while being read
        voluntary = int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
        involuntary = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
        threads[tid] = (name, voluntary, involuntary, int(stat[11]) + int(stat[12]))
    return threads


def main():
    pid, seconds = int(sys.argv[1]), float(sys.argv[2])
    before = sample(pid)
    time.sleep(seconds)
    after = sample(pid)
    rows = []
    for tid, (name, voluntary, involuntary, ticks) in after.items():
        if tid in before:
            _, voluntary0, involuntary0, ticks0 = before[tid]
            rows.append((f"{name}-{tid}", (voluntary - voluntary0) / seconds,
                         (involuntary - involuntary0) / seconds, (ticks - ticks0) / seconds))
    for name, voluntary, involuntary, cpu in sorted(rows, key=lambda row: -row[1]):
        print(f"{name:24s} voluntary/s {voluntary:8.0f}  involuntary/s {involuntary:8.0f}  cpu% {cpu:4.0f}")


if __name__ == "__main__":
    main()
