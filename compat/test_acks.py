"""Acknowledgements: individual, cumulative and batch, as seen by the next consumer of the subscription.

Each test acks, closes the consumer (the client flushes grouped acks before it sends
CLOSE_CONSUMER on the same connection), and opens the subscription again: what comes back is
exactly what was not acknowledged.

Ack receipts: pulsar-client 3.x for Python exposes no `is_ack_receipt_enabled` (the C++
option exists, the Python binding does not pass it on), so these tests run with receipts off.
"""

import pulsar

from helpers import assert_no_more, payloads, receive_n, send_all_async

Type = pulsar.ConsumerType
Earliest = pulsar.InitialPosition.Earliest


def contents(count: int) -> list[bytes]:
    return [f"m{i}".encode() for i in range(count)]


def test_individual_acks_leave_only_the_unacked_messages(client, topic):
    consumer = client.subscribe(topic, "individual", consumer_type=Type.Shared)
    producer = client.create_producer(topic)
    send_all_async(producer, contents(10))
    for message in receive_n(consumer, 10):
        if int(message.data()[1:]) % 2 == 0:
            consumer.acknowledge(message)
    consumer.close()

    again = client.subscribe(topic, "individual", consumer_type=Type.Shared)
    assert payloads(receive_n(again, 5)) == [b"m1", b"m3", b"m5", b"m7", b"m9"]
    assert_no_more(again)


def test_ack_by_message_id_works_like_ack_by_message(client, topic):
    consumer = client.subscribe(topic, "by-id", consumer_type=Type.Shared)
    producer = client.create_producer(topic)
    send_all_async(producer, contents(3))
    received = receive_n(consumer, 3)
    consumer.acknowledge(received[1].message_id())
    consumer.close()

    again = client.subscribe(topic, "by-id", consumer_type=Type.Shared)
    assert payloads(receive_n(again, 2)) == [b"m0", b"m2"]
    assert_no_more(again)


def test_cumulative_ack_acknowledges_everything_up_to_the_message(client, topic):
    consumer = client.subscribe(topic, "cumulative", consumer_type=Type.Exclusive)
    producer = client.create_producer(topic)
    send_all_async(producer, contents(10))
    received = receive_n(consumer, 10)
    consumer.acknowledge_cumulative(received[5])
    consumer.close()

    again = client.subscribe(topic, "cumulative", consumer_type=Type.Exclusive)
    assert payloads(receive_n(again, 4)) == [b"m6", b"m7", b"m8", b"m9"]
    assert_no_more(again)


def _send_one_batch(client, topic, count: int) -> list:
    producer = client.create_producer(
        topic,
        batching_enabled=True,
        batching_max_messages=count,
        batching_max_publish_delay_ms=5_000,
    )
    ids = send_all_async(producer, contents(count))
    entries = {(i.ledger_id(), i.entry_id()) for i in ids}
    assert len(entries) == 1, f"expected one batch of {count}, got entries {entries}"
    return ids


def test_partially_acked_batch_is_redelivered(client, topic):
    consumer = client.subscribe(topic, "batch", consumer_type=Type.Shared)
    _send_one_batch(client, topic, 10)
    received = receive_n(consumer, 10)
    assert [m.message_id().batch_index() for m in received] == list(range(10))
    for message in received[:9]:
        consumer.acknowledge(message)
    consumer.close()

    again = client.subscribe(topic, "batch", consumer_type=Type.Shared)
    redelivered = payloads(receive_n(again, 1))
    # Without batch-index acknowledgement the whole batch comes back; with it, only m9 does.
    while True:
        try:
            redelivered.append(again.receive(timeout_millis=1_500).data())
        except pulsar.Timeout:
            break
    assert b"m9" in redelivered, "the unacknowledged member of the batch was lost"
    assert set(redelivered) <= set(contents(10)) and len(set(redelivered)) == len(redelivered)


def test_fully_acked_batch_is_not_redelivered(client, topic):
    consumer = client.subscribe(topic, "batch", consumer_type=Type.Shared)
    _send_one_batch(client, topic, 10)
    for message in receive_n(consumer, 10):
        consumer.acknowledge(message)
    consumer.close()

    again = client.subscribe(topic, "batch", consumer_type=Type.Shared)
    assert_no_more(again, what="every member of the batch was acknowledged")


def test_cumulative_ack_inside_a_batch_then_beyond_it(client, topic):
    consumer = client.subscribe(topic, "batch-cumulative", consumer_type=Type.Exclusive)
    _send_one_batch(client, topic, 5)
    client.create_producer(topic).send(b"after-batch")
    received = receive_n(consumer, 6)
    consumer.acknowledge_cumulative(received[4])  # the batch's last member: the whole entry
    consumer.close()

    again = client.subscribe(topic, "batch-cumulative", consumer_type=Type.Exclusive)
    assert payloads(receive_n(again, 1)) == [b"after-batch"]
    assert_no_more(again)
