"""Replicated subscriptions skip the echo: a cluster does not send a state that only repeats
what the destination's own state says (its acknowledgements, translated back). Acknowledgements
made elsewhere after a failover still flow back, and three clusters stay exact."""

from __future__ import annotations

from helpers import receive_n
from replication_harness import (  # noqa: F401 (fixture)
    REPLICATION_TIMEOUT_S,
    await_condition,
    clusters_factory,
)
from test_replicated_subscriptions import (
    assert_nothing_more,
    await_backlog,
    consume,
    produce,
    replicated_topic,
    shared_consumers,
)
from test_replicated_subscriptions_review import sync_stats


def seventy_acknowledged_on_a(clusters, topic, subscription, others) -> set:
    """Two Shared consumers on a acknowledge 70 of 100 messages out of order and leave; returns
    the 30 others, once every cluster of `others` holds exactly those."""
    on_a = shared_consumers(clusters, "a", topic, subscription, 2)
    produce(clusters, "a", topic, 100)
    for cluster in others:
        await_backlog(clusters, cluster, topic, subscription, 100, "created with every message")
    left_on_a = consume(on_a, 100, keep=lambda payload: int(payload[1:]) % 10 in (0, 3, 5))
    assert len(left_on_a) == 30
    for consumer in on_a:
        consumer.close()
    for cluster in others:
        await_backlog(clusters, cluster, topic, subscription, 30, "exactly a's unacknowledged messages")
    return left_on_a


def test_the_echo_is_skipped_and_acknowledgements_after_a_failover_still_flow_back(clusters_factory):
    """Two clusters: b applies a's states and never sends a its own back (it only repeats a's),
    while counting a as up to date. Three clusters in a full mesh (where b or c may pass on what
    the other learnt from a first, so no "never" holds there): consumers fail over from a to c and
    acknowledge ten of the 30 messages left; a and b then hold exactly the other 20, and a
    consumer back on a gets those 20 and nothing else."""
    clusters = clusters_factory(("a", "b", "c"))
    subscription = "billing"

    pair = replicated_topic(clusters, ("a", "b"), "echo-pair")
    seventy_acknowledged_on_a(clusters, pair, subscription, ("b",))
    await_condition(
        lambda: sync_stats(clusters, "b", pair, subscription).get("a", {}).get("unsentForMs") == 0,
        REPLICATION_TIMEOUT_S,
        "b counts a as up to date",
    )
    received_on_a = sync_stats(clusters, "a", pair, subscription)
    assert received_on_a.get("b", {}).get("lastReceivedTimestamp") is None, (
        f"b sent a its own state back: {received_on_a}"
    )

    mesh = replicated_topic(clusters, ("a", "b", "c"), "echo-mesh")
    left_on_a = seventy_acknowledged_on_a(clusters, mesh, subscription, ("b", "c"))
    # Failover to c: its consumer acknowledges the ten ending in 0; that reaches a and b.
    on_c = shared_consumers(clusters, "c", mesh, subscription, 1)[0]
    messages = receive_n(on_c, 30)
    assert {message.data() for message in messages} == left_on_a
    left_on_c = set()
    for message in messages:
        if int(message.data()[1:]) % 10 == 0:
            on_c.acknowledge(message)
        else:
            left_on_c.add(message.data())
    on_c.close()
    for cluster in ("a", "b"):
        await_backlog(clusters, cluster, mesh, subscription, 20, "exactly c's unacknowledged messages")
    back_on_a = shared_consumers(clusters, "a", mesh, subscription, 1)[0]
    assert {message.data() for message in receive_n(back_on_a, 20)} == left_on_c
    assert_nothing_more(back_on_a)
