"""Tenant migration with live clients (docs/migration.md, phases 5-7), observed with the
official client: producers and consumers keep running while their tenant moves from cluster
`a` to cluster `b`; they are redirected by the protocol (TOPIC_MIGRATED, lookups answered with
a redirect), every message is delivered exactly once, per-key order holds, and every client
ends on `b`. Another tenant on `a` keeps working there.

One `meridian standalone` per cluster (replication_harness.py).
"""

from __future__ import annotations

import urllib.parse

import pulsar

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

RATE = 40.0  # messages per second per producer: the load runs across the whole migration
KEYS = 5
PARTITIONS = 2
MIGRATION_TIMEOUT_S = 90.0
ACK_WINDOW = 3  # consumers acknowledge each window of this many messages in reverse order


def migration(clusters, tenant: str) -> dict:
    return clusters.admin("a", "GET", f"/admin/v2/tenants/{tenant}/migration")


def two_clusters_and_a_tenant_on_a(clusters_factory):
    """Clusters `a` and `b`, and a new tenant with one namespace on `a` only: `(clusters,
    tenant, namespace)`."""
    clusters = clusters_factory(names=("a", "b"))
    tenant = unique("move")
    namespace = f"{tenant}/ns"
    clusters.create_tenant(tenant, on=["a"], allowed=["a"])
    clusters.admin("a", "PUT", f"/admin/v2/namespaces/{namespace}")
    return clusters, tenant, namespace


def client_names(stats: dict) -> tuple[list, int]:
    """The producers (not replicators) and the number of consumers in a topic's stats."""
    producers = [
        publisher.get("producerName") for publisher in stats["publishers"]
        if not publisher.get("producerName", "").startswith("pulsar.repl.")
    ]
    consumers = sum(len(sub["consumers"]) for sub in stats["subscriptions"].values())
    return producers, consumers


def clients_are(clusters, cluster: str, topic: str, expected: tuple[list, int]) -> bool:
    """True once `topic` on `cluster` has exactly the `expected` clients; otherwise the
    assertion names those of both clusters (the wait's failure shows the last one)."""
    seen = {name: client_names(clusters.stats(name, topic)) for name in ("a", "b")}
    assert seen[cluster] == expected, f"producers and consumer count seen: {seen}"
    return True


