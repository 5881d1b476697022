"""Replicated subscriptions as the official client and pulsar-admin scripts switch them on: the
SUBSCRIBE flag (`replicate_subscription_state_enabled=True`), Pulsar's
`replicatedSubscriptionStatus` REST call and `?replicated=true` on creation; `isReplicated` in
stats, kept across a restart."""

from __future__ import annotations

import time
import urllib.request

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
    topic_path,
    REPLICATION_TIMEOUT_S,
    await_condition,
    clusters_factory,  # noqa: F401 (fixture)
)

Earliest = pulsar.InitialPosition.Earliest


def backlog(clusters, cluster: str, topic: str, subscription: str):
    subscriptions = clusters.stats(cluster, topic)["subscriptions"]
    return subscriptions.get(subscription, {}).get("msgBacklog")


def await_backlog(clusters, cluster: str, topic: str, subscription: str, expected: int, what: str):
    await_condition(
        lambda: backlog(clusters, cluster, topic, subscription) == expected,
        REPLICATION_TIMEOUT_S,
        f"{cluster}'s subscription {subscription}: {what} (backlog {expected})",
    )


def shared_consumers(clusters, cluster: str, topic: str, subscription: str, count: int,
                     consumer_type=pulsar.ConsumerType.Shared):
    return [
        clusters.client(cluster).subscribe(
            topic, subscription, consumer_type=consumer_type,
            initial_position=Earliest, replicate_subscription_state_enabled=True,
            negative_ack_redelivery_delay_ms=100,
        )
        for _ in range(count)
    ]


def consume_with_nacks(consumers, expected: int, decide) -> set:
    """Receives until each of `expected` distinct messages is settled. `decide(payload,
    delivery)` (delivery counts from 1) answers "ack", "nack" (negative acknowledgement: it is
    redelivered) or "keep" (left unacknowledged); returns the payloads kept."""
    kept, settled, deliveries = set(), set(), {}
    deadline = time.monotonic() + REPLICATION_TIMEOUT_S
    while len(settled) < expected:
        assert time.monotonic() < deadline, f"settled {len(settled)} of {expected}"
        for consumer in consumers:
            try:
                message = consumer.receive(timeout_millis=200)
            except pulsar.Timeout:
                continue
            payload = message.data()
            deliveries[payload] = deliveries.get(payload, 0) + 1
            action = decide(payload, deliveries[payload])
            if action == "nack":
                consumer.negative_acknowledge(message)
                continue
            settled.add(payload)
            if action == "keep":
                kept.add(payload)
            else:
                consumer.acknowledge(message)
    return kept


def acks_nacks_and_keeps(payload: bytes, delivery: int) -> str:
    """Out of order: keeps those ending in 0 and 3; nacks those ending in 5 and 7 once, then
    keeps the 5s and acknowledges the 7s; acknowledges the rest."""
    digit = int(payload[1:]) % 10
    if digit in (0, 3):
        return "keep"
    if digit in (5, 7):
        return "nack" if delivery == 1 else ("keep" if digit == 5 else "ack")
    return "ack"


def report_duplicates(scenario: str, ours: int, payloads, unacknowledged, synced=None) -> None:
    """Prints, for the scenario, our duplicates next to those of a mark-delete-only sync
    (Pulsar's) on the same history, synced at the same moments: it redelivers everything from
    the first message not acknowledged in the last state the other cluster got (`synced`, by
    default `unacknowledged`) on; duplicates are those not in `unacknowledged`. `payloads` is
    the order of the log, or a list of such orders (one per partition).
    docs/BENCHMARKS.md collects these lines."""
    synced = unacknowledged if synced is None else synced
    logs = payloads if payloads and isinstance(payloads[0], list) else [payloads]
    redelivered = sum(mark_delete_only_redeliveries(log, set(synced)) for log in logs)
    mark_delete_only = redelivered - len(unacknowledged)
    print(f"\nduplicates [{scenario}]: ours {ours}; mark-delete-only {mark_delete_only}")


