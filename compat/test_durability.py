"""Durability across restarts and crashes, observed through the official client.

Each test starts its own broker, because it stops or kills it.
"""

import threading

import pulsar
import pytest

from helpers import (
    assert_no_more,
    payloads,
    receive_n,
    send_all_async,
    SendTracker,
    unique,
    unique_topic,
    wait_until,
)

Type = pulsar.ConsumerType
Earliest = pulsar.InitialPosition.Earliest


def test_graceful_restart_redelivers_unacked_and_forgets_acked(broker_factory, client_factory):
    # Models: an orderly broker restart (SIGTERM) with a subscription that has acknowledged
    # some messages individually and left others pending.
    broker = broker_factory.start()
    topic = unique_topic("restart")
    client = client_factory(broker)
    consumer = client.subscribe(topic, "durable", consumer_type=Type.Shared)
    sent = [f"m{i}".encode() for i in range(10)]
    send_all_async(client.create_producer(topic), sent)
    acked = {b"m0", b"m1", b"m2", b"m3", b"m6"}
    for message in receive_n(consumer, 10):
        if message.data() in acked:
            consumer.acknowledge(message)
    client.close()  # flushes the acks before the connection goes away

    broker.restart()

    client = client_factory(broker)
    consumer = client.subscribe(topic, "durable", consumer_type=Type.Shared)
    expected = [m for m in sent if m not in acked]
    assert payloads(receive_n(consumer, len(expected))) == expected
    assert_no_more(consumer, what="acknowledged messages must not come back after a restart")

    # The data itself is all still there for a new subscription.
    audit = client.subscribe(topic, unique("audit"), initial_position=Earliest)
    assert payloads(receive_n(audit, 10)) == sent


def test_graceful_restart_keeps_a_cumulative_ack_position(broker_factory, client_factory):
    # Models: an orderly restart after a cumulative acknowledgement on an Exclusive subscription.
    broker = broker_factory.start()
    topic = unique_topic("restart-cumulative")
    client = client_factory(broker)
    consumer = client.subscribe(topic, "durable", consumer_type=Type.Exclusive)
    sent = [f"m{i}".encode() for i in range(8)]
    send_all_async(client.create_producer(topic), sent)
    received = receive_n(consumer, 8)
    consumer.acknowledge_cumulative(received[4])
    client.close()

    broker.restart()

    client = client_factory(broker)
    consumer = client.subscribe(topic, "durable", consumer_type=Type.Exclusive)
    assert payloads(receive_n(consumer, 3)) == sent[5:]
    assert_no_more(consumer)


class LoadProducer(threading.Thread):
    """Sends numbered messages with send_async until told to stop (bounded by `limit`)."""

    def __init__(self, producer, limit: int):
        super().__init__(daemon=True, name="load-producer")
        self.producer = producer
        self.limit = limit
        self.tracker = SendTracker()
        self.halt = threading.Event()
        self.sent = 0
        self.error = None

    def run(self):
        try:
            while not self.halt.is_set() and self.sent < self.limit:
                index = self.sent
                self.producer.send_async(payload(index), self.tracker.callback(index))
                self.sent += 1
        except Exception as error:  # surfaced by stop()
            self.error = error

    def stop(self):
        self.halt.set()
        self.join(timeout=60)
        assert not self.is_alive(), "the load producer did not stop"
        assert self.error is None, f"the load producer failed: {self.error!r}"


class LoadConsumer(threading.Thread):
    """Receives and acks until told to stop, remembering every payload it was given."""

    def __init__(self, consumer):
        super().__init__(daemon=True, name="load-consumer")
        self.consumer = consumer
        self.received: set[bytes] = set()
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.error = None

    def run(self):
        try:
            while not self.halt.is_set():
                try:
                    message = self.consumer.receive(timeout_millis=100)
                except pulsar.Timeout:
                    continue
                with self.lock:
                    self.received.add(message.data())
                self.consumer.acknowledge(message)
        except Exception as error:  # surfaced by stop()
            self.error = error

    def missing(self, wanted: set[bytes]) -> set[bytes]:
        with self.lock:
            return wanted - self.received

    def stop(self):
        self.halt.set()
        self.join(timeout=30)
        assert not self.is_alive(), "the load consumer did not stop"
        assert self.error is None, f"the load consumer failed: {self.error!r}"


def payload(index: int) -> bytes:
    return f"load-{index:07d}".encode()


def index_of(content: bytes) -> int:
    return int(content.decode().split("-")[1])


