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

import pulsar_frames as frames
from helpers import assert_no_more, receive_n, receive_one, unique_topic, wait_until
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
    """Two producers on cluster a send a 12 MiB chunked message each at the same time and then
    a small one, and the replication connection a→b is reset after 5 MiB, inside the chunks:
    cluster b's consumer receives both large messages whole, each exactly once, then the small
    ones, and nothing more."""
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
    link = clusters.link("a", "b")
    link.reset_after(5 * MIB)
    results: list = []
    for producer, payload in zip(producers, large):
        producer.send_async(payload, lambda result, _id: results.append(result))
    for producer in producers:
        producer.flush()
    # The client may run a send's callback just after `flush` returns (seen once in CI): await
    # both results; a lost or failed receipt still fails here.
    wait_until(lambda: len(results) == 2, "both large messages have their send result")
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
    assert link.resets == 1


def chunk_metadata(uuid: str, chunks: int, total: int, chunk_id: int) -> bytes:
    """MessageMetadata's chunk fields: uuid (26), num_chunks_from_msg (27),
    total_chunk_msg_size (28), chunk_id (29)."""
    return (
        frames.field_string(26, uuid) + frames.field_varint(27, chunks)
        + frames.field_varint(28, total) + frames.field_varint(29, chunk_id)
    )


def create_producer(connection: frames.RawConnection, topic: str, producer_id: int) -> None:
    """PRODUCER, again while the broker answers ServiceNotReady (as the official client does:
    b's replicator may be creating the topic on a through the admin API at that moment)."""
    request_ids = iter(range(producer_id * 1000, producer_id * 1000 + 1000))

    def created() -> bool:
        connection.send(frames.producer_frame(topic, producer_id, next(request_ids)))
        reply = connection.reply()
        assert reply is not None, "the broker closed the connection"
        if reply.command_type == frames.ERROR and reply.first(2) == frames.SERVER_ERROR_SERVICE_NOT_READY:
            return False
        assert reply.command_type == frames.PRODUCER_SUCCESS, f"{reply.name} {reply.body}"
        return True

    wait_until(created, f"producer {producer_id} is created", interval_s=0.2)


def test_chunks_of_two_producers_interleaved_in_the_log_cross_geo_replication(clusters_factory):
    """Two producers' chunks alternate in cluster a's log (sent by hand, one at a time: p1's
    chunk 0, p2's chunk 0, p1's chunk 1, ...): cluster b's official-client consumer puts both
    messages together, each exactly once."""
    clusters = clusters_factory(("a", "b"))
    namespace = clusters.new_namespace("chunks")
    clusters.create_replicated_namespace(namespace, ["a", "b"])
    topic = f"persistent://{namespace}/interleaved"
    on_b = clusters.client("b").subscribe(
        topic, "check", consumer_type=pulsar.ConsumerType.Shared,
        initial_position=pulsar.InitialPosition.Earliest,
    )
    chunk_size = 64 * 1024
    messages = {name: os.urandom(3 * chunk_size) for name in ("p1", "p2")}
    with frames.RawConnection(clusters["a"].broker_port) as connection:
        connection.handshake()
        for producer_id in (1, 2):
            create_producer(connection, topic, producer_id)
        for chunk_id in range(3):
            for producer_id, (name, payload) in enumerate(messages.items(), start=1):
                chunk = payload[chunk_id * chunk_size:(chunk_id + 1) * chunk_size]
                metadata = chunk_metadata(f"{name}-message", 3, len(payload), chunk_id)
                connection.request(
                    frames.send_frame(producer_id, 0, chunk, producer_name=name, metadata_fields=metadata),
                    frames.SEND_RECEIPT,
                )
    received = receive_n(on_b, 2, timeout_ms=60_000)
    for message in received:
        on_b.acknowledge(message)
    assert sorted(message.data() for message in received) == sorted(messages.values())
    assert_no_more(on_b, what="each chunked message is delivered once")
