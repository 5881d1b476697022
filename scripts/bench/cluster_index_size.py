#!/usr/bin/env python3
"""etcd keys and bytes of one topic's object-store index after N messages (issue 17,
docs/BENCHMARKS.md "Cluster mode on object storage").

Starts a single etcd, a `weed mini` and one `meridian broker --storage` (release build) with
`object_log_manifest_threshold` as given, produces N messages to one topic with
`meridian perf produce`, then reads everything under `/meridian/bench/logs/<topic>/` from etcd
(keys and key + value bytes), lists the bucket's data objects and manifests, and sums the
compactions the broker logged ("index keys moved into a manifest": bytes PUT, time).

    python3 scripts/bench/cluster_index_size.py --threshold 1000 --messages 1000000
    python3 scripts/bench/cluster_index_size.py --threshold 0 --messages 1000000
    python3 scripts/bench/cluster_index_size.py --threshold 1000 --messages 1000000 \
        --rate 5000 --perf-args "--batch-max-messages 0"

Every process is started here on free loopback ports in a temporary directory and killed by
pid at the end.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ACCESS, SECRET, BUCKET = "bench", "bench-secret", "bench"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(what: str, condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.1)


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def etcd_prefix(client_url: str, prefix: str) -> list[tuple[str, bytes]]:
    encode = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    request = urllib.request.Request(
        client_url + "/v3/kv/range",
        data=json.dumps({"key": encode(prefix), "range_end": encode(end)}).encode(),
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        kvs = json.loads(answer.read()).get("kvs", [])
    return [(base64.b64decode(kv["key"]).decode(), base64.b64decode(kv.get("value", "")))
            for kv in kvs]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threshold", type=int, required=True)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--rate", type=int, default=0, help="messages per second, 0: unlimited")
    parser.add_argument("--meridian", default=str(ROOT / "target" / "release" / "meridian"))
    parser.add_argument("--weed", default=os.environ.get("WEED_BIN")
                        or str(ROOT / "target" / "seaweedfs-venv" / "bin" / "weed"))
    parser.add_argument("--keep-all", action="store_true",
                        help="namespace retention -1 (infinite): the broker trims nothing, so "
                             "the index keeps every commit's ref")
    parser.add_argument("--perf-args", default="", help="extra `meridian perf produce` arguments")
    arguments = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="index-size-"))
    processes: list[subprocess.Popen] = []
    weed_ports: list[int] = []
    try:
        client_port, peer_port = free_port(), free_port()
        client_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        processes.append(subprocess.Popen(
            [shutil.which("etcd") or "etcd", "--data-dir", str(base / "etcd"),
             "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"default={peer_url}"],
            stdout=open(base / "etcd.log", "wb"), stderr=subprocess.STDOUT))
        wait_for("etcd", lambda: answers(client_url + "/health"))

        (base / "weed").mkdir()
        (base / "tmp").mkdir()
        (base / "s3.json").write_text(json.dumps({"identities": [{
            "name": "bench", "credentials": [{"accessKey": ACCESS, "secretKey": SECRET}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        weed_ports = [free_port() for _ in range(10)]
        names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                 "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port",
                 "admin.port.grpc"]
        processes.append(subprocess.Popen(
            [arguments.weed, "mini", f"-dir={base / 'weed'}", f"-s3.config={base / 's3.json'}",
             "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
            + [f"-{name}={port}" for name, port in zip(names, weed_ports)]
            + ["-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
               "-master.telemetry=false"],
            cwd=base, env={**os.environ, "TMPDIR": str(base / "tmp")},
            stdout=open(base / "weed.log", "wb"), stderr=subprocess.STDOUT))
        endpoint = f"http://127.0.0.1:{weed_ports[6]}"
        wait_for("weed", lambda: answers(endpoint))

        (base / "s3.key").write_text(f"{ACCESS}:{SECRET}\n")
        broker_port, web_port = free_port(), free_port()
        broker_log = base / "broker.log"
        broker = subprocess.Popen(
            [arguments.meridian, "broker", "--cluster-name", "bench",
             "--metadata-store", f"etcd://127.0.0.1:{client_port}",
             "--data-dir", str(base / "broker"), "--broker-port", str(broker_port),
             "--web-port", str(web_port), "--storage", f"s3://{BUCKET}/c1",
             "--s3-endpoint", endpoint, "--s3-access-key-file", str(base / "s3.key")],
            env={**os.environ,
                 "MERIDIAN_OBJECT_LOG_MANIFEST_THRESHOLD": str(arguments.threshold)},
            stdout=open(broker_log, "wb"), stderr=subprocess.STDOUT)
        processes.append(broker)
        wait_for("the broker", lambda: answers(f"http://127.0.0.1:{web_port}/metrics"))

        if arguments.keep_all:
            request = urllib.request.Request(
                f"http://127.0.0.1:{web_port}/admin/v2/namespaces/public/default/retention",
                data=json.dumps({"retentionTimeInMinutes": -1, "retentionSizeInMB": -1}).encode(),
                headers={"Content-Type": "application/json"}, method="POST")
            urllib.request.urlopen(request, timeout=30).close()
        topic = "persistent://public/default/index-size"
        perf = [arguments.meridian, "perf", "produce", "--url", f"pulsar://127.0.0.1:{broker_port}",
                "--admin-url", f"http://127.0.0.1:{web_port}", "--topic-prefix", topic,
                "--messages", str(arguments.messages), "--size", str(arguments.size),
                "--rate", str(arguments.rate), "--broker-pid", str(broker.pid)] + arguments.perf_args.split()
        started = time.monotonic()
        subprocess.run(perf, check=True)
        elapsed = time.monotonic() - started
        time.sleep(1)  # the last commit's compaction, if any, runs right after it

        index = etcd_prefix(client_url, f"/meridian/bench/logs/{topic}-0/")
        head = next((json.loads(v) for k, v in index if k.endswith("/head")), {})
        keys_bytes = sum(len(k) + len(v) for k, v in index)
        log = broker_log.read_text(errors="replace")
        compactions = [(int(b), int(t)) for b, t in re.findall(
            r"index keys moved into a manifest.*?bytes=(\d+) elapsed_us=(\d+)", log)]
        print(json.dumps({
            "threshold": arguments.threshold,
            "messages": arguments.messages,
            "produce_seconds": round(elapsed, 1),
            "entries (commits' entries)": head.get("next_entry"),
            "etcd_keys": len(index),
            "etcd_bytes": keys_bytes,
            "head": head,
            "compactions": len(compactions),
            "manifest_bytes_put": sum(b for b, _ in compactions),
            "compaction_ms": sorted(round(t / 1000, 1) for _, t in compactions),
        }, indent=2))
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGKILL)
            process.wait()
        for port in weed_ports:
            for stale in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                stale.unlink(missing_ok=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
