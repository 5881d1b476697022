"""Produce/consume round trips: payload bytes, metadata, per-producer order, batching, compression."""

import os
from pathlib import Path

import pulsar
import pytest

from helpers import (
    assert_no_more,
    message_position,
    now_ms,
    payloads,
    receive_n,
    receive_one,
    send_all_async,
    SendTracker,
    unique,
    wait_until,
)

CODECS = {
    "LZ4": pulsar.CompressionType.LZ4,
    "ZLIB": pulsar.CompressionType.ZLib,
    "ZSTD": pulsar.CompressionType.ZSTD,
    "SNAPPY": pulsar.CompressionType.SNAPPY,
}


def subscribe_earliest(client, topic, **kwargs):
    return client.subscribe(
        topic, unique("sub"), initial_position=pulsar.InitialPosition.Earliest, **kwargs
    )


def test_payloads_round_trip_byte_exact(client, topic):
    contents = [
        b"",
        bytes(range(256)),
        b"\x00" * 1000,
        "héllo wörld ✓ 𝄞".encode("utf-8"),
        b"\xff\xfe\r\n\x0e\x01\x0e\x02" * 64,  # includes the checksum and entry-metadata magics
        os.urandom(1024 * 1024),
    ]
    consumer = subscribe_earliest(client, topic)
    producer = client.create_producer(topic)
    for content in contents:
        producer.send(content)

    received = receive_n(consumer, len(contents))
    for index, (sent, got) in enumerate(zip(contents, payloads(received))):
        assert got == sent, f"payload {index} differs: sent {len(sent)} bytes, got {len(got)}"
    assert_no_more(consumer)


def test_properties_keys_event_time_and_producer_name_round_trip(client, topic):
    properties = {"plain": "1", "empty": "", "ünïcode-ключ": "значение ✓"}
    event_time = 1_600_000_000_123
    consumer = subscribe_earliest(client, topic)
    producer = client.create_producer(topic)
    before = now_ms()
    producer.send(
        b"with metadata",
        properties=properties,
        partition_key="user-42",
        ordering_key="order-7",
        event_timestamp=event_time,
    )
    after = now_ms()
    producer.send(b"without metadata")

    with_metadata, without_metadata = receive_n(consumer, 2)
    assert with_metadata.data() == b"with metadata"
    assert with_metadata.properties() == properties
    assert with_metadata.partition_key() == "user-42"
    assert with_metadata.ordering_key() == "order-7"
    assert with_metadata.event_timestamp() == event_time
    # The publish time is stamped by the producer and must reach the consumer unchanged.
    assert before <= with_metadata.publish_timestamp() <= after
    assert with_metadata.producer_name() == producer.producer_name()

    assert without_metadata.properties() == {}
    assert without_metadata.partition_key() == ""
    assert without_metadata.event_timestamp() == 0


def test_per_producer_order_with_interleaved_producers(client, topic):
    per_producer = 300
    consumer = subscribe_earliest(client, topic)
    producers = [client.create_producer(topic, producer_name=unique(f"p{i}")) for i in range(2)]
    trackers = {p.producer_name(): SendTracker() for p in producers}
    for sequence in range(per_producer):
        for producer in producers:
            name = producer.producer_name()
            producer.send_async(f"{name}:{sequence}".encode(), trackers[name].callback(sequence))
    for producer in producers:
        producer.flush()
    for name, tracker in trackers.items():
        wait_until(lambda: tracker.settled_count() == per_producer, f"sends of {name} settled")
        assert not tracker.failed, f"sends of {name} failed: {tracker.failed}"
        # Receipts carry strictly increasing positions, in send order.
        positions = [message_position(tracker.acked[i]) for i in range(per_producer)]
        assert positions == sorted(set(positions)), f"receipt positions of {name} out of order"

    received = receive_n(consumer, 2 * per_producer)
    by_producer: dict[str, list[int]] = {}
    for message in received:
        name, sequence = message.data().decode().rsplit(":", 1)
        assert message.producer_name() == name
        by_producer.setdefault(name, []).append(int(sequence))
    assert set(by_producer) == set(trackers)
    for name, sequences in by_producer.items():
        assert sequences == list(range(per_producer)), f"order of producer {name} broken"
    # Delivery follows storage order.
    positions = [message_position(m.message_id()) for m in received]
    assert positions == sorted(positions)
    assert_no_more(consumer)