def drain(consumer) -> list[bytes]:
    """Everything the consumer still gets, until it stays quiet for a while."""
    contents = []
    while True:
        try:
            message = consumer.receive(timeout_millis=3_000)
        except pulsar.Timeout:
            return contents
        contents.append(message.data())
        consumer.acknowledge(message)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dedup", [False, True], ids=["plain", "dedup"])
def test_kill9_under_load_loses_no_acknowledged_message(broker_factory, client_factory, dedup):
    # Models: the broker process is killed (SIGKILL, no flush, no goodbye) while a producer and
    # a consumer are busy; clients reconnect to the restarted broker by themselves.
    broker = broker_factory.start(config={"deduplication_enabled": True} if dedup else None)
    topic = unique_topic("kill9")
    client = client_factory(broker, operation_timeout_seconds=60)
    # An audit subscription that never acks keeps every stored message readable.
    client.subscribe(topic, "audit", initial_position=Earliest).close()
    consumer = client.subscribe(
        topic, "work", consumer_type=Type.Shared, initial_position=Earliest, receiver_queue_size=200
    )
    producer = client.create_producer(
        topic,
        producer_name=unique("loader"),
        block_if_queue_full=True,
        max_pending_messages=500,
        send_timeout_millis=120_000,
    )
    loader = LoadProducer(producer, limit=30_000)
    worker = LoadConsumer(consumer)
    loader.start()
    worker.start()

    wait_until(lambda: loader.tracker.acked_count() >= 5_000, "5000 sends acknowledged", 120)
    acked_before_kill = loader.tracker.acked_count()
    broker.kill9_and_restart()
    wait_until(
        lambda: loader.tracker.acked_count() >= acked_before_kill + 3_000,
        "the producer resumed after the restart",
        120,
    )
    loader.stop()
    producer.flush()
    wait_until(
        lambda: loader.tracker.settled_count() == loader.sent, "every send settled", 150
    )
    producer.close()
    acked = {payload(i) for i in loader.tracker.acked}

    # No acknowledged message is skipped on the working subscription...
    wait_until(
        lambda: not worker.missing(acked),
        "the working subscription delivered every acknowledged message",
        120,
    )
    worker.stop()

    # ...and every acknowledged message is stored, in send order.
    audit = client.subscribe(topic, "audit", initial_position=Earliest, receiver_queue_size=1000)
    stored = drain(audit)
    missing = acked - set(stored)
    assert not missing, (
        f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
    )
    first_seen = []
    seen = set()
    for content in stored:
        if content not in seen:
            seen.add(content)
            first_seen.append(index_of(content))
    assert first_seen == sorted(first_seen), "stored order differs from send order"
    duplicates = len(stored) - len(seen)
    if dedup:
        assert duplicates == 0, f"{duplicates} messages stored twice despite de-duplication"


def test_relaxed_mode_end_to_end_survives_a_restart_and_a_process_crash(broker_factory, client_factory):
    # Relaxed mode (flush_policy = "relaxed-write-only", opt-in) acknowledges a send once it is
    # written to the operating system: it must survive a graceful restart and the broker
    # process being killed (the page cache outlives the process), with acknowledgements kept.
    # What it does not survive, a machine crash, the storage simulator tests
    # (crates/storage/tests/faults.rs): a kill cannot show a missing fsync.
    broker = broker_factory.start(
        config={"storage.flush_policy": "relaxed-write-only", "storage.relaxed_fsync_interval_ms": 60_000}
    )
    topic = unique_topic("relaxed")
    client = client_factory(broker)
    consumer = client.subscribe(topic, "durable", consumer_type=Type.Shared)
    sent = [f"r{i}".encode() for i in range(50)]
    send_all_async(client.create_producer(topic), sent)
    for message in receive_n(consumer, 50):
        if int(message.data()[1:]) % 2 == 0:
            consumer.acknowledge(message)
    client.close()  # flushes the acks before the connection goes away

    broker.restart()
    client = client_factory(broker)
    more = [f"s{i}".encode() for i in range(20)]
    send_all_async(client.create_producer(topic), more)
    client.close()

    broker.kill9_and_restart()
    client = client_factory(broker)
    consumer = client.subscribe(topic, "durable", consumer_type=Type.Shared)
    expected = [m for m in sent if int(m[1:]) % 2 == 1] + more
    assert sorted(payloads(receive_n(consumer, len(expected)))) == sorted(expected)
    assert_no_more(consumer, what="acknowledged messages must not come back")
    audit = client.subscribe(topic, unique("audit"), initial_position=Earliest)
    assert payloads(receive_n(audit, len(sent) + len(more))) == sent + more
