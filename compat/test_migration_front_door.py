"""Issue 14, test 2: producers and consumers that know only the lookup front door's URL follow
their tenant through a live migration from a to b (docs/migration.md, docs/lookup.md).

It uses the front door fixture of test_lookup_front_door.py.

Two producers (keys k0..k7, no batching) and two subscriptions, Shared and Key_Shared, with two
consumers each that acknowledge out of order (every window of messages acknowledged backwards),
run continuously while the tenant migrates. Every client is created with the front door's URL.
At the end: every acknowledged send delivered exactly once per subscription, per-key order kept
on the Key_Shared subscription, every producer and consumer connected to b and none to a, and
the front door sends the tenant's topics to b.
"""

from __future__ import annotations

import pulsar
import pytest

from helpers import unique
from replication_harness import (
    REPLICATION_TIMEOUT_S,
    ConsumerThread,
    History,
    await_condition,
    check_exactly_once,
    clusters_factory,  # noqa: F401 (fixture)
    parse_payload,
)
from test_lookup_front_door import front_doors, looked_up_url  # noqa: F401 (fixture)

RATE = 40  # messages per second per producer
BEFORE = 60  # messages per producer sent before the migration starts
AFTER = 60  # messages per producer sent after the migration is done
ACK_WINDOW = 5  # a consumer acknowledges each window of this many messages in reverse order
KEYS = [f"k{i}" for i in range(8)]
PHASES = ["copyingMetadata", "replicating", "caughtUp", "subscriptionsSynced",
          "producersRedirected", "consumersRedirected", "done"]


@pytest.mark.timeout(600)
def test_clients_of_the_front_door_follow_their_tenant_through_a_live_migration(
    clusters_factory, front_doors, client_factory
):
    clusters = clusters_factory(names=("a", "b"))
    tenant = unique("move")
    namespace = f"{tenant}/ns"
    topic = f"persistent://{namespace}/orders"
    clusters.create_tenant(tenant, on=["a"], allowed=["a"])
    clusters.admin("a", "PUT", f"/admin/v2/namespaces/{namespace}")
    # A second tenant on a keeps working throughout and stays there.
    bystander = unique("stay")
    clusters.create_tenant(bystander, on=["a"], allowed=["a"])
    clusters.admin("a", "PUT", f"/admin/v2/namespaces/{bystander}/ns")

    door = front_doors(clusters)
    history = History()
    consumers = []
    for subscription, kind in (("shared", pulsar.ConsumerType.Shared),
                               ("keyed", pulsar.ConsumerType.KeyShared)):
        for index in range(2):
            consumer = client_factory(door).subscribe(
                topic, subscription, consumer_type=kind,
                initial_position=pulsar.InitialPosition.Earliest,
                consumer_name=f"{subscription}-{index}",
            )
            thread = ConsumerThread(history, subscription, consumer, ack_window=ACK_WINDOW)
            thread.start()
            consumers.append(thread)
    producers = []
    for name in ("p0", "p1"):
        producer = client_factory(door).create_producer(
            topic, producer_name=name, batching_enabled=False, send_timeout_millis=0,
        )
        producers.append(clusters.start_producer(
            history, producer, name, "a", rate=RATE,
            send_kwargs=lambda index: {"partition_key": KEYS[index % len(KEYS)]},
        ))
    await_condition(lambda: all(p.acked() >= BEFORE for p in producers), REPLICATION_TIMEOUT_S,
                    "the producers to get going on a")

    clusters.admin("a", "POST", f"/admin/v2/tenants/{tenant}/migration", {"targetCluster": "b"})
    seen = set()

    def done():
        status = clusters.admin("a", "GET", f"/admin/v2/tenants/{tenant}/migration")
        seen.add(status["phase"])
        assert not status["paused"], status
        return status["phase"] == "done"

    await_condition(done, 4 * REPLICATION_TIMEOUT_S, "the migration to be done")
    sent_when_done = {p.producer_id: p.count for p in producers}
    await_condition(lambda: all(p.count >= sent_when_done[p.producer_id] + AFTER
                                for p in producers),
                    REPLICATION_TIMEOUT_S, "the producers to go on sending after the migration")
    for producer in producers:
        producer.stop()
    assert not history.failed(), history.failed()[:5]
    expected = history.sent_payloads(acked_only=True)
    await_condition(
        lambda: all(history.received_count(label) >= len(expected)
                    for label in ("shared", "keyed")),
        REPLICATION_TIMEOUT_S, "every message to be delivered on both subscriptions",
    )
    for consumer in consumers:
        consumer.stop()

    # Exactly once on each subscription; per-key order on Key_Shared (a key's messages from one
    # producer must arrive in that producer's order).
    key_of = {record.payload: record.key for record in history.sent()}
    # Two threads record the Shared subscription's deliveries, so only membership is checked.
    check_exactly_once({"shared": expected}, history, order_group=lambda _c, payload: payload)
    check_exactly_once(
        {"keyed": expected}, history,
        order_group=lambda _cluster, payload: (parse_payload(payload)[0], key_of.get(payload)),
    )
    # Every client is on b, none on a; the front door sends the topic to b.
    def clients(publishers):  # replicators between the clusters are not clients
        return sorted(p["producerName"] for p in publishers
                      if not p["producerName"].startswith("pulsar.repl"))

    stats_b = clusters.stats("b", topic)
    assert clients(stats_b["publishers"]) == ["p0", "p1"], stats_b
    for subscription in ("shared", "keyed"):
        assert len(stats_b["subscriptions"][subscription]["consumers"]) == 2, stats_b
    status, stats_a = clusters.call("a", "GET", f"/admin/v2/persistent/{namespace}/orders/stats")
    if status == 200:
        assert not clients(stats_a["publishers"]), stats_a
        assert all(not sub["consumers"] for sub in stats_a["subscriptions"].values()), stats_a
    assert looked_up_url(door, topic) == clusters["b"].service_url
    # The other tenant stayed on a and still works.
    assert looked_up_url(door, f"persistent://{bystander}/ns/t") == clusters["a"].service_url
    client_factory(door).create_producer(f"persistent://{bystander}/ns/t").send(b"still on a")
