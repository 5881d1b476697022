"""Tenant migration between real Meridian clusters (docs/migration.md), observed with the
official client: the phases before the redirect (metadata copied, topics replicating to the
target with the messages they already store, caught up, subscription state synced), with each
migration held there; test_migration_redirect.py covers the redirect of live clients.

One `meridian standalone` per cluster (replication_harness.py). Only the source `a` is
configured by the test; the migration itself creates the tenant and namespace on `b`.
"""

from __future__ import annotations

import pulsar

from helpers import unique
from replication_harness import (
    REPLICATION_TIMEOUT_S,
    History,
    await_condition,
    check_exactly_once,
    clusters_factory,  # noqa: F401 (fixture)
    parse_payload,
)

BEFORE = 150  # messages per topic stored before the migration starts
DURING = 50  # messages sent to the plain topic after it started
PARTITIONS = 3
READ_S = 15.0  # reading what b stores once the migration says it is caught up


PHASES = [
    "copyingMetadata", "replicating", "caughtUp", "subscriptionsSynced", "producersRedirected",
    "consumersRedirected", "done",
]
# Every migration here is held before the redirect (its clients stay on a): the phases up to
# "subscriptionsSynced" are what these tests look at.
HOLD = {"targetCluster": "b", "holdBeforeRedirect": True}


def migration(clusters, tenant: str) -> dict:
    return clusters.admin("a", "GET", f"/admin/v2/tenants/{tenant}/migration")


def reached(status: dict, phase: str) -> bool:
    """The migration is in `phase` or a later one."""
    return status["phase"] in PHASES and PHASES.index(status["phase"]) >= PHASES.index(phase)


