"""Seek: resetting a subscription to a message id or to a publish time.

With pulsar-client's default `start_message_id_inclusive=False`, a consumer that seeks to a
message id resumes *after* it: the broker repositions the cursor at that message and the client
drops the message itself. With `True` the message itself comes again. Either way the broker must
redeliver everything from the position on, acknowledged or not.

Each test first acknowledges everything and reopens the subscription (closing flushes the
client's grouped acks), so that no ack can reach the broker after the seek.
"""

import time

import pulsar
import pytest

from helpers import assert_no_more, now_ms, payloads, receive_n, send_all_async

Type = pulsar.ConsumerType


def contents(prefix: str, count: int) -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(count)]


def ack_all_and_reopen(client, topic, consumer, count: int, **subscribe_kwargs):
    received = receive_n(consumer, count)
    for message in received:
        consumer.acknowledge(message)
    subscription = consumer.subscription_name()
    consumer.close()
    again = client.subscribe(topic, subscription, consumer_type=Type.Exclusive, **subscribe_kwargs)
    assert_no_more(again, what="everything was acknowledged before the seek")
    return received, again


@pytest.mark.parametrize("inclusive", [False, True], ids=["exclusive", "inclusive"])
def test_seek_to_a_message_id_replays_from_there(client, topic, inclusive):
    consumer = client.subscribe(
        topic, "seek-id", consumer_type=Type.Exclusive, start_message_id_inclusive=inclusive
    )
    sent = contents("m", 10)
    ids = send_all_async(client.create_producer(topic), sent)
    _, consumer = ack_all_and_reopen(
        client, topic, consumer, 10, start_message_id_inclusive=inclusive
    )

    consumer.seek(ids[3])
    first = 3 if inclusive else 4
    assert payloads(receive_n(consumer, 10 - first)) == sent[first:]
    assert_no_more(consumer)


def test_seek_to_earliest_replays_everything(client, topic):
    consumer = client.subscribe(topic, "seek-earliest", consumer_type=Type.Exclusive)
    sent = contents("m", 5)
    send_all_async(client.create_producer(topic), sent)
    _, consumer = ack_all_and_reopen(client, topic, consumer, 5)

    consumer.seek(pulsar.MessageId.earliest)
    assert payloads(receive_n(consumer, 5)) == sent
    assert_no_more(consumer)


def test_seek_by_publish_time_replays_from_the_first_later_message(client, topic):
    consumer = client.subscribe(topic, "seek-time", consumer_type=Type.Exclusive)
    producer = client.create_producer(topic)
    before = contents("before", 5)
    send_all_async(producer, before)
    received_before = receive_n(consumer, 5)
    for message in received_before:
        consumer.acknowledge(message)

    # A timestamp strictly later than every publish time so far (the client's clock is the
    # machine's clock; this waits for it to tick, it does not synchronise with the broker).
    last_publish = max(m.publish_timestamp() for m in received_before)
    while now_ms() <= last_publish:
        time.sleep(0.001)
    boundary = now_ms()

    after = contents("after", 5)
    send_all_async(producer, after)
    received_after, consumer = ack_all_and_reopen(client, topic, consumer, 5)
    assert payloads(received_after) == after
    assert all(m.publish_timestamp() >= boundary for m in received_after)

    consumer.seek(boundary)
    assert payloads(receive_n(consumer, 5)) == after
    assert_no_more(consumer)


def test_reader_seek_to_a_message_id(client, topic):
    sent = contents("m", 6)
    ids = send_all_async(client.create_producer(topic), sent)
    reader = client.create_reader(topic, pulsar.MessageId.earliest)
    assert payloads(receive_n(reader, 6)) == sent

    reader.seek(ids[1])
    assert payloads(receive_n(reader, 4)) == sent[2:]
    assert_no_more(reader)
