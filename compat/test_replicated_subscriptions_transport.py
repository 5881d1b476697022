"""How replicated subscriptions' states travel: on the binary protocol (Meridian's
REPLICATED_SUBSCRIPTION_STATE command, on the sender's replication client) to a broker that
announces the command in CONNECTED, and as an HTTP post to its admin API to one that does not
(an older Meridian; here a broker with `replicated_subscriptions_state_command = false`). On
the binary protocol the state goes in the compact form to a broker that announces it, and as
JSON text to one that does not (a Meridian from before it; here
`replicated_subscriptions_state_compact = false`)."""

from __future__ import annotations

from replication_harness import (  # noqa: F401 (fixture)
    REPLICATION_TIMEOUT_S,
    await_condition,
    clusters_factory,
)
from test_replicated_subscriptions import (
    await_backlog,
    consume,
    produce,
    replicated_topic,
    shared_consumers,
)
from test_replicated_subscriptions_review import sync_stats


def test_states_go_on_the_binary_protocol_and_over_http_to_a_broker_that_does_not_announce_it(clusters_factory):
    """a's consumers acknowledge 30 of 40 messages out of order. b (default) gets a's state as a
    compact command, d (taking JSON text only) as a JSON command, c (not announcing the command)
    as an HTTP post; all hold exactly a's unacknowledged ten, and a's stats name the transport
    and encoding each state took."""
    clusters = clusters_factory(
        ("a", "b", "c", "d"),
        configs={
            "c": {"replicated_subscriptions_state_command": False},
            "d": {"replicated_subscriptions_state_compact": False},
        },
    )
    topic = replicated_topic(clusters, ("a", "b", "c", "d"), "transport")
    subscription = "billing"
    on_a = shared_consumers(clusters, "a", topic, subscription, 2)
    produce(clusters, "a", topic, 40)
    for cluster in ("b", "c", "d"):
        await_backlog(clusters, cluster, topic, subscription, 40, "created with every message")
    left_on_a = consume(on_a, 40, keep=lambda payload: int(payload[1:]) % 4 == 1)
    assert len(left_on_a) == 10
    for consumer in on_a:
        consumer.close()
    for cluster in ("b", "c", "d"):
        await_backlog(clusters, cluster, topic, subscription, 10, "exactly a's unacknowledged messages")

    def transports():
        stats = sync_stats(clusters, "a", topic, subscription)
        return {
            cluster: (stats.get(cluster, {}).get("transport"), stats.get(cluster, {}).get("encoding"))
            for cluster in ("b", "c", "d")
        }

    expected = {"b": ("binary", "compact"), "c": ("http", "json"), "d": ("binary", "json")}
    await_condition(
        lambda: transports() == expected,
        REPLICATION_TIMEOUT_S,
        f"a's states went to b as a compact command, to d as a JSON one and to c over HTTP "
        f"(stats: {transports()})",
    )