def test_migration_copies_stored_messages_to_the_target_exactly_once(clusters_factory):
    clusters = clusters_factory(names=("a", "b"))
    tenant = unique("move")
    namespace = f"{tenant}/ns"
    clusters.create_tenant(tenant, on=["a"], allowed=["a"])
    clusters.admin("a", "PUT", f"/admin/v2/namespaces/{namespace}")
    plain = f"persistent://{namespace}/orders"
    partitioned = f"persistent://{namespace}/events"
    clusters.create_partitioned_topic("a", partitioned, PARTITIONS)
    # A partitioned topic nothing was written to: its shape is copied, and it does not hold
    # the migration back.
    idle = f"persistent://{namespace}/idle"
    clusters.create_partitioned_topic("a", idle, 2)
    # Another tenant on a, with a topic: the migration must leave it alone.
    bystander = unique("stay")
    clusters.create_tenant(bystander, on=["a"], allowed=["a"])
    clusters.admin("a", "PUT", f"/admin/v2/namespaces/{bystander}/ns")

    history = History()
    client = clusters.client("a")
    client.create_producer(f"persistent://{bystander}/ns/local").send(b"stays on a")
    orders = client.create_producer(plain, producer_name="orders")
    events = client.create_producer(partitioned, producer_name="events")
    for counter in range(BEFORE):
        history.send(orders, "orders", "a", counter, partition_key=f"k{counter % 7}")
        history.send(events, "events", "a", counter, partition_key=f"k{counter % 7}")

    started = clusters.admin(
        "a", "POST", f"/admin/v2/tenants/{tenant}/migration", HOLD
    )
    assert started["targetCluster"] == "b" and started["phase"] == "copyingMetadata"
    # Messages sent while the migration runs go to the target too.
    for counter in range(BEFORE, BEFORE + DURING):
        history.send(orders, "orders", "a", counter, partition_key=f"k{counter % 7}")

    status = await_condition(
        lambda: (lambda s: s if reached(s, "caughtUp") and s["progress"]["backlogEntries"] == 0
                 else None)(migration(clusters, tenant)),
        REPLICATION_TIMEOUT_S,
        "the migration to reach caughtUp with no backlog",
    )
    progress = status["progress"]
    assert progress["topicsTotal"] == 1 + PARTITIONS + 2, status
    assert progress["topicsReplicating"] == 1 + PARTITIONS + 2, status
    assert progress["backlogBytes"] == 0, status
    lines = {line["name"]: line for line in status["phases"]}
    assert lines["metadataCopied"]["state"] == "done"
    assert lines["caughtUp"]["state"] == "done"
    assert lines["producersRedirected"]["state"] in ("pending", "running")

    # The migration created the tenant's namespace on b, with its partitioned topic's shape.
    assert sorted(clusters.get_replication("b", namespace)) == ["a", "b"]
    assert clusters.partitions("b", partitioned) == PARTITIONS
    assert clusters.partitions("b", idle) == 2

    # A namespace created on a during the migration is copied and replicated too.
    clusters.admin("a", "PUT", f"/admin/v2/namespaces/{tenant}/late")
    late = f"persistent://{tenant}/late/t"
    client.create_producer(late, producer_name="late").send(b"late")
    await_condition(
        lambda: (lambda p: p["namespacesReplicating"] == 2 and p["topicsReplicating"] == 2 + PARTITIONS + 2
                 and p["backlogEntries"] == 0)(migration(clusters, tenant)["progress"]),
        REPLICATION_TIMEOUT_S,
        "the late namespace to replicate",
    )
    assert sorted(clusters.get_replication("b", f"{tenant}/late")) == ["a", "b"]
    # The other tenant was not touched: not replicated, unknown to b.
    assert clusters.get_replication("a", f"{bystander}/ns") == ["a"]
    assert "b" not in clusters.stats("a", f"persistent://{bystander}/ns/local")["replication"]
    status_b, _ = clusters.call("b", "GET", f"/admin/v2/tenants/{bystander}")
    assert status_b == 404

    # b stores every message exactly once, each producer's in order (per partition). "Caught
    # up with no backlog" means b already holds them all: no long wait for stragglers.
    clusters.read_all(history, "b", plain, BEFORE + DURING, label="orders@b", timeout=READ_S)
    for index in range(PARTITIONS):
        reader = clusters.client("b").create_reader(
            f"{partitioned}-partition-{index}", pulsar.MessageId.earliest
        )
        try:
            history.collect({f"events@b-{index}": reader}, {f"events@b-{index}": 1}, READ_S)
        finally:
            reader.close()
    sent_orders = [payload for payload in history.sent_payloads("orders")]
    sent_events = [payload for payload in history.sent_payloads("events")]
    events_on_b = []
    for index in range(PARTITIONS):
        in_partition = history.received_payloads(f"events@b-{index}")
        counters = [parse_payload(payload)[1] for payload in in_partition]
        assert counters == sorted(counters), f"partition {index} out of order: {counters}"
        events_on_b.extend(in_partition)
    check_exactly_once(
        {"orders@b": sent_orders, "events@b": sent_events},
        {"orders@b": history.received_payloads("orders@b"), "events@b": events_on_b},
        order_group=lambda cluster, payload: payload if cluster == "events@b" else None,
    )