def test_live_producers_and_consumers_follow_their_tenant_exactly_once(clusters_factory):
    clusters, tenant, namespace = two_clusters_and_a_tenant_on_a(clusters_factory)
    shared_topic = f"persistent://{namespace}/work"
    keyed_topic = f"persistent://{namespace}/keyed"  # partitioned: each partition moves
    clusters.create_partitioned_topic("a", keyed_topic, PARTITIONS)
    keyed_partitions = [f"{keyed_topic}-partition-{index}" for index in range(PARTITIONS)]
    # Another tenant on a, with live clients: it must keep working and stay on a.
    bystander = unique("stay")
    clusters.create_tenant(bystander, on=["a"], allowed=["a"])
    clusters.admin("a", "PUT", f"/admin/v2/namespaces/{bystander}/ns")
    bystander_topic = f"persistent://{bystander}/ns/local"

    history = History()
    client = clusters.client("a")
    consumers = []
    for label, topic, kind in (
        ("shared", shared_topic, pulsar.ConsumerType.Shared),
        ("keys", keyed_topic, pulsar.ConsumerType.KeyShared),
        ("stay", bystander_topic, pulsar.ConsumerType.Shared),
    ):
        for index in range(2 if label != "stay" else 1):
            consumer = client.subscribe(
                topic, label, consumer_type=kind, consumer_name=f"{label}-{index}",
                initial_position=pulsar.InitialPosition.Earliest,
            )
            consumers.append(ConsumerThread(history, label, consumer, ack_window=ACK_WINDOW))
    for thread in consumers:
        clusters.threads.append(thread)
        thread.start()
    producers = [
        clusters.start_producer(
            history,
            client.create_producer(shared_topic, producer_name="work", batching_enabled=False),
            "work", "a", rate=RATE,
        ),
        clusters.start_producer(
            history,
            client.create_producer(keyed_topic, producer_name="keyed", batching_enabled=False),
            "keyed", "a", rate=RATE,
            send_kwargs=lambda index: {"partition_key": f"k{index % KEYS}"},
        ),
        clusters.start_producer(
            history,
            client.create_producer(bystander_topic, producer_name="stay", batching_enabled=False),
            "stay", "a", rate=RATE,
        ),
    ]
    await_condition(
        lambda: all(history.received_count(label) >= 20 for label in ("shared", "keys", "stay")),
        REPLICATION_TIMEOUT_S,
        "the consumers to receive on a",
    )

    clusters.admin("a", "POST", f"/admin/v2/tenants/{tenant}/migration", {"targetCluster": "b"})
    redirected = await_condition(
        lambda: (lambda s: s if s["phase"] in ("producersRedirected", "consumersRedirected", "done")
                 else None)(migration(clusters, tenant)),
        MIGRATION_TIMEOUT_S,
        "the producers to be redirected",
    )
    # From the redirect on the migration cannot be aborted, and lookups on a point at b.
    status, body = clusters.call("a", "DELETE", f"/admin/v2/tenants/{tenant}/migration")
    assert status == 409, (status, body)
    lookup = clusters.admin("a", "GET", "/lookup/v2/topic/persistent/" + shared_topic[len("persistent://"):])
    assert lookup["brokerUrl"] == clusters["b"].service_url, lookup
    stay_lookup = clusters.admin("a", "GET", f"/lookup/v2/topic/persistent/{bystander}/ns/local")
    assert stay_lookup["brokerUrl"] == clusters["a"].service_url, stay_lookup

    done = await_condition(
        lambda: (lambda s: s if s["phase"] == "done" else None)(migration(clusters, tenant)),
        MIGRATION_TIMEOUT_S,
        "the migration to be done",
    )
    lines = {line["name"]: line["state"] for line in done["phases"]}
    assert all(state == "done" for state in lines.values()), done
    assert done["progress"]["producersOnSource"] == 0, done
    assert done["progress"]["consumersOnSource"] == 0, done
    assert redirected["targetCluster"] == "b"

    # Every client of the tenant is on b (the producers still sending), none on a; the
    # bystander's are on a.
    for topic, producer, consumer_count in [(shared_topic, "work", 2)] + [
        (partition, "keyed", 2) for partition in keyed_partitions
    ]:
        await_condition(
            lambda: clients_are(clusters, "b", topic, ([producer], consumer_count)),
            REPLICATION_TIMEOUT_S,
            f"{topic}'s clients to be on b",
        )
        assert client_names(clusters.stats("a", topic)) == ([], 0)
    assert client_names(clusters.stats("a", bystander_topic)) == (["stay"], 1)
    status, _ = clusters.call("b", "GET", f"/admin/v2/tenants/{bystander}")
    assert status == 404

    # Some messages went through b after the move; then the load stops and everything sent
    # is received exactly once.
    moved_at = {name: len(history.sent(name)) for name in ("work", "keyed")}
    await_condition(
        lambda: all(len(history.sent(name, acked_only=True)) >= moved_at[name] + 20
                    for name in moved_at),
        REPLICATION_TIMEOUT_S,
        "the producers to send on b",
    )
    for thread in producers:
        thread.stop()
    assert not history.failed(), history.failed()
    expected = {
        "shared": history.sent_payloads("work"),
        "keys": history.sent_payloads("keyed"),
        "stay": history.sent_payloads("stay"),
    }
    await_condition(
        lambda: all(history.received_count(label) >= len(payloads)
                    for label, payloads in expected.items()),
        REPLICATION_TIMEOUT_S,
        "every message to be received",
    )
    for thread in consumers:
        thread.stop()

    def order_group(label: str, payload: bytes):
        producer, counter = parse_payload(payload)
        if label == "keys":
            return f"k{counter % KEYS}"  # per-key order across the Key_Shared consumers
        if label == "stay":
            return producer
        return payload  # Shared: no order across consumers

    check_exactly_once(expected, history, order_group=order_group)

    # Cleanup frees the tenant's disk on a and takes a out of b's replication lists; b keeps
    # serving the tenant, a keeps the bystander.
    assert tenant_bytes(clusters, "a", tenant) > 0
    clusters.admin("a", "POST", f"/admin/v2/tenants/{tenant}/migration/cleanup")
    assert tenant_bytes(clusters, "a", tenant) == 0
    for topic in [shared_topic] + keyed_partitions:
        status, _ = clusters.call("a", "GET", topic_stats_path(topic))
        assert status == 404, topic
        assert clusters.stats("b", topic)["subscriptions"], topic
    for path in (f"/admin/v2/namespaces/{namespace}", f"/admin/v2/tenants/{tenant}",
                 f"/admin/v2/tenants/{tenant}/migration"):
        status, _ = clusters.call("a", "GET", path)
        assert status == 404, path
    assert clusters.get_replication("b", namespace) == ["b"]
    assert client_names(clusters.stats("a", bystander_topic))[0] == ["stay"]


