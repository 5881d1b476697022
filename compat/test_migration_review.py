"""Hostile review of tenant migration (issue 14): cases the other migration tests leave out.

One `meridian standalone` per cluster (replication_harness.py); the official Python client.
"""

from __future__ import annotations

import threading

import pulsar

from replication_harness import (
    REPLICATION_TIMEOUT_S,
    History,
    await_condition,
    check_exactly_once,
    clusters_factory,  # noqa: F401 (fixture)
    topic_path,
)
from test_migration_redirect import two_clusters_and_a_tenant_on_a

HOLD = {"targetCluster": "b", "holdBeforeRedirect": True}


def migration(clusters, tenant: str) -> dict:
    return clusters.admin("a", "GET", f"/admin/v2/tenants/{tenant}/migration")


def migrate_to_b(clusters, tenant: str) -> None:
    """Migrates `tenant` from a to b, to the end (phase done)."""
    clusters.admin("a", "POST", f"/admin/v2/tenants/{tenant}/migration", {"targetCluster": "b"})
    await_condition(
        lambda: migration(clusters, tenant)["phase"] == "done",
        REPLICATION_TIMEOUT_S,
        "the migration to b to finish",
    )


def test_a_partitioned_topic_created_during_the_migration_gets_its_shape_on_the_target(
    clusters_factory,
):
    """A partitioned topic created on the source in a namespace that already migrates (nothing
    written to it yet) must exist on the target with its partition count before clients are
    sent there: clients ask the home for the partition count, and a target without it would
    serve them one non-partitioned topic instead."""
    clusters, tenant, namespace = two_clusters_and_a_tenant_on_a(clusters_factory)
    clusters.admin("a", "POST", f"/admin/v2/tenants/{tenant}/migration", HOLD)
    await_condition(
        lambda: migration(clusters, tenant)["phase"] == "subscriptionsSynced",
        REPLICATION_TIMEOUT_S,
        "the held migration to reach subscriptionsSynced",
    )
    late = f"persistent://{namespace}/late"
    clusters.create_partitioned_topic("a", late, 3)
    await_condition(
        lambda: clusters.partitions("b", late) == 3,
        REPLICATION_TIMEOUT_S,
        "the target to know the late partitioned topic with its 3 partitions",
    )
    # Grown on the source meanwhile: it grows on the target too.
    clusters.admin("a", "POST", f"/admin/v2/persistent/{namespace}/late/partitions", 5)
    await_condition(
        lambda: clusters.partitions("b", late) == 5,
        REPLICATION_TIMEOUT_S,
        "the target to follow the late topic's growth to 5 partitions",
    )


class NumberedFeed:
    """A producer sending numbered messages and a reader of the same topic: what was sent and
    what was read, in order."""

    def __init__(self, producer, reader):
        self.producer, self.reader = producer, reader
        self.sent, self.received = [], []

    @classmethod
    def on(cls, client, topic, **producer_options):
        """A producer of `topic` with these options and a reader of it from its start."""
        return cls(
            client.create_producer(topic, **producer_options),
            client.create_reader(topic, pulsar.MessageId.earliest),
        )

    def send(self, count):
        for _ in range(count):
            payload = f"m{len(self.sent)}".encode()
            self.producer.send_async(payload, None, partition_key=payload.decode())
            self.sent.append(payload)
        self.producer.flush()

    def read_until(self, count):
        while len(self.received) < count:
            message = self.reader.read_next(timeout_millis=int(REPLICATION_TIMEOUT_S * 1000))
            self.received.append(message.data())


def test_a_reader_follows_its_tenant_without_losing_or_repeating_messages(clusters_factory):
    """A reader (non-durable subscription) on the source is moved with the tenant's consumers:
    after the move it must go on from where it was, on the target, whose message ids differ
    (the source's topic was reopened once, so its ids are in two ledgers; the target stores
    the same messages in one)."""
    clusters, tenant, namespace = two_clusters_and_a_tenant_on_a(clusters_factory)
    topic = f"persistent://{namespace}/feed"
    feed = NumberedFeed.on(clusters.client("a"), topic, producer_name="feed", batching_enabled=False)
    feed.send(10)
    feed.read_until(10)
    clusters.admin("a", "PUT", f"{topic_path(topic)}/unload")
    feed.send(10)
    feed.read_until(20)
    migrate_to_b(clusters, tenant)
    feed.send(10)  # the producer moved: on b
    feed.read_until(30)
    assert feed.received == feed.sent
    assert not feed.reader.has_message_available()


