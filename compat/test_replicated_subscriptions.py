"""Replicated subscriptions as the official client and pulsar-admin scripts switch them on: the
SUBSCRIBE flag (`replicate_subscription_state_enabled=True`), Pulsar's
`replicatedSubscriptionStatus` REST call and `?replicated=true` on creation; `isReplicated` in
stats, kept across a restart."""

from __future__ import annotations

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