def topic_stats_path(topic: str) -> str:
    return "/admin/v2/persistent/" + topic[len("persistent://"):] + "/stats"


def tenant_bytes(clusters, cluster: str, tenant: str) -> int:
    """Bytes of the logs of `tenant`'s topics in `cluster`'s data directory."""
    logs = clusters[cluster].broker.data_dir / "storage" / "logs"
    marker = urllib.parse.quote(f"persistent://{tenant}/", safe="")
    return sum(
        path.stat().st_size
        for directory in logs.iterdir() if directory.name.startswith(marker)
        for path in directory.rglob("*") if path.is_file()
    )


def test_a_failure_mid_migration_pauses_it_and_no_client_is_sent_to_a_target_that_lacks_its_data(
    clusters_factory,
):
    """Replication to the target cut after the fence, the source restarted meanwhile, then the
    target killed and back: the migration waits (producers fenced, none pointed at the target,
    nothing lost), goes on by itself, and every message is still delivered exactly once."""
    clusters, tenant, namespace = two_clusters_and_a_tenant_on_a(clusters_factory)
    topic = f"persistent://{namespace}/work"
    lookup_path = "/lookup/v2/topic/persistent/" + topic[len("persistent://"):]
    history = History()
    client = clusters.client("a")
    consumer = ConsumerThread(
        history, "work",
        client.subscribe(topic, "work", consumer_type=pulsar.ConsumerType.Shared,
                         initial_position=pulsar.InitialPosition.Earliest),
        ack_window=ACK_WINDOW,
    )
    clusters.threads.append(consumer)
    consumer.start()
    # No send timeout: a send waits as long as the migration holds it (none may fail).
    producer = clusters.start_producer(
        history,
        client.create_producer(topic, producer_name="work", batching_enabled=False,
                               send_timeout_millis=0),
        "work", "a", rate=RATE,
    )
    clusters.admin(
        "a", "POST", f"/admin/v2/tenants/{tenant}/migration",
        {"targetCluster": "b", "holdBeforeRedirect": True},
    )
    await_condition(
        lambda: migration(clusters, tenant)["phase"] == "subscriptionsSynced",
        MIGRATION_TIMEOUT_S,
        "the subscription state to be synced",
    )

    # Replication to b is cut; then the redirect is released: the source fences the
    # producers and waits for b to have everything, saying why. Nobody is sent to b.
    clusters.link("a", "b").cut()
    clusters.admin("a", "POST", f"/admin/v2/tenants/{tenant}/migration/redirect")
    paused = await_condition(
        lambda: (lambda s: s if s["paused"] else None)(migration(clusters, tenant)),
        MIGRATION_TIMEOUT_S,
        "the migration to wait for the target",
    )
    assert paused["phase"] == "subscriptionsSynced", paused
    assert "producers fenced" in paused["pausedReason"], paused
    assert client_names(clusters.stats("a", topic)) == (["work"], 1)
    assert clusters.admin("a", "GET", lookup_path)["brokerUrl"] == clusters["a"].service_url
    status, _ = clusters.call("a", "DELETE", f"/admin/v2/tenants/{tenant}/migration")
    assert status == 409

    # The source restarts meanwhile: the fence is still in force (it is in the record), the
    # producer cannot come back to a, lookups still answer a (b lacks the data). (Restarted
    # once the consumer acknowledged everything a holds: an acknowledgement in flight when a
    # broker restarts is lost, and its message delivered again, migration or not.)
    await_condition(
        lambda: (lambda sub: sub["msgBacklog"] == 0 and sub["unackedMessages"] == 0)(
            clusters.stats("a", topic)["subscriptions"]["work"]),
        MIGRATION_TIMEOUT_S,
        "the consumer to acknowledge everything a holds",
    )
    clusters["a"].broker.restart()
    after = migration(clusters, tenant)
    assert after["phase"] == "subscriptionsSynced" and after["paused"], after
    assert clusters.admin("a", "GET", lookup_path)["brokerUrl"] == clusters["a"].service_url

    # The target is killed, the link heals, the target comes back: the migration finishes by
    # itself and the clients end on b.
    clusters["b"].broker.kill()
    clusters.link("a", "b").heal()
    clusters["b"].broker.start()
    await_condition(
        lambda: migration(clusters, tenant)["phase"] == "done",
        MIGRATION_TIMEOUT_S,
        "the migration to be done",
    )
    await_condition(
        lambda: client_names(clusters.stats("b", topic)) == (["work"], 1),
        MIGRATION_TIMEOUT_S,
        "the clients to be on b",
    )
    moved_at = len(history.sent("work"))
    await_condition(
        lambda: len(history.sent("work", acked_only=True)) >= moved_at + 20,
        MIGRATION_TIMEOUT_S,
        "the producer to send on b",
    )
    producer.stop(MIGRATION_TIMEOUT_S)
    assert not history.failed(), history.failed()
    expected = history.sent_payloads("work")
    await_condition(
        lambda: history.received_count("work") >= len(expected),
        MIGRATION_TIMEOUT_S,
        "every message to be received",
    )
    consumer.stop()
    check_exactly_once({"work": expected}, history, order_group=lambda label, payload: payload)


