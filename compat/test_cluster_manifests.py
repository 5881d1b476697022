"""Cluster mode's object-store log, trimmed (issue 17, docs/cluster.md "Built: manifests,
trimming and the orphan sweep"): once every subscription acknowledged a topic's early messages
and retention lets them go, the owner's local log trims them and so does the index in etcd, so
the next owner no longer copies them.

Two `meridian broker --storage s3://...` processes of cluster c2 on this module's etcd and
SeaweedFS (the fixtures of `test_cluster_mode`, imported, not copied), with small segments
so that a few hundred KB of messages fill several.
"""

from __future__ import annotations

import json

import pulsar
import pytest

from helpers import assert_no_more, receive_n, unique, wait_until
from test_cluster_mode import (  # noqa: F401  (fixtures are used by name)
    OBJECT_CLUSTER,
    etcd,
    etcd_range,
    http,
    new_client,
    object_brokers,
    object_store,
    owner_of,
    stored_cursor,
)

@pytest.fixture(scope="module")
def trimming_brokers(etcd, object_store, meridian_bin, tmp_path_factory):  # noqa: F811
    # Segments of 128 KiB (they must hold one entry of max_message_size + 11 KiB), trimmed
    # every 100 ms.
    with object_brokers(etcd, object_store, meridian_bin, tmp_path_factory, "trimming-broker", 2,
                        200, {"max_message_size": 65536},
                        {"segment_max_bytes": 131072, "trim_interval_ms": 100}) as brokers:
        yield brokers


def head(etcd_url: str, topic: str):
    """The topic's `logs/<topic>/head` in etcd, or None."""
    found = etcd_range(etcd_url, f"/meridian/{OBJECT_CLUSTER}/logs/{topic}/head")
    return next((kv["value"] for kv in found if kv["key"].endswith("/head")), None)


def test_trimmed_messages_leave_the_object_store_index_and_a_new_owner_copies_the_rest(
    trimming_brokers, etcd, tmp_path  # noqa: F811
):
    first, second = trimming_brokers
    namespace = f"public/{unique('trimmed')}"
    status, _, body = http("PUT", f"{first.web_url}/admin/v2/namespaces/{namespace}")
    assert status in (200, 204), (status, body)
    # Retention 0: segments every subscription passed are deleted at once.
    retention = json.dumps({"retentionTimeInMinutes": 0, "retentionSizeInMB": 0}).encode()
    status, _, body = http(
        "POST", f"{first.web_url}/admin/v2/namespaces/{namespace}/retention", body=retention
    )
    assert status in (200, 204), (status, body)
    topic = f"persistent://{namespace}/t"
    owner = owner_of(trimming_brokers, topic, via=first)
    other = second if owner is first else first
    payloads = [f"{index:04d}/".encode() + b"x" * 4000 for index in range(100)]

    client = new_client(owner, tmp_path, "client")
    try:
        consumer = client.subscribe(
            topic, "s", initial_position=pulsar.InitialPosition.Earliest
        )
        producer = client.create_producer(topic, batching_enabled=False)
        for data in payloads:
            producer.send(data)
        received = receive_n(consumer, len(payloads))
        assert [message.data() for message in received] == payloads
        for message in received:
            consumer.acknowledge(message)
        # The cursor reaches etcd, the local log trims its consumed segments, and so does the
        # index: the head's first entry moves past 0 (it is absent, 0, until a trim).
        wait_until(
            lambda: (stored_cursor(etcd, topic, "s") or {}).get("mark_delete") == 99,
            "the acknowledgements persisted in etcd",
            timeout_s=30,
        )
        wait_until(
            lambda: (head(etcd, topic) or {}).get("first_entry", 0) > 0,
            "the index trimmed",
            timeout_s=30,
        )
        trimmed = head(etcd, topic)["first_entry"]
        assert trimmed < 100, trimmed
        consumer.close()
        producer.close()
    finally:
        client.close()

    # The bundle moves: the next owner copies entries `trimmed` on, no earlier one.
    status, _, body = http("PUT", f"{owner.web_url}/admin/v2/namespaces/{namespace}/unload")
    assert status in (200, 204), (status, body)
    client = new_client(other, tmp_path, "client-after")
    try:
        reader = client.subscribe(
            topic, "fresh", initial_position=pulsar.InitialPosition.Earliest
        )
        messages = receive_n(reader, 100 - trimmed)
        assert [message.data() for message in messages] == payloads[trimmed:]
        assert_no_more(reader, what="an entry before the trim point")
        # The old subscription lost nothing: it acknowledged everything, and new messages flow.
        consumer = client.subscribe(topic, "s")
        client.create_producer(topic).send(b"after")
        assert consumer.receive(timeout_millis=30_000).data() == b"after"
    finally:
        client.close()
