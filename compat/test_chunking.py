"""Chunked messages: the official client cuts a message larger than the broker's advertised
`max_message_size` into chunks (`chunking_enabled=True`, batching off) and the consumer puts
them back together. Each chunk's payload is `max_message_size` bytes and its metadata rides on
top, in Pulsar's frame padding (issue 12, item 1: the broker counted the metadata too and
refused every chunk, so `send` never returned).

The broker's limit is 1 MiB here, so a 12 MiB message is 12 chunks.
"""

import os

import pulsar
import pytest

from helpers import receive_one, unique_topic

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def broker(module_brokers):
    return module_brokers.start(config={"max_message_size": MIB})


@pytest.mark.parametrize(
    "consumer_type", [pulsar.ConsumerType.Exclusive, pulsar.ConsumerType.Shared], ids=["Exclusive", "Shared"]
)
def test_a_12_mib_message_round_trips_in_chunks(broker, client, consumer_type):
    topic = unique_topic("chunked")
    consumer = client.subscribe(topic, "chunks", consumer_type=consumer_type)
    producer = client.create_producer(topic, chunking_enabled=True, batching_enabled=False)
    large = os.urandom(12 * MIB + 12345)
    small = b"after the large one"
    producer.send(large)
    producer.send(small)

    first = receive_one(consumer)
    assert len(first.data()) == len(large)
    assert first.data() == large, "the reassembled message differs from the one sent"
    consumer.acknowledge(first)
    assert receive_one(consumer).data() == small
