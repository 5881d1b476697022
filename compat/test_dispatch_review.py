"""Review of the dispatcher reading as many entries as the consumers' permits take at the messages
per entry seen (batches of 128 messages: 1,000 permits read 8 entries): redeliveries must still
go out when the entries at the head of the redelivery set were acknowledged meanwhile by an
admin (skip, expiry), not by the consumer."""

from __future__ import annotations

import json
import urllib.request

import pulsar
import pytest

from helpers import assert_no_more, receive_n

Type = pulsar.ConsumerType
BATCH = 128


def admin_post(broker, path: str) -> None:
    request = urllib.request.Request(broker.web_url + path, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=20) as response:
        assert 200 <= response.status < 300, f"POST {path}: {response.status}"


def subscribe(client, topic: str, consumer_type):
    return client.subscribe(
        topic, "work", consumer_type=consumer_type, receiver_queue_size=1000
    )


def batched_producer(client, topic: str):
    """A producer whose batches close only when full (or flushed)."""
    return client.create_producer(
        topic,
        batching_enabled=True,
        batching_max_messages=BATCH,
        batching_max_publish_delay_ms=60_000,
    )


def send_batches(producer, label: str, batches: int) -> list[bytes]:
    """`batches` entries of `BATCH` messages each (one flush per batch)."""
    sent = []
    for batch in range(batches):
        contents = [f"{label}-{batch}-{index}".encode() for index in range(BATCH)]
        for content in contents:
            producer.send_async(content, None)
        producer.flush()
        sent.extend(contents)
    return sent


@pytest.mark.parametrize(
    "consumer_type",
    [Type.Shared, Type.KeyShared, Type.Failover, Type.Exclusive],
    ids=["shared", "key-shared", "failover", "exclusive"],
)
def test_redeliveries_go_out_after_the_head_of_the_redelivery_set_was_skipped(
    broker, client, topic, consumer_type
):
    name = topic.removeprefix("persistent://")
    first = subscribe(client, topic, consumer_type)
    producer = batched_producer(client, topic)
    # 20 batches the first consumer receives and does not acknowledge; an operator skips them
    # (the subscription's cursor moves past them, the broker's redelivery bookkeeping does not).
    old = send_batches(producer, "old", 20)
    received = receive_n(first, len(old))
    assert sorted(message.data() for message in received) == sorted(old)
    admin_post(broker, f"/admin/v2/persistent/{name}/subscription/work/skip_all")
    # 4 more batches the first consumer receives and leaves unacknowledged too.
    new = send_batches(producer, "new", 4)
    received = receive_n(first, len(new))
    assert sorted(message.data() for message in received) == sorted(new)
    # It goes away: its 24 entries are to be redelivered, the 20 skipped ones first.
    first.close()

    second = subscribe(client, topic, consumer_type)
    again = receive_n(second, len(new))
    # One consumer: in the order they were published.
    assert [message.data() for message in again] == new
    for message in again:
        second.acknowledge(message)
    assert_no_more(second, what="the skipped batches are not redelivered")


def test_new_entries_go_out_after_skipped_redeliveries(broker, client, topic):
    name = topic.removeprefix("persistent://")
    first = subscribe(client, topic, Type.Shared)
    producer = batched_producer(client, topic)
    old = send_batches(producer, "old", 20)
    received = receive_n(first, len(old))
    assert sorted(message.data() for message in received) == sorted(old)
    first.close()
    # Everything the departed consumer had is skipped before anyone takes it again; then more
    # is published while nobody is connected.
    admin_post(broker, f"/admin/v2/persistent/{name}/subscription/work/skip_all")
    new = send_batches(producer, "new", 2)

    second = subscribe(client, topic, Type.Shared)
    got = receive_n(second, len(new))
    assert sorted(message.data() for message in got) == sorted(new)
    for message in got:
        second.acknowledge(message)
    assert_no_more(second, what="the skipped batches are not redelivered")