def consume(consumers, expected: int, keep) -> set:
    """Receives `expected` messages from the consumers, acknowledging those `keep(payload)` says
    not to keep; returns the payloads left unacknowledged."""
    unacknowledged = set()
    received = 0
    deadline = time.monotonic() + REPLICATION_TIMEOUT_S
    while received < expected:
        assert time.monotonic() < deadline, f"received {received} of {expected}"
        for consumer in consumers:
            try:
                message = consumer.receive(timeout_millis=200)
            except pulsar.Timeout:
                continue
            received += 1
            if keep(message.data()):
                unacknowledged.add(message.data())
            else:
                consumer.acknowledge(message)
    return unacknowledged


def mark_delete_only_redeliveries(payloads: list, unacknowledged: set) -> int:
    """What a mark-delete-only sync (Pulsar's) would redeliver: everything from the first
    unacknowledged message on."""
    first = next((index for index, payload in enumerate(payloads) if payload in unacknowledged), len(payloads))
    return len(payloads) - first


def assert_nothing_more(consumer) -> None:
    try:
        extra = consumer.receive(timeout_millis=1000)
    except pulsar.Timeout:
        return
    pytest.fail(f"delivered {extra.data()!r} again")


def replicated_topic(clusters, names, prefix: str) -> str:
    namespace = clusters.new_namespace(prefix)
    clusters.create_replicated_namespace(namespace, list(names))
    return f"persistent://{namespace}/orders"


def produce(clusters, cluster: str, topic: str, count: int, prefix: str = "m") -> list:
    """Sends `count` messages `<prefix><index>` (three digits)."""
    producer = clusters.client(cluster).create_producer(topic, batching_enabled=False)
    payloads = [f"{prefix}{index:03d}".encode() for index in range(count)]
    for payload in payloads:
        producer.send(payload)
    producer.close()
    return payloads


def test_graceful_failover_and_failback_deliver_exactly_the_unacknowledged_messages(clusters_factory):
    """Two clusters replicating both ways. On a, two Shared consumers acknowledge 70 of 100
    messages out of order and negative-acknowledge 20 (redelivered: half then acknowledged,
    half left) and leave: b's copy of the subscription then holds exactly the 30 others, and
    consumers that move to b get those 30 and nothing else. Back on a after b acknowledged ten
    of them: exactly the other 20. A mark-delete-only sync (Pulsar's) would have redelivered
    everything from the first unacknowledged message on (printed for comparison)."""
    clusters = clusters_factory(("a", "b"))
    topic = replicated_topic(clusters, ("a", "b"), "failover")
    subscription = "billing"

    on_a = shared_consumers(clusters, "a", topic, subscription, 2)
    payloads = produce(clusters, "a", topic, 100)
    await_backlog(clusters, "b", topic, subscription, 100, "created with every message")

    left_on_a = consume_with_nacks(on_a, 100, acks_nacks_and_keeps)
    assert len(left_on_a) == 30
    for consumer in on_a:
        consumer.close()
    await_backlog(clusters, "b", topic, subscription, 30, "exactly a's unacknowledged messages")
    on_b = shared_consumers(clusters, "b", topic, subscription, 1)[0]
    messages = receive_n(on_b, 30)
    assert {message.data() for message in messages} == left_on_a
    assert_nothing_more(on_b)
    report_duplicates("graceful a->b, Shared, nacks", 0, payloads, left_on_a)

    # b acknowledges the ten ending in 0; back on a, exactly the 20 ending in 3 and 5 arrive.
    left_on_b = set()
    for message in messages:
        if int(message.data()[1:]) % 10 in (3, 5):
            left_on_b.add(message.data())
        else:
            on_b.acknowledge(message)
    on_b.close()
    await_backlog(clusters, "a", topic, subscription, 20, "exactly b's unacknowledged messages")
    back_on_a = shared_consumers(clusters, "a", topic, subscription, 1)[0]
    assert {message.data() for message in receive_n(back_on_a, 20)} == left_on_b
    assert_nothing_more(back_on_a)
    report_duplicates("graceful failback b->a", 0, payloads, left_on_b)


