#!/usr/bin/env python3
"""Broker CPU per delivered message with the official Python client (`pulsar-client`, the C++
client underneath) as the consumer: it acknowledges a batch once all its messages are, and
groups acknowledgements (100 ms by default), as Pulsar users' consumers do.

Against a broker whose topic already holds the messages in subscription `drain` (as
`drain_perf.sh` leaves it with KEEP=1):

    compat/.venv/bin/python scripts/bench/drain_python.py --url pulsar://127.0.0.1:18010 \
        --topic persistent://public/default/drain-0 --broker-pid <pid> --messages 200000
"""
import argparse, json, os, time

import pulsar


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in USER_HZ ticks


def running_seconds(pid):
    """Time on a CPU of the threads alive now, in nanoseconds (`schedstat`), as seconds: precise
    where `cpu_seconds` counts 10 ms ticks (what `meridian perf` reports as running_us)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(open(f"/proc/{pid}/task/{task}/schedstat").read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile
    return total / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--subscription", default="drain")
    parser.add_argument("--broker-pid", type=int, required=True)
    parser.add_argument("--messages", type=int, default=200000)
    parser.add_argument("--rate", type=float, default=0,
                        help="messages per second at most (0: as fast as the client goes), e.g. the "
                        "pulsar crate's drain rate, to compare at the same rate")
    args = parser.parse_args()
    client = pulsar.Client(args.url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
    consumer = client.subscribe(args.topic, args.subscription, receiver_queue_size=1000)
    before, started = cpu_seconds(args.broker_pid), time.monotonic()
    running_before = running_seconds(args.broker_pid)
    for index in range(args.messages):
        if args.rate:
            ahead = index / args.rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        # A backlog shorter than --messages fails here instead of waiting forever.
        consumer.acknowledge(consumer.receive(timeout_millis=30000))
    seconds = time.monotonic() - started
    # The grouped acknowledgements go out on close: count the broker's CPU for them too.
    consumer.close()
    used = cpu_seconds(args.broker_pid) - before
    running = running_seconds(args.broker_pid) - running_before
    client.close()
    print(json.dumps({"messages": args.messages, "seconds": round(seconds, 3),
                      "msg_per_s": round(args.messages / seconds), "broker_cpu_s": round(used, 2),
                      "broker_cpu_us_per_msg": round(1e6 * used / args.messages, 3),
                      "broker_running_us_per_msg": round(1e6 * running / args.messages, 3)}))


if __name__ == "__main__":
    main()