def test_a_reader_of_a_partitioned_topic_with_batches_follows_its_tenant(clusters_factory):
    """The same through a partitioned topic whose messages come in batches: each partition's
    reader goes on, on the target, after the last batch it read on the source."""
    clusters, tenant, namespace = two_clusters_and_a_tenant_on_a(clusters_factory)
    topic = f"persistent://{namespace}/parted"
    clusters.admin("a", "PUT", f"/admin/v2/persistent/{namespace}/parted/partitions", 2)
    feed = NumberedFeed.on(
        clusters.client("a"), topic, producer_name="parted", batching_max_messages=5,
        batching_max_publish_delay_ms=1000,
    )
    feed.send(20)
    feed.read_until(20)
    migrate_to_b(clusters, tenant)
    feed.send(10)  # on b
    feed.read_until(30)
    assert sorted(feed.received) == sorted(feed.sent)
    assert not feed.reader.has_message_available()


def test_a_reader_failing_over_to_another_cluster_goes_on_after_the_id_it_had(clusters_factory):
    """Geo-replication in general: a reader created on b with the id of the last message it
    read on a (a's numbering) reads what follows it, not b's log from that number."""
    clusters = clusters_factory(names=("a", "b"))
    namespace = clusters.create_replicated_namespace(clusters.new_namespace(), ["a", "b"])
    topic = f"persistent://{namespace}/failover"
    feed = NumberedFeed.on(
        clusters.client("a"), topic, producer_name="failover", batching_enabled=False
    )
    feed.send(10)
    feed.read_until(7)
    last_read_on_a = feed.reader.read_next(timeout_millis=int(REPLICATION_TIMEOUT_S * 1000))
    feed.received.append(last_read_on_a.data())
    # b holds the first ten (replicated) before the reader fails over to it.
    copy = NumberedFeed(None, clusters.client("b").create_reader(topic, pulsar.MessageId.earliest))
    copy.read_until(10)
    assert copy.received == feed.sent
    feed.reader = clusters.client("b").create_reader(topic, last_read_on_a.message_id())
    feed.send(5)  # still produced on a: replicated to b
    feed.read_until(15)
    assert feed.received == feed.sent


def test_a_producer_waiting_for_exclusive_access_follows_its_tenant(clusters_factory):
    """A WaitForExclusive producer queued behind an exclusive one on the source is moved with
    the tenant: once the exclusive producer (moved to the target) closes, it becomes the
    producer there. Before, the source dropped it from its queue without a word: the client
    waited forever on a cluster that no longer serves the tenant."""
    clusters, tenant, namespace = two_clusters_and_a_tenant_on_a(clusters_factory)
    topic = f"persistent://{namespace}/single"
    client = clusters.client("a")
    first = client.create_producer(
        topic, producer_name="first", access_mode=pulsar.ProducerAccessMode.Exclusive
    )
    first.send(b"from first")
    waiting = {}

    def create_second():
        try:
            waiting["producer"] = clusters.new_client("a").create_producer(
                topic, producer_name="second",
                access_mode=pulsar.ProducerAccessMode.WaitForExclusive,
            )
        except Exception as error:  # noqa: BLE001 (reported by the assertion below)
            waiting["error"] = error

    creator = threading.Thread(target=create_second, daemon=True)
    creator.start()
    await_condition(
        lambda: clusters.stats("a", topic)["waitingPublishers"] == 1,
        REPLICATION_TIMEOUT_S,
        "the second producer to wait on a",
    )
    migrate_to_b(clusters, tenant)
    first.send(b"first on b")
    first.close()
    creator.join(30)
    assert not creator.is_alive(), "the waiting producer never got the topic"
    assert "error" not in waiting, waiting
    waiting["producer"].send(b"from second")
    reader = clusters.client("b").create_reader(topic, pulsar.MessageId.earliest)
    got = [reader.read_next(timeout_millis=int(REPLICATION_TIMEOUT_S * 1000)).data() for _ in range(3)]
    assert got == [b"from first", b"first on b", b"from second"]


