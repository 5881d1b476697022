"""Cluster mode: time from kill -9 of a topic's owner to the first send acknowledged through
the new owner, and to the consumer receiving it (docs/BENCHMARKS.md, "Cluster mode").

    compat/.venv/bin/python scripts/bench/cluster_failover.py ROUNDS LEASE_TTL_SECONDS [s3]

Starts a real etcd (`etcd` on PATH) and three `target/debug/meridian broker` processes (the
compat harness's classes); each round creates a namespace, gives its topic's bundle to one
broker, connects a producer and a consumer through another broker's URL, kills the owner, and
replaces it with a new broker for the next round. Run from the repository root. With `s3` the
brokers store topics on a SeaweedFS the script starts (`--storage`, as the compat tests do), and
the round's consumer also first receives the message sent before the kill, stored on the dead
owner, from the new owner (it was not acknowledged).
"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, "compat")
import pulsar  # noqa: E402
import test_cluster_mode as cluster  # noqa: E402
from broker_process import free_port  # noqa: E402


def main() -> None:
    rounds, ttl = int(sys.argv[1]), int(sys.argv[2])
    object_storage = sys.argv[3:] == ["s3"]
    cluster.LEASE_TTL_S = ttl
    binary = os.path.abspath("target/debug/meridian")
    base = pathlib.Path(tempfile.mkdtemp(prefix="cluster-failover-"))
    client_port, peer_port = free_port(), free_port()
    client_url, peer_url = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    etcd = subprocess.Popen(
        ["etcd", "--name", "d", "--data-dir", str(base / "etcd"),
         "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
         "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
         "--initial-cluster", f"d={peer_url}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    brokers = []
    weed = None
    try:
        if object_storage:
            (base / "weed").mkdir()
            weed = cluster.start_weed(base / "weed")
            key_file = base / "s3.key"
            key_file.write_text(f"{cluster.S3_ACCESS_KEY}:{cluster.S3_SECRET_KEY}\n")
        cluster.wait_until(lambda: cluster.http("GET", f"{client_url}/health")[0] == 200, "etcd")

        def start(name: str):
            directory = base / name
            directory.mkdir()
            etcd_url = f"etcd://127.0.0.1:{client_port}"
            if object_storage:
                broker = cluster.ObjectStoreBroker(
                    binary, directory, name, etcd_url, weed[1], key_file
                )
            else:
                broker = cluster.ClusterBroker(binary, directory, name, etcd_url)
            broker.start()
            brokers.append(broker)
            return broker

        live = [start("b0"), start("b1"), start("b2")]
        for index in range(rounds):
            namespace = f"public/failover{index}"
            cluster.http("PUT", f"{live[0].web_url}/admin/v2/namespaces/{namespace}")
            topic = f"persistent://{namespace}/t"
            owner = live[0]
            assert cluster.owner_of(live, topic, via=owner) is owner
            client = pulsar.Client(
                live[1].service_url,
                operation_timeout_seconds=30,
                logger=pulsar.FileLogger(pulsar.LoggerLevel.Warn, str(base / f"client{index}.log")),
            )
            consumer = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
            producer = client.create_producer(topic, send_timeout_millis=60_000)
            cluster.send_and_receive(producer, consumer, "before", 1)
            if object_storage:
                producer.send(b"stored on the owner")  # received only after the move
            killed = time.monotonic()
            owner.kill()
            producer.send(b"after")
            acknowledged = time.monotonic()
            # "before" may come again: its acknowledgement may not have been persisted yet.
            seen = []
            while not seen or seen[-1] != b"after":
                seen.append(consumer.receive(60_000).data())
            received = time.monotonic()
            if object_storage:
                assert b"stored on the owner" in seen, seen
            print(
                f"round {index}: send acknowledged {acknowledged - killed:.2f} s after the kill, "
                f"received {received - killed:.2f} s",
                flush=True,
            )
            client.close()
            live = [broker for broker in live if broker is not owner] + [start(f"b{3 + index}")]
    finally:
        for broker in brokers:
            broker.kill()
        etcd.send_signal(signal.SIGKILL)
        etcd.wait()
        if weed is not None:
            cluster.stop_weed(weed[0], weed[2])
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
