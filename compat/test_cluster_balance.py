"""Cluster mode's load balancer (issue 17): bundles move off a busy broker by themselves.

Runs on the fixtures of `test_cluster_mode.py` (a real etcd, a real SeaweedFS, real
`meridian broker` processes on the object store) and the official Python client.
"""

from __future__ import annotations

import threading
import time

import pulsar

from helpers import unique, wait_until
from test_cluster_mode import (  # noqa: F401  (fixtures are used by name)
    CURSOR_PERSIST_INTERVAL_MS,
    OBJECT_CLUSTER,
    etcd,
    etcd_range,
    http,
    new_client,
    object_brokers,
    object_store,
    owner_of,
    owns,
    topics_in_distinct_bundles,
)

# Reports and decisions every second, and every bundle worth moving: a test-sized balancer.
BALANCER = {
    "load_balancer_report_interval_seconds": 1,
    "load_balancer_shedding_interval_seconds": 1,
    "load_balancer_bundle_unload_min_throughput_threshold": 0,
}


def test_the_load_balancer_moves_bundles_off_a_busy_broker_under_load(
    etcd, object_store, meridian_bin, tmp_path_factory, tmp_path
):
    # Models a cluster where one broker took every bundle of a busy namespace (all lookups went
    # through it) while another broker idles: the leader sees the imbalance in the load reports
    # and moves bundles, one at a time, until the two carry the same traffic; producers and
    # consumers follow by themselves with nothing lost, repeated or reordered.
    with object_brokers(etcd, object_store, meridian_bin, tmp_path_factory, "balanced-broker", 2,
                        CURSOR_PERSIST_INTERVAL_MS, BALANCER) as brokers:
        busy, idle = brokers
        namespace = f"public/{unique('balance')}"
        status, _, body = http("PUT", f"{busy.web_url}/admin/v2/namespaces/{namespace}")
        assert status in (200, 204), (status, body)
        topics = topics_in_distinct_bundles(namespace, 4)
        for topic in topics:
            assert owner_of(brokers, topic, via=busy) is busy
        client = new_client(busy, tmp_path, "client")
        try:
            producers, consumers = {}, {}
            for topic in topics:
                consumers[topic] = client.subscribe(
                    topic, "s", initial_position=pulsar.InitialPosition.Earliest
                )
                producers[topic] = client.create_producer(
                    topic, send_timeout_millis=60_000, batching_enabled=False,
                    block_if_queue_full=True,
                )
            results: dict[tuple[str, bytes], pulsar.Result] = {}
            sent: dict[str, list[bytes]] = {topic: [] for topic in topics}
            stop = threading.Event()

            def produce():
                index = 0
                while not stop.is_set():
                    payload = f"m{index}".encode() + b"." * 1024
                    for topic in topics:
                        sent[topic].append(payload)
                        producers[topic].send_async(
                            payload,
                            lambda result, _id, key=(topic, payload): results.__setitem__(key, result),
                        )
                    index += 1
                    time.sleep(0.005)  # pacing: a steady load, not a synchronisation

            producing = threading.Thread(target=produce, name="producer")
            producing.start()
            try:
                wait_until(
                    lambda: sum(owns(idle, topic) for topic in topics) == 2,
                    "the load balancer moved two of the busy broker's four bundles",
                    timeout_s=120,
                )
            finally:
                stop.set()
                producing.join()
            for producer in producers.values():
                producer.flush()
            total = sum(len(payloads) for payloads in sent.values())
            wait_until(lambda: len(results) == total, "every send answered")
            failed = {key: result for key, result in results.items() if result != pulsar.Result.Ok}
            assert not failed, failed
            for topic in topics:
                seen: list[bytes] = []
                while not set(sent[topic]) <= set(seen):
                    message = consumers[topic].receive(timeout_millis=30_000)
                    seen.append(message.data())
                    consumers[topic].acknowledge(message)
                # Resends after a move may repeat a message; the first occurrences are the
                # sent order.
                assert list(dict.fromkeys(seen)) == sent[topic], topic

            # Balanced and staying so: two bundles each, and the moves were the leader's.
            owners = etcd_range(etcd, f"/meridian/{OBJECT_CLUSTER}/owners/{namespace}/")
            by_broker: dict[str, int] = {}
            for entry in owners:
                broker_id = entry["value"]["broker_id"]
                by_broker[broker_id] = by_broker.get(broker_id, 0) + 1
            assert sorted(by_broker.values()) == [2, 2], owners
            reports = etcd_range(etcd, f"/meridian/{OBJECT_CLUSTER}/load/")
            assert len(reports) == 2, reports
            assert "moving a bundle off the busiest broker" in busy.log_text() + idle.log_text()
        finally:
            client.close()