def test_migration_pauses_while_the_target_is_down_survives_a_source_restart_and_aborts(
    clusters_factory,
):
    clusters = clusters_factory(names=("a", "b"))
    tenant = unique("move")
    namespace = f"{tenant}/ns"
    clusters.create_tenant(tenant, on=["a"], allowed=["a"])
    clusters.admin("a", "PUT", f"/admin/v2/namespaces/{namespace}")
    topic = f"persistent://{namespace}/orders"
    history = History()
    producer = clusters.client("a").create_producer(topic, producer_name="orders")
    for counter in range(BEFORE):
        history.send(producer, "orders", "a", counter)

    # The target is down: the migration starts, then pauses with the reason.
    clusters["b"].broker.stop()
    clusters.admin("a", "POST", f"/admin/v2/tenants/{tenant}/migration", HOLD)
    paused = await_condition(
        lambda: (lambda s: s if s["paused"] else None)(migration(clusters, tenant)),
        REPLICATION_TIMEOUT_S,
        "the migration to pause",
    )
    assert paused["phase"] == "copyingMetadata", paused
    assert "target unreachable" in paused["pausedReason"], paused
    for counter in range(BEFORE, BEFORE + DURING):
        history.send(producer, "orders", "a", counter)
    producer.close()

    # The source restarts: the record brings the migration back; then the target comes back.
    clusters["a"].broker.restart()
    assert migration(clusters, tenant)["targetCluster"] == "b"
    clusters["b"].broker.start()
    await_condition(
        lambda: (lambda s: reached(s, "caughtUp") and not s["paused"]
                 and s["progress"]["backlogEntries"] == 0)(migration(clusters, tenant)),
        REPLICATION_TIMEOUT_S,
        "the migration to resume and catch up",
    )
    clusters.read_all(history, "b", topic, BEFORE + DURING, label="orders@b", timeout=READ_S)
    check_exactly_once({"orders@b": history.sent_payloads("orders")}, history)

    # Abort: the source is as before (replication list, allowed clusters, no replicator and
    # no replication cursor to b), and the record is gone.
    aborted = clusters.admin("a", "DELETE", f"/admin/v2/tenants/{tenant}/migration")
    assert aborted["phase"] == "aborting", aborted
    status, _ = clusters.call("a", "GET", f"/admin/v2/tenants/{tenant}/migration")
    assert status == 404
    assert clusters.get_replication("a", namespace) == ["a"]
    assert clusters.admin("a", "GET", f"/admin/v2/tenants/{tenant}")["allowedClusters"] == ["a"]
    # The target's copies, which the migration created, are deleted.
    for path in (f"/admin/v2/namespaces/{namespace}", f"/admin/v2/tenants/{tenant}"):
        status, _ = clusters.call("b", "GET", path)
        assert status == 404, path
    await_condition(
        lambda: "pulsar.repl.b" not in clusters.internal_stats("a", topic)["cursors"]
        and "b" not in clusters.stats("a", topic)["replication"],
        REPLICATION_TIMEOUT_S,
        "the replicator to b and its cursor to go",
    )


def test_migration_syncs_subscription_state_so_the_target_delivers_exactly_the_unacknowledged(
    clusters_factory,
):
    clusters = clusters_factory(names=("a", "b"))
    tenant = unique("move")
    namespace = f"{tenant}/ns"
    clusters.create_tenant(tenant, on=["a"], allowed=["a"])
    clusters.admin("a", "PUT", f"/admin/v2/namespaces/{namespace}")
    topic = f"persistent://{namespace}/orders"
    history = History()
    client = clusters.client("a")
    consumer = client.subscribe(
        topic, "work", consumer_type=pulsar.ConsumerType.Shared,
        initial_position=pulsar.InitialPosition.Earliest,
    )
    producer = client.create_producer(topic, producer_name="orders", batching_enabled=False)
    for counter in range(BEFORE):
        history.send(producer, "orders", "a", counter)
    # Acknowledge out of order: every message but each fifth one.
    unacked = []
    for _ in range(BEFORE):
        message = consumer.receive(timeout_millis=int(REPLICATION_TIMEOUT_S * 1000))
        if parse_payload(message.data())[1] % 5 == 0:
            unacked.append(message.data())
        else:
            consumer.acknowledge(message)
    consumer.close()
    await_condition(
        lambda: clusters.stats("a", topic)["subscriptions"]["work"]["msgBacklog"] == len(unacked),
        REPLICATION_TIMEOUT_S,
        "the acknowledgements to land on a",
    )

    clusters.admin("a", "POST", f"/admin/v2/tenants/{tenant}/migration", HOLD)
    status = await_condition(
        lambda: (lambda s: s if s["phase"] == "subscriptionsSynced" else None)(
            migration(clusters, tenant)
        ),
        REPLICATION_TIMEOUT_S,
        "the subscription state to be synced",
    )
    assert status["progress"]["subscriptionsSynced"] == 1, status
    assert status["progress"]["subscriptionsTotal"] == 1, status
    assert clusters.stats("a", topic)["subscriptions"]["work"]["isReplicated"] is True

    # A consumer of the same subscription on b gets exactly what a never saw acknowledged.
    moved = clusters.client("b").subscribe(
        topic, "work", consumer_type=pulsar.ConsumerType.Shared
    )
    try:
        history.collect({"work@b": moved}, {"work@b": len(unacked)}, READ_S)
    finally:
        moved.close()
    check_exactly_once({"work@b": unacked}, history)

    # Abort takes back the replicated mark the migration set.
    clusters.admin("a", "DELETE", f"/admin/v2/tenants/{tenant}/migration")
    assert clusters.stats("a", topic)["subscriptions"]["work"]["isReplicated"] is False
