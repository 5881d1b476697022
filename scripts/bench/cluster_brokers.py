"""Cluster mode on object storage: publish throughput and latency through 1 and 3 brokers
(docs/BENCHMARKS.md, "Cluster mode on object storage").

    compat/.venv/bin/python scripts/bench/cluster_brokers.py BROKERS [perf options...]

Starts a real etcd (`etcd` on PATH), a SeaweedFS `weed mini` (as the compat tests do) and
BROKERS `target/release/meridian broker --storage` processes; creates one namespace per broker
and gives its bundles to that broker (its topics are looked up through it first), then runs one
`meridian perf produce` per broker at the same time, each through its own broker's URL on 4
topics of its namespace, with the perf options given (default: `--rate 0 --size 1024
--duration 10 --warmup 2`). Prints each run's summary and the totals. Run from the repository
root; everything it starts is stopped at the end.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, "compat")
import test_cluster_mode as cluster  # noqa: E402
from broker_process import free_port  # noqa: E402

TOPICS_PER_BROKER = 4


def main() -> None:
    count = int(sys.argv[1])
    perf_options = sys.argv[2:] or ["--rate", "0", "--size", "1024", "--duration", "10",
                                    "--warmup", "2"]
    binary = os.path.abspath("target/release/meridian")
    base = pathlib.Path(tempfile.mkdtemp(prefix="cluster-brokers-"))
    client_port, peer_port = free_port(), free_port()
    (base / "etcd").mkdir()
    etcd = cluster.start_etcd(base / "etcd", client_port, peer_port)
    etcd_url = f"etcd://127.0.0.1:{client_port}"
    brokers = []
    weed = None
    try:
        (base / "weed").mkdir()
        weed = cluster.start_weed(base / "weed")
        key_file = base / "s3.key"
        key_file.write_text(f"{cluster.S3_ACCESS_KEY}:{cluster.S3_SECRET_KEY}\n")
        for index in range(count):
            directory = base / f"broker-{index + 1}"
            directory.mkdir()
            broker = cluster.ObjectStoreBroker(binary, directory, f"broker-{index + 1}", etcd_url,
                                               weed[1], key_file)
            broker.start()
            brokers.append(broker)
        runs = []
        for index, broker in enumerate(brokers):
            namespace = f"public/bench{index + 1}"
            status, _, body = cluster.http("PUT", f"{broker.web_url}/admin/v2/namespaces/{namespace}")
            assert status in (200, 204), (status, body)
            prefix = f"persistent://{namespace}/perf"
            for topic in range(TOPICS_PER_BROKER):
                assert cluster.owner_of(brokers, f"{prefix}-{topic}", via=broker) is broker
            command = [binary, "perf", "produce", "--url", broker.service_url, "--admin-url",
                       broker.web_url, "--topic-prefix", prefix, "--topics",
                       str(TOPICS_PER_BROKER), "--output", "json", "--broker-pid",
                       str(broker.pid)] + perf_options
            runs.append(subprocess.Popen(command, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True))
        summaries = [json.loads(run.communicate()[0]) for run in runs]
        total = 0.0
        for index, summary in enumerate(summaries):
            rate = summary["publish"]["msg_per_s"] if summary.get("publish") else 0.0
            latency = summary.get("publish_latency_ms") or {}
            cpu = summary.get("broker_cpu") or {}
            total += rate
            print(f"broker {index + 1}: {rate:,.0f} msg/s, publish p50 {latency.get('p50')} ms "
                  f"p99 {latency.get('p99')} ms p99.9 {latency.get('p99_9')} ms, "
                  f"broker CPU {cpu.get('us_per_message')} µs/msg, errors {summary.get('send_errors')}")
        print(f"{count} broker(s), {count * TOPICS_PER_BROKER} topics: {total:,.0f} msg/s in all")
    finally:
        for broker in brokers:
            broker.kill()
        if weed is not None:
            cluster.stop_weed(weed[0], weed[2])
        etcd.send_signal(signal.SIGKILL)
        etcd.wait()


if __name__ == "__main__":
    main()
