"""Redelivery: negative acks, ack timeout, and the client's dead-letter policy.

Negative acks and the ack timeout are client-side timers; what the broker must do is redeliver
what REDELIVER_UNACKNOWLEDGED_MESSAGES names (Shared: explicit ids; Exclusive/Failover: all
unacked) and count every redelivery in `redelivery_count`. The dead-letter policy is built on
that count.
"""

import time

import pulsar
import pytest

from helpers import (
    CONDITION_TIMEOUT_S,
    assert_no_more,
    receive_n,
    receive_one,
    send_all_async,
)

Type = pulsar.ConsumerType
NACK_DELAY_MS = 200


@pytest.mark.parametrize(
    "consumer_type", [Type.Shared, Type.KeyShared], ids=["shared", "key-shared"]
)
def test_negative_ack_redelivers_with_a_higher_redelivery_count(client, topic, consumer_type):
    consumer = client.subscribe(
        topic, "nack", consumer_type=consumer_type, negative_ack_redelivery_delay_ms=NACK_DELAY_MS
    )
    client.create_producer(topic).send(b"retry me")

    counts = []
    for _ in range(3):
        message = receive_one(consumer)
        assert message.data() == b"retry me"
        counts.append(message.redelivery_count())
        if len(counts) < 3:
            consumer.negative_acknowledge(message)
        else:
            consumer.acknowledge(message)
    assert counts == [0, 1, 2]
    assert_no_more(consumer)


@pytest.mark.parametrize("consumer_type", [Type.Exclusive, Type.Failover], ids=["exclusive", "failover"])
def test_negative_ack_redelivers_on_single_consumer_subscriptions(client, topic, consumer_type):
    """Exclusive/Failover: the client asks for "everything unacked" and the broker rewinds.

    No assertion on redelivery_count here: Pulsar's single-active-consumer dispatchers do not
    track it (they always send 0), so both 0 and a count are compatible.
    """
    # The ack of m0 is grouped by the client (flushed within 100 ms); the redelivery request for
    # m1 goes out after the nack delay. A 1 s delay keeps the ack ahead of the rewind, otherwise
    # a redelivered m0 would be legitimate at-least-once behaviour.
    consumer = client.subscribe(
        topic, "nack", consumer_type=consumer_type, negative_ack_redelivery_delay_ms=1_000
    )
    send_all_async(client.create_producer(topic), [b"m0", b"m1"])
    first, second = receive_n(consumer, 2)
    consumer.acknowledge(first)
    consumer.negative_acknowledge(second)

    again = receive_one(consumer)
    assert again.data() == b"m1"
    consumer.acknowledge(again)
    assert_no_more(consumer)


def test_negative_ack_redelivers_only_that_message(client, topic):
    consumer = client.subscribe(
        topic, "nack-one", consumer_type=Type.Shared, negative_ack_redelivery_delay_ms=NACK_DELAY_MS
    )
    send_all_async(client.create_producer(topic), [b"m0", b"m1", b"m2"])
    first, second, third = receive_n(consumer, 3)
    consumer.acknowledge(first)
    consumer.negative_acknowledge(second)
    consumer.acknowledge(third)

    again = receive_one(consumer)
    assert (again.data(), again.redelivery_count()) == (b"m1", 1)
    consumer.acknowledge(again)
    assert_no_more(consumer)


@pytest.mark.timeout(90)
def test_ack_timeout_redelivers_unacked_messages(client, topic):
    # 10 s is the smallest ack timeout the client accepts.
    consumer = client.subscribe(
        topic, "ack-timeout", consumer_type=Type.Shared, unacked_messages_timeout_ms=10_000
    )
    send_all_async(client.create_producer(topic), [b"acked", b"forgotten"])
    acked, forgotten = receive_n(consumer, 2)
    consumer.acknowledge(acked)
    assert forgotten.data() == b"forgotten"

    again = receive_one(consumer, timeout_ms=45_000)
    assert again.data() == b"forgotten"
    assert again.redelivery_count() >= 1
    consumer.acknowledge(again)
    assert_no_more(consumer)


@pytest.mark.timeout(120)
def test_dead_letter_policy_moves_a_message_after_max_redeliveries(client, topic):
    dead_letter_topic = topic + "-DLQ"
    dlq_consumer = client.subscribe(
        dead_letter_topic, "dlq-watch", initial_position=pulsar.InitialPosition.Earliest
    )
    consumer = client.subscribe(
        topic,
        "with-dlq",
        consumer_type=Type.Shared,
        negative_ack_redelivery_delay_ms=NACK_DELAY_MS,
        dead_letter_policy=pulsar.ConsumerDeadLetterPolicy(
            max_redeliver_count=2, dead_letter_topic=dead_letter_topic
        ),
    )
    producer = client.create_producer(topic)
    producer.send(b"poison", properties={"origin": "compat"})
    producer.send(b"fine")

    poison_counts = []
    dead = None
    deadline = time.monotonic() + CONDITION_TIMEOUT_S * 2
    while dead is None:
        assert time.monotonic() < deadline, (
            f"the poison message never reached the DLQ; deliveries seen: {poison_counts}"
        )
        try:
            message = consumer.receive(timeout_millis=100)
            if message.data() == b"poison":
                poison_counts.append(message.redelivery_count())
                consumer.negative_acknowledge(message)
            else:
                consumer.acknowledge(message)
        except pulsar.Timeout:
            pass
        try:
            dead = dlq_consumer.receive(timeout_millis=100)
        except pulsar.Timeout:
            pass

    assert dead.data() == b"poison"
    assert dead.properties().get("origin") == "compat"
    assert poison_counts == [0, 1, 2], "delivered once, then redelivered max_redeliver_count times"
    dlq_consumer.acknowledge(dead)
    assert_no_more(consumer, what="the dead-lettered message is acknowledged on the source")
    assert_no_more(dlq_consumer)