@pytest.mark.parametrize("batching", [False, True], ids=["batching-off", "batching-on"])
def test_batching_round_trip_keeps_order_and_per_message_metadata(client, topic, batching):
    count = 100
    consumer = subscribe_earliest(client, topic)
    producer = client.create_producer(
        topic,
        batching_enabled=batching,
        batching_max_messages=20,
        batching_max_publish_delay_ms=100,
    )
    contents = [f"message-{i}".encode() for i in range(count)]
    tracker = SendTracker()
    for index, content in enumerate(contents):
        producer.send_async(
            content,
            tracker.callback(index),
            properties={"index": str(index)},
            partition_key=f"key-{index % 3}",
        )
    producer.flush()
    wait_until(lambda: tracker.settled_count() == count, "all sends settled")
    assert not tracker.failed, f"sends failed: {tracker.failed}"

    received = receive_n(consumer, count)
    assert payloads(received) == contents
    for index, message in enumerate(received):
        assert message.properties() == {"index": str(index)}
        assert message.partition_key() == f"key-{index % 3}"

    batch_indexes = [m.message_id().batch_index() for m in received]
    if batching:
        assert all(i >= 0 for i in batch_indexes), "batched messages must carry batch indexes"
        entries = {(m.message_id().ledger_id(), m.message_id().entry_id()) for m in received}
        assert len(entries) < count, "batching on, yet every message came in its own entry"
        # Within one entry, batch indexes are 0..n-1 in order.
        by_entry: dict[tuple, list[int]] = {}
        for message in received:
            mid = message.message_id()
            by_entry.setdefault((mid.ledger_id(), mid.entry_id()), []).append(mid.batch_index())
        for indexes in by_entry.values():
            assert indexes == list(range(len(indexes)))
    else:
        assert all(i == -1 for i in batch_indexes)
    assert_no_more(consumer)


@pytest.mark.parametrize("batching", [False, True], ids=["batching-off", "batching-on"])
@pytest.mark.parametrize("codec", list(CODECS))
def test_compressed_messages_round_trip(client, topic, codec, batching):
    consumer = subscribe_earliest(client, topic)
    producer = client.create_producer(
        topic,
        compression_type=CODECS[codec],
        batching_enabled=batching,
        batching_max_messages=10,
        batching_max_publish_delay_ms=100,
    )
    contents = [(f"{codec}-{i}:" + "compressible text " * (50 * (i + 1))).encode() for i in range(10)]
    contents.append(os.urandom(64 * 1024))  # incompressible
    send_all_async(producer, contents, properties={"codec": codec})

    received = receive_n(consumer, len(contents))
    assert payloads(received) == contents
    assert all(m.properties() == {"codec": codec} for m in received)
    assert_no_more(consumer)


def _stored_bytes(data_dir: Path) -> bytes:
    chunks = []
    for path in sorted(data_dir.rglob("*")):
        if path.is_file():
            chunks.append(path.read_bytes())
    return b"\n".join(chunks)


@pytest.mark.parametrize("codec", ["NONE"] + list(CODECS))
def test_compressed_payload_is_stored_as_sent(broker, client, topic, codec):
    """The broker stores the producer's entry byte-exact: a compressed payload stays compressed.

    Observed from outside through the data directory, whose segment records hold each entry
    unchanged (docs/storage-format.md). NONE is the control: the plaintext must be found then,
    which shows that the search can see a stored payload at all.
    """
    token = unique(f"stored-as-sent-{codec}")
    content = (f"{token};" * 4000).encode()
    window = content[:4096]  # no codec leaves 4 KiB of repetitive text verbatim
    compression = pulsar.CompressionType.NONE if codec == "NONE" else CODECS[codec]
    producer = client.create_producer(topic, compression_type=compression)
    producer.send(content)  # acknowledged = durable on disk

    stored = _stored_bytes(broker.data_dir)
    if codec == "NONE":
        assert window in stored, (
            "an uncompressed payload was not found verbatim under the data directory: either "
            "storage transforms entries, or this test's premise (byte-exact segments) is stale"
        )
    else:
        assert window not in stored, f"a {codec}-compressed payload was stored decompressed"

    consumer = subscribe_earliest(client, topic)
    assert receive_one(consumer).data() == content


_HTTP_SERVICE_URL_CLIENT = """
import sys, pulsar
client = pulsar.Client(sys.argv[1], operation_timeout_seconds=30)
producer = client.create_producer(sys.argv[2])
consumer = client.subscribe(sys.argv[2], "over-http-lookup")
producer.send(b"looked up over http")
message = consumer.receive(30000)
consumer.acknowledge(message)
print("received: " + message.data().decode())
client.close()
"""


def test_a_client_on_the_http_service_url_produces_and_consumes(broker, topic):
    # The client looks topics up with /lookup/v2 on the broker's web service. The C++ client
    # (under the Python one) refuses an answer without `brokerUrlTls` as malformed and then
    # crashes, so it runs in a process of its own: a regression fails this test, not the run.
    import subprocess
    import sys

    finished = subprocess.run(
        [sys.executable, "-c", _HTTP_SERVICE_URL_CLIENT, broker.web_url, topic],
        capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, (finished.returncode, finished.stderr[-2000:])
    # (The client logs to stdout too.)
    assert "received: looked up over http" in finished.stdout.splitlines()