def test_a_producer_that_moves_is_not_stored_twice_when_it_resends(clusters_factory):
    """The dedup gap of a move: a producer whose receipt the move cut off sends the message
    again to the target, which already holds it by replication. The target learned the
    producer's last sequence id from the replicated entries (de-duplication is off for the
    namespace), so the resend is acknowledged, not stored twice."""
    clusters = clusters_factory(names=("a", "b"))
    namespace = clusters.create_replicated_namespace(clusters.new_namespace("dedup"), ["a", "b"])
    topic = f"persistent://{namespace}/orders"
    history = History()
    on_a = clusters.client("a").create_producer(topic, producer_name="mover",
                                                batching_enabled=False)
    for counter in range(10):
        history.send(on_a, "mover", "a", counter)
    on_a.close()
    clusters.read_all(history, "b", topic, 10, label="replicated")

    # The same producer on b: it resumes after the replicated sequence, and a resend of an
    # already stored message is not stored again.
    on_b = clusters.client("b").create_producer(topic, producer_name="mover",
                                                batching_enabled=False)
    assert on_b.last_sequence_id() == 9
    on_b.send(b"resent", sequence_id=5)
    on_b.send(b"new", sequence_id=10)
    stored = clusters.read_all(History(), "b", topic, 11, label="stored")
    assert b"resent" not in stored, stored
    assert stored.count(b"new") == 1 and len(stored) == 11, stored
