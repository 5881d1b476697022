"""Geo-replication benchmark: replication lag (publish in cluster a -> received in cluster b) at a
steady 1 KiB load, without and with an injected one-way delay on the a -> b link, and the
catch-up rate after a backlog built while b was down.

Usage (from the repository root, after `cargo build --release`):

    compat/.venv/bin/python scripts/bench/replication.py target/release/meridian \
        [--rate 5000] [--delay-ms 20] [--duration 20] [--backlog-mb 512]

Two `meridian standalone` processes (clusters a and b) run on free loopback ports with fresh data
directories; a's replicator reaches b through compat/fault_proxy.py (registered as b's
`proxyServiceUrl` on a), which adds the delay. Lag is `meridian perf end-to-end` with the
producer on a and the consumer on b (`--consumer-url`). Catch-up: b is stopped, `meridian perf
produce` writes the backlog on a, b restarts, and the time from the replicator reconnecting to its
backlog reaching zero gives the rate; it is compared with the rate of that local produce run.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "compat"))
from cluster_pair import Broker, http, replicate_namespace  # noqa: E402
from fault_proxy import FaultProxy  # noqa: E402


def perf(binary, *arguments):
    output = subprocess.run([binary, "perf", *arguments, "--output", "json"],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output)


def replication_stats(broker, topic):
    status, stats = http("GET", f"{broker.admin}/admin/v2/persistent/t/ns/{topic}-0/stats")
    return stats["replication"]["b"] if status == 200 else {}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("binary")
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--delay-ms", type=float, default=20)
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--backlog-mb", type=int, default=512)
    parser.add_argument("--no-proxy", action="store_true",
                        help="replicate directly, without the proxy (the delay runs are skipped)")
    options = parser.parse_args()
    binary = os.path.abspath(options.binary)

    with tempfile.TemporaryDirectory() as root:
        a, b = Broker(binary, "a", root), Broker(binary, "b", root)
        proxy = FaultProxy(("127.0.0.1", b.port), name="a-to-b", max_queued_chunks=256)
        try:
            replicate_namespace(a, b, None if options.no_proxy else proxy)

            for delay in (0.0,) if options.no_proxy else (0.0, options.delay_ms / 1000):
                proxy.set_delay(delay)
                topic = f"lag-{int(delay * 1000)}ms"
                summary = perf(binary, "end-to-end", "--url", a.url, "--consumer-url", b.url,
                               "--topic-prefix", f"persistent://t/ns/{topic}", "--size", "1024",
                               "--rate", str(options.rate), "--duration", str(options.duration),
                               "--warmup", "5")
                latency = summary["end_to_end_latency_ms"]
                print(f"lag with {delay * 1000:.0f} ms one-way delay at {options.rate} msg/s: "
                      f"p50 {latency['p50']:.1f} ms, p99 {latency['p99']:.1f} ms, "
                      f"max {latency['max']:.1f} ms (received {summary['received']} of {summary['sent']})")
            proxy.set_delay(0)

            topic = "catch-up"  # perf names it catch-up-0
            messages = options.backlog_mb * 1024
            # The topic and its replicator exist before b goes down.
            perf(binary, "produce", "--url", a.url, "--topic-prefix", f"persistent://t/ns/{topic}",
                 "--messages", "1", "--size", "1024")
            deadline = time.time() + 30
            while replication_stats(a, topic).get("replicationBacklog", 1) != 0:
                if time.time() > deadline:
                    raise RuntimeError("the first message was not replicated")
                time.sleep(0.1)
            b.stop()
            local = perf(binary, "produce", "--url", a.url, "--topic-prefix",
                         f"persistent://t/ns/{topic}", "--messages", str(messages), "--size", "1024")
            local_rate = local["publish"]["mb_per_s"] * 1e6
            backlog = replication_stats(a, topic)["replicationBacklog"]
            b.start()
            deadline = time.time() + 600
            while not replication_stats(a, topic).get("connected"):
                if time.time() > deadline:
                    raise RuntimeError("the replicator did not reconnect")
                time.sleep(0.01)
            started = time.time()
            while replication_stats(a, topic).get("replicationBacklog", 1) != 0:
                if time.time() > deadline:
                    raise RuntimeError("the backlog did not drain")
                time.sleep(0.02)
            elapsed = time.time() - started
            rate = messages * 1024 / elapsed
            print(f"catch-up: {options.backlog_mb} MiB ({backlog} entries) in {elapsed:.1f} s = "
                  f"{rate / 1e6:.1f} MB/s; local durable produce of the same data: "
                  f"{local_rate / 1e6:.1f} MB/s; ratio {rate / local_rate:.2f}")
        finally:
            proxy.close()
            for broker in (a, b):
                if broker.process.poll() is None:
                    broker.stop()


if __name__ == "__main__":
    main()