def test_key_shared_graceful_switch_keeps_each_keys_order(clusters_factory):
    """Two Key_Shared consumers on a acknowledge out of order and negative-acknowledge some of
    100 keyed messages, then leave. A Key_Shared consumer on b gets exactly the 30 left
    unacknowledged, each key's in the order they were produced."""
    clusters = clusters_factory(("a", "b"))
    topic = replicated_topic(clusters, ("a", "b"), "keyshared")
    subscription = "billing"
    on_a = shared_consumers(clusters, "a", topic, subscription, 2, pulsar.ConsumerType.KeyShared)
    producer = clusters.client("a").create_producer(topic, batching_enabled=False)
    payloads = [f"m{index:03d}".encode() for index in range(100)]
    for index, payload in enumerate(payloads):
        producer.send(payload, partition_key=f"key-{index % 7}")
    producer.close()
    await_backlog(clusters, "b", topic, subscription, 100, "created with every message")

    left_on_a = consume_with_nacks(on_a, 100, acks_nacks_and_keeps)
    for consumer in on_a:
        consumer.close()
    await_backlog(clusters, "b", topic, subscription, 30, "exactly a's unacknowledged messages")
    on_b = shared_consumers(clusters, "b", topic, subscription, 1, pulsar.ConsumerType.KeyShared)[0]
    messages = receive_n(on_b, 30)
    assert {message.data() for message in messages} == left_on_a
    by_key = {}
    for message in messages:
        by_key.setdefault(message.partition_key(), []).append(int(message.data()[1:]))
    assert all(indexes == sorted(indexes) for indexes in by_key.values()), by_key
    assert_nothing_more(on_b)
    report_duplicates("graceful a->b, Key_Shared, nacks", 0, payloads, left_on_a)


def test_a_killed_cluster_loses_nothing_and_repeats_at_most_its_last_acknowledgements(clusters_factory):
    """a acknowledges half of 100 messages and the state reaches b; then a acknowledges ten more
    and is killed with SIGKILL at once. b delivers every message a had not acknowledged, and
    repeats at most those last ten."""
    clusters = clusters_factory(("a", "b"))
    topic = replicated_topic(clusters, ("a", "b"), "killed")
    subscription = "billing"
    on_a = shared_consumers(clusters, "a", topic, subscription, 1)[0]
    payloads = produce(clusters, "a", topic, 100)
    await_backlog(clusters, "b", topic, subscription, 100, "created with every message")

    first_half = consume([on_a], 50, keep=lambda payload: False)
    assert not first_half
    await_backlog(clusters, "b", topic, subscription, 50, "a's first 50 acknowledgements arrived")
    last_ten = [on_a.receive(timeout_millis=10_000) for _ in range(10)]
    for message in last_ten:
        on_a.acknowledge(message)
    clusters["a"].broker.kill()

    on_b = shared_consumers(clusters, "b", topic, subscription, 1)[0]
    never_acknowledged = set(payloads[60:])
    delivered = set()
    await_condition(
        lambda: delivered.update(message.data() for message in _drain(on_b)) or never_acknowledged <= delivered,
        REPLICATION_TIMEOUT_S,
        "b delivers every message a never acknowledged",
    )
    assert_nothing_more(on_b)
    repeated = delivered - never_acknowledged
    assert repeated <= {message.data() for message in last_ten}, repeated
    report_duplicates("kill -9 of a, 10 acks unsynced", len(repeated), payloads,
                      never_acknowledged, synced=payloads[50:])


def _drain(consumer) -> list:
    messages = []
    while True:
        try:
            messages.append(consumer.receive(timeout_millis=100))
        except pulsar.Timeout:
            return messages


def test_seek_and_skip_carry_over(clusters_factory):
    """On a, everything is acknowledged, then the subscription is moved back to the start (a
    consumer's seek) and then skips 30 through the admin API: b's copy follows each move, so
    consumers moving to b get exactly the 70 messages after the skipped ones."""
    clusters = clusters_factory(("a", "b"))
    topic = replicated_topic(clusters, ("a", "b"), "seek")
    subscription = "audit"
    on_a = shared_consumers(clusters, "a", topic, subscription, 1)[0]
    payloads = produce(clusters, "a", topic, 100)
    assert not consume([on_a], 100, keep=lambda payload: False)
    await_backlog(clusters, "b", topic, subscription, 0, "everything acknowledged in a")

    on_a.seek(pulsar.MessageId.earliest)
    await_backlog(clusters, "b", topic, subscription, 100, "moved back to the start like a")
    on_a.close()
    clusters.admin("a", "POST", f"{topic_path(topic)}/subscription/{subscription}/skip/30")
    await_backlog(clusters, "b", topic, subscription, 70, "30 skipped like a")

    on_b = shared_consumers(clusters, "b", topic, subscription, 1)[0]
    assert {message.data() for message in receive_n(on_b, 70)} == set(payloads[30:])
    assert_nothing_more(on_b)
    report_duplicates("seek to start, skip 30", 0, payloads, set(payloads[30:]))


