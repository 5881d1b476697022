"""Replicated subscriptions as the official client and pulsar-admin scripts switch them on: the
SUBSCRIBE flag (`replicate_subscription_state_enabled=True`), Pulsar's
`replicatedSubscriptionStatus` REST call and `?replicated=true` on creation; `isReplicated` in
stats, kept across a restart."""

from __future__ import annotations

import pytest

from test_admin import call, ok


def subscription_stats(broker, topic_path, subscription):
    return ok(broker, "GET", f"{topic_path}/stats")["subscriptions"][subscription]


def test_a_consumer_switches_replication_on_and_the_admin_api_off(broker_factory, client_factory):
    broker = broker_factory.start()
    client = client_factory(broker)
    topic = "persistent://public/default/replicated-flag"
    path = "/admin/v2/persistent/public/default/replicated-flag"

    plain = client.subscribe(topic, "plain")
    replicated = client.subscribe(topic, "orders", replicate_subscription_state_enabled=True)
    assert subscription_stats(broker, path, "orders")["isReplicated"] is True
    assert subscription_stats(broker, path, "plain")["isReplicated"] is False

    # A consumer without the flag does not switch it off.
    replicated.close()
    client.subscribe(topic, "orders").close()
    assert subscription_stats(broker, path, "orders")["isReplicated"] is True
    assert ok(broker, "GET", f"{path}/subscription/orders/replicatedSubscriptionStatus") == {
        topic: True
    }

    ok(broker, "POST", f"{path}/subscription/plain/replicatedSubscriptionStatus", True)
    ok(broker, "POST", f"{path}/subscription/orders/replicatedSubscriptionStatus", False)
    ok(broker, "PUT", f"{path}/subscription/created?replicated=true")
    plain.close()

    broker.restart()
    statuses = {
        name: subscription_stats(broker, path, name)["isReplicated"]
        for name in ("plain", "orders", "created")
    }
    assert statuses == {"plain": True, "orders": False, "created": True}

    status, reply = call(broker, "POST", f"{path}/subscription/missing/replicatedSubscriptionStatus", True)
    assert status == 404 and "missing" in reply["reason"]
    status, reply = call(broker, "POST", f"{path}/subscription/orders/replicatedSubscriptionStatus", "yes")
    assert status == 400, reply


def test_the_status_covers_every_partition(broker_factory, client_factory):
    broker = broker_factory.start()
    client = client_factory(broker)
    path = "/admin/v2/persistent/public/default/replicated-partitioned"
    ok(broker, "PUT", f"{path}/partitions", 2)
    client.subscribe("persistent://public/default/replicated-partitioned", "sub", replicate_subscription_state_enabled=True)
    statuses = ok(broker, "GET", f"{path}/subscription/sub/replicatedSubscriptionStatus")
    assert statuses == {
        f"persistent://public/default/replicated-partitioned-partition-{index}": True for index in range(2)
    }


# ------------------------------------------------------------------ failover between clusters

import pulsar  # noqa: E402

from helpers import receive_n  # noqa: E402
from replication_harness import (  # noqa: E402
    REPLICATION_TIMEOUT_S,
    await_condition,
    clusters_factory,  # noqa: F401 (fixture)
)

Earliest = pulsar.InitialPosition.Earliest


def backlog(clusters, cluster: str, topic: str, subscription: str):
    subscriptions = clusters.stats(cluster, topic)["subscriptions"]
    return subscriptions.get(subscription, {}).get("msgBacklog")


def test_graceful_failover_delivers_exactly_the_unacknowledged_messages(clusters_factory):
    """Two clusters replicating both ways. On a, two Shared consumers acknowledge 70 of 100
    messages out of order and leave; within a sync interval, b's copy of the subscription holds
    exactly the 30 others, and consumers that move to b get those 30 and nothing else (a
    mark-delete-only sync, Pulsar's, would have redelivered every message after the first
    unacknowledged one)."""
    clusters = clusters_factory(("a", "b"))
    namespace = clusters.new_namespace("failover")
    clusters.create_replicated_namespace(namespace, ["a", "b"])
    topic = f"persistent://{namespace}/orders"
    subscription = "billing"

    on_a = [
        clusters.client("a").subscribe(
            topic, subscription, consumer_type=pulsar.ConsumerType.Shared,
            initial_position=Earliest, replicate_subscription_state_enabled=True,
        )
        for _ in range(2)
    ]
    producer = clusters.client("a").create_producer(topic, batching_enabled=False)
    payloads = [f"m{index:03d}".encode() for index in range(100)]
    for payload in payloads:
        producer.send(payload)
    await_condition(
        lambda: backlog(clusters, "b", topic, subscription) == 100,
        REPLICATION_TIMEOUT_S,
        "b has the subscription with all 100 messages",
    )

    # Receive everything on a; acknowledge all but every 10th and the 3rd of each ten.
    unacknowledged = set()
    received = 0
    while received < 100:
        for consumer in on_a:
            try:
                message = consumer.receive(timeout_millis=200)
            except pulsar.Timeout:
                continue
            received += 1
            index = int(message.data()[1:])
            if index % 10 in (0, 3):
                unacknowledged.add(message.data())
            else:
                consumer.acknowledge(message)
    assert len(unacknowledged) == 20
    for consumer in on_a:
        consumer.close()

    await_condition(
        lambda: backlog(clusters, "b", topic, subscription) == 20,
        REPLICATION_TIMEOUT_S,
        "b's subscription holds exactly a's unacknowledged messages",
    )
    on_b = clusters.client("b").subscribe(
        topic, subscription, consumer_type=pulsar.ConsumerType.Shared,
        replicate_subscription_state_enabled=True,
    )
    delivered = {message.data() for message in receive_n(on_b, 20)}
    assert delivered == unacknowledged
    try:
        extra = on_b.receive(timeout_millis=1000)
        pytest.fail(f"b delivered {extra.data()!r} again")
    except pulsar.Timeout:
        pass
