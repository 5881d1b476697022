"""Delayed delivery (`deliver_after`, `deliver_at`): honoured by Shared subscriptions only.

How "not before its time" is observed without wall-clock thresholds on speed: the delayed
message is sent first and an undelayed marker right after it; a Shared consumer must get the
marker first (the dispatcher skipped the delayed entry). The delayed message must then still
arrive, and not before its delivery time as computed from its own publish time, less one
dispatcher tick (Pulsar delivers up to one tick early unless strict mode is on).
"""

from datetime import timedelta

import pulsar
import pytest

from helpers import assert_no_more, now_ms, receive_one

Type = pulsar.ConsumerType
DELAY_MS = 3_000
TICK_TOLERANCE_MS = 1_000  # Pulsar's delayedDeliveryTickTimeMillis default
ARRIVAL_TIMEOUT_MS = DELAY_MS + 30_000


def _check_delayed_then_marker(consumer, producer, send_delayed, deliver_time_of):
    send_delayed(producer)
    producer.send(b"marker")

    first = receive_one(consumer)
    assert first.data() == b"marker", "the delayed message was delivered before its time"
    consumer.acknowledge(first)

    delayed = receive_one(consumer, timeout_ms=ARRIVAL_TIMEOUT_MS)
    arrived = now_ms()
    assert delayed.data() == b"delayed"
    due = deliver_time_of(delayed)
    assert arrived >= due - TICK_TOLERANCE_MS, (
        f"delivered {due - arrived} ms before its delivery time"
    )
    consumer.acknowledge(delayed)
    assert_no_more(consumer)


@pytest.mark.timeout(90)
def test_deliver_after_holds_the_message_back_on_shared(client, topic):
    consumer = client.subscribe(topic, "delayed", consumer_type=Type.Shared)
    producer = client.create_producer(topic)
    _check_delayed_then_marker(
        consumer,
        producer,
        lambda p: p.send(b"delayed", deliver_after=timedelta(milliseconds=DELAY_MS)),
        lambda message: message.publish_timestamp() + DELAY_MS,
    )


@pytest.mark.timeout(90)
def test_deliver_at_holds_the_message_back_on_shared(client, topic):
    consumer = client.subscribe(topic, "delayed", consumer_type=Type.Shared)
    producer = client.create_producer(topic)
    deliver_at = now_ms() + DELAY_MS
    _check_delayed_then_marker(
        consumer,
        producer,
        lambda p: p.send(b"delayed", deliver_at=deliver_at),
        lambda message: deliver_at,
    )


@pytest.mark.timeout(90)
def test_deliver_after_holds_the_message_back_on_key_shared(client, topic):
    consumer = client.subscribe(topic, "delayed", consumer_type=Type.KeyShared)
    producer = client.create_producer(topic)
    _check_delayed_then_marker(
        consumer,
        producer,
        lambda p: p.send(
            b"delayed", partition_key="k", deliver_after=timedelta(milliseconds=DELAY_MS)
        ),
        lambda message: message.publish_timestamp() + DELAY_MS,
    )


def test_exclusive_subscription_ignores_the_delay(client, topic):
    consumer = client.subscribe(topic, "not-delayed", consumer_type=Type.Exclusive)
    producer = client.create_producer(topic)
    producer.send(b"delayed", deliver_after=timedelta(hours=1))
    producer.send(b"marker")
    assert receive_one(consumer).data() == b"delayed"
    assert receive_one(consumer).data() == b"marker"