def test_one_way_state_for_entries_not_yet_arrived_is_applied_when_they_arrive(clusters_factory):
    """One-way replication a -> b (b's list is [b]). While the a -> b link is cut, a produces 100
    messages and acknowledges 60 of them out of order; the state reaches b (over the admin API)
    before the messages do. Once the link heals, b's subscription acknowledges them as they
    arrive: it holds exactly the 40 a did not acknowledge."""
    clusters = clusters_factory(("a", "b"))
    namespace = clusters.new_namespace("oneway")
    clusters.create_replicated_namespace(namespace, ["b"], on=["b"])
    clusters.create_replicated_namespace(namespace, ["a", "b"], on=["a"])
    topic = f"persistent://{namespace}/orders"
    subscription = "billing"
    on_a = shared_consumers(clusters, "a", topic, subscription, 1)[0]
    produce(clusters, "a", topic, 1, prefix="x")  # the topic exists on b, with the subscription
    assert not consume([on_a], 1, keep=lambda payload: False)
    await_backlog(clusters, "b", topic, subscription, 0, "created by a's state")

    clusters.link("a", "b").cut()
    payloads = produce(clusters, "a", topic, 100)
    left = consume([on_a], 100, keep=lambda payload: int(payload[1:]) % 5 in (1, 4))
    assert len(left) == 40
    on_a.close()
    clusters.link("a", "b").heal()
    await_backlog(clusters, "b", topic, subscription, 40, "a's 40 unacknowledged messages")
    on_b = shared_consumers(clusters, "b", topic, subscription, 1)[0]
    assert {message.data() for message in receive_n(on_b, 40)} == left
    assert_nothing_more(on_b)
    report_duplicates("one-way a->b, state before data", 0, payloads, left)


def test_three_clusters_a_partitioned_topic_key_shared_and_a_restart(clusters_factory):
    """Three clusters in a full mesh and a topic with two partitions. A Key_Shared subscription
    on a acknowledges 75 of 120 keyed messages out of order; b and c both end with exactly the
    other 45, c keeps them across a restart, and consumers on c get those 45, each key's
    messages in order."""
    clusters = clusters_factory(("a", "b", "c"))
    namespace = clusters.new_namespace("mesh")
    clusters.create_replicated_namespace(namespace, ["a", "b", "c"])
    topic = f"persistent://{namespace}/orders"
    for cluster in ("a", "b", "c"):
        clusters.create_partitioned_topic(cluster, topic, 2)
    subscription = "shipping"
    on_a = clusters.client("a").subscribe(
        topic, subscription, consumer_type=pulsar.ConsumerType.KeyShared,
        initial_position=Earliest, replicate_subscription_state_enabled=True,
    )
    producer = clusters.client("a").create_producer(topic, batching_enabled=False)
    payloads = [f"m{index:03d}".encode() for index in range(120)]
    for index, payload in enumerate(payloads):
        producer.send(payload, partition_key=f"key-{index % 6}")

    def total_backlog(cluster):
        stats = clusters.partitioned_stats(cluster, topic)
        return stats.get("subscriptions", {}).get(subscription, {}).get("msgBacklog")

    for cluster in ("b", "c"):
        await_condition(lambda: total_backlog(cluster) == 120, REPLICATION_TIMEOUT_S, f"{cluster} has the subscription")
    left = consume([on_a], 120, keep=lambda payload: int(payload[1:]) % 8 in (1, 2, 6))
    assert len(left) == 45
    on_a.close()
    for cluster in ("b", "c"):
        await_condition(lambda: total_backlog(cluster) == 45, REPLICATION_TIMEOUT_S, f"{cluster} holds a's 45")

    clusters["c"].broker.restart()
    assert total_backlog("c") == 45, "the applied state survives a restart"
    on_c = clusters.client("c").subscribe(topic, subscription, consumer_type=pulsar.ConsumerType.KeyShared)
    messages = receive_n(on_c, 45)
    assert {message.data() for message in messages} == left
    by_key = {}
    for message in messages:
        by_key.setdefault(message.partition_key(), []).append(int(message.data()[1:]))
    assert all(indexes == sorted(indexes) for indexes in by_key.values()), by_key
    assert_nothing_more(on_c)
    # Mark-delete-only syncs each partition: a message's partition is its key's.
    partition_of = {message.partition_key(): message.topic_name() for message in messages}
    partitions = {}
    for index, payload in enumerate(payloads):
        partitions.setdefault(partition_of.get(f"key-{index % 6}"), []).append(payload)
    report_duplicates("3 clusters, 2 partitions, Key_Shared, restart", 0, list(partitions.values()), left)