def test_migrating_back_before_the_cleanup_waits_for_it_instead_of_sending_clients_in_circles(
    clusters_factory,
):
    """A tenant moved a -> b and not cleaned up on a: a keeps redirecting the tenant's clients
    to b. A migration back b -> a must not run then (b would send its clients to a, and a back
    to b, forever): it pauses, saying why, until a's record is cleaned up."""
    clusters, tenant, namespace = two_clusters_and_a_tenant_on_a(clusters_factory)
    clusters.client("a").create_producer(f"persistent://{namespace}/t").send(b"x")
    migrate_to_b(clusters, tenant)
    clusters.admin("b", "POST", f"/admin/v2/tenants/{tenant}/migration", {"targetCluster": "a"})
    back = f"/admin/v2/tenants/{tenant}/migration"
    status = await_condition(
        lambda: (lambda s: s if s["paused"] else None)(clusters.admin("b", "GET", back)),
        REPLICATION_TIMEOUT_S,
        "the migration back to pause",
    )
    assert status["phase"] == "copyingMetadata", status
    assert "cleanup" in status["pausedReason"], status
    # Once a is cleaned up, the migration back goes on.
    clusters.admin("a", "POST", f"/admin/v2/tenants/{tenant}/migration/cleanup")
    await_condition(
        lambda: clusters.admin("b", "GET", back)["phase"] == "done",
        REPLICATION_TIMEOUT_S,
        "the migration back to finish",
    )


def test_a_batching_producer_without_deduplication_moves_without_loss_duplicates_or_reordering(
    clusters_factory,
):
    """A producer with batching on (sends pending in batches at the fence) and no
    de-duplication on the namespace sends without pause while its tenant migrates: the target
    ends with every acknowledged message exactly once, in the producer's order, and nothing
    the producer was not told is stored twice."""
    clusters, tenant, namespace = two_clusters_and_a_tenant_on_a(clusters_factory)
    topic = f"persistent://{namespace}/batched"
    history = History()
    producer = clusters.client("a").create_producer(
        topic, producer_name="batched", batching_enabled=True,
        batching_max_messages=20, batching_max_publish_delay_ms=5,
    )
    thread = clusters.start_producer(history, producer, "batched", "a", rate=400)
    await_condition(lambda: thread.acked() >= 200, REPLICATION_TIMEOUT_S, "traffic on a")
    migrate_to_b(clusters, tenant)
    moved = thread.acked()
    await_condition(lambda: thread.acked() >= moved + 200, REPLICATION_TIMEOUT_S, "traffic on b")
    thread.stop()
    assert not history.failed(), history.failed()[:5]
    sent = history.sent_payloads("batched")
    clusters.read_all(history, "b", topic, len(sent), label="stored@b")
    check_exactly_once({"stored@b": sent}, history)


def test_failover_and_exclusive_subscriptions_move_exactly_once(clusters_factory):
    """Failover (two consumers, one active) and Exclusive subscriptions, acknowledging as they
    receive, while a producer sends through the migration: each subscription gets every
    acknowledged message exactly once, in order, and its consumers end on the target."""
    clusters, tenant, namespace = two_clusters_and_a_tenant_on_a(clusters_factory)
    topic = f"persistent://{namespace}/ordered"
    history = History()
    client = clusters.client("a")
    for label, kind, count in (
        ("failover", pulsar.ConsumerType.Failover, 2),
        ("exclusive", pulsar.ConsumerType.Exclusive, 1),
    ):
        for index in range(count):
            consumer = client.subscribe(
                topic, label, consumer_type=kind, consumer_name=f"{label}-{index}",
                initial_position=pulsar.InitialPosition.Earliest,
            )
            clusters.start_consumer(history, label, consumer)
    producer = client.create_producer(topic, producer_name="ordered", batching_enabled=False)
    thread = clusters.start_producer(history, producer, "ordered", "a", rate=200)
    await_condition(
        lambda: all(history.received_count(label) >= 50 for label in ("failover", "exclusive")),
        REPLICATION_TIMEOUT_S,
        "the subscriptions to receive on a",
    )
    migrate_to_b(clusters, tenant)
    moved = thread.acked()
    await_condition(lambda: thread.acked() >= moved + 50, REPLICATION_TIMEOUT_S, "traffic on b")
    thread.stop()
    sent = history.sent_payloads("ordered")
    await_condition(
        lambda: all(history.received_count(label) >= len(sent) for label in ("failover", "exclusive")),
        REPLICATION_TIMEOUT_S,
        "every message to reach both subscriptions",
    )
    subscriptions = clusters.stats("b", topic)["subscriptions"]
    assert len(subscriptions["failover"]["consumers"]) == 2, subscriptions
    assert len(subscriptions["exclusive"]["consumers"]) == 1, subscriptions
    check_exactly_once({"failover": sent, "exclusive": sent}, history)
