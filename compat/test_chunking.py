"""Chunked messages: the official client cuts a message larger than the broker's advertised
`max_message_size` into chunks (`chunking_enabled=True`, batching off) and the consumer puts
them back together. Each chunk's payload is `max_message_size` bytes and its metadata rides on
top, in Pulsar's frame padding (issue 12, item 1: the broker counted the metadata too and
refused every chunk, so `send` never returned).

The broker's limit is 1 MiB here, so a 12 MiB message is 12 chunks. Chunked messages also cross
geo-replication: the replicator forwards each chunk as the entry it is, with its chunk metadata,
and the remote's consumers put them back together (two producers' chunks interleaved included).
"""

import os

import pulsar
import pytest

from helpers import assert_no_more, receive_n, receive_one, unique_topic
from replication_harness import clusters_factory  # noqa: F401 (fixture)

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


@pytest.mark.parametrize(
    "consumer_type", [pulsar.ConsumerType.Exclusive, pulsar.ConsumerType.Shared], ids=["Exclusive", "Shared"]
)
def test_chunked_messages_cross_geo_replication_whole_and_once(clusters_factory, consumer_type):
    """Two producers on cluster a send a 12 MiB chunked message each at the same time (their
    chunks interleave in the log) and then a small one: cluster b's consumer receives both
    large messages whole, each exactly once, and then the small ones, and nothing more."""
    clusters = clusters_factory(("a", "b"), config={"max_message_size": MIB})
    namespace = clusters.new_namespace("chunks")
    clusters.create_replicated_namespace(namespace, ["a", "b"])
    topic = f"persistent://{namespace}/large"
    on_b = clusters.client("b").subscribe(
        topic, "check", consumer_type=consumer_type, initial_position=pulsar.InitialPosition.Earliest
    )
    producers = [
        clusters.client("a").create_producer(topic, chunking_enabled=True, batching_enabled=False)
        for _ in range(2)
    ]
    large = [os.urandom(12 * MIB + 777 * i) for i in range(2)]
    results: list = []
    for producer, payload in zip(producers, large):
        producer.send_async(payload, lambda result, _id: results.append(result))
    for producer in producers:
        producer.flush()
    assert results == [pulsar.Result.Ok] * 2, results
    for i, producer in enumerate(producers):
        producer.send(f"small {i}".encode())

    received = receive_n(on_b, 4, timeout_ms=60_000)
    for message in received:
        on_b.acknowledge(message)
    datas = [message.data() for message in received]
    assert sorted(len(data) for data in datas[:2]) == sorted(len(data) for data in large)
    assert sorted(datas[:2]) == sorted(large), "a reassembled message differs from the one sent"
    assert sorted(datas[2:]) == [b"small 0", b"small 1"]
    assert_no_more(on_b, what="each chunked message is delivered once")