def test_failover_subscription_cumulative_acknowledgements(clusters_factory):
    """A Failover subscription acknowledged cumulatively up to the 60th of 100 messages on a:
    b delivers exactly the last 40."""
    clusters = clusters_factory(("a", "b"))
    topic = replicated_topic(clusters, ("a", "b"), "failover-type")
    subscription = "ledger"
    on_a = clusters.client("a").subscribe(
        topic, subscription, consumer_type=pulsar.ConsumerType.Failover,
        initial_position=Earliest, replicate_subscription_state_enabled=True,
    )
    payloads = produce(clusters, "a", topic, 100)
    await_backlog(clusters, "b", topic, subscription, 100, "created with every message")
    messages = receive_n(on_a, 60)
    on_a.acknowledge_cumulative(messages[-1])
    on_a.close()
    await_backlog(clusters, "b", topic, subscription, 40, "a's cumulative acknowledgement")

    # Stats and metrics say where the sync stands, on both sides.
    def sync_stats(cluster):
        stats = clusters.stats(cluster, topic)["subscriptions"][subscription]
        return stats.get("replicatedSubscriptionSync", {})

    await_condition(
        lambda: sync_stats("a").get("b", {}).get("unsentForMs") == 0,
        REPLICATION_TIMEOUT_S,
        "a's stats show b has its state",
    )
    assert sync_stats("a")["b"]["lastSentTimestamp"] > 0
    assert sync_stats("b")["a"]["lastReceivedTimestamp"] > 0
    with urllib.request.urlopen(clusters["a"].web_url + "/metrics", timeout=20) as response:
        metrics = response.read().decode()
    assert f'subscription="{subscription}",remote_cluster="b"' in metrics
    assert "meridian_replicated_subscription_unsent_seconds" in metrics

    on_b = clusters.client("b").subscribe(topic, subscription, consumer_type=pulsar.ConsumerType.Failover)
    assert [message.data() for message in receive_n(on_b, 40)] == payloads[60:]
    assert_nothing_more(on_b)
    report_duplicates("Failover, cumulative", 0, payloads, set(payloads[60:]))


def test_a_namespace_sets_its_own_sync_interval_and_a_closing_consumer_still_syncs_at_once(clusters_factory):
    """The namespace on a syncs only every 60 s, yet the acknowledgements of a consumer that
    closes reach b at once; the interval is validated and can be removed again."""
    clusters = clusters_factory(("a", "b"))
    topic = replicated_topic(clusters, ("a", "b"), "interval")
    namespace = topic.split("//", 1)[1].rsplit("/", 1)[0]
    path = f"/admin/v2/namespaces/{namespace}/replicatedSubscriptionSyncInterval"
    subscription = "slow"
    on_a = shared_consumers(clusters, "a", topic, subscription, 1)[0]
    produce(clusters, "a", topic, 20)
    await_backlog(clusters, "b", topic, subscription, 20, "created with every message")

    clusters.admin("a", "POST", path, 60_000)
    assert clusters.admin("a", "GET", path) == 60_000
    status, _ = clusters.call("a", "POST", path, 5)
    assert status == 400
    assert not consume([on_a], 10, keep=lambda payload: False)
    on_a.close()
    await_backlog(clusters, "b", topic, subscription, 10, "synced when the consumer closed")
    clusters.admin("a", "DELETE", path)
    assert clusters.admin("a", "GET", path) is None
