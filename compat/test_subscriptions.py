"""Subscription types: Exclusive, Shared, Failover and Key_Shared, as a user of them notices them."""

import threading

import pulsar
import pytest

from helpers import (
    CONDITION_TIMEOUT_S,
    assert_no_more,
    collect_from,
    payloads,
    receive_n,
    send_all_async,
    SendTracker,
    wait_until,
)

Type = pulsar.ConsumerType
Earliest = pulsar.InitialPosition.Earliest


# ------------------------------------------------------------------ Exclusive


def test_exclusive_subscription_refuses_a_second_consumer(client, topic):
    first = client.subscribe(topic, "only-one", consumer_type=Type.Exclusive)
    with pytest.raises(pulsar.ConsumerBusy):
        client.subscribe(topic, "only-one", consumer_type=Type.Exclusive)
    # The first consumer is unaffected.
    client.create_producer(topic).send(b"still mine")
    assert receive_n(first, 1)[0].data() == b"still mine"


def test_subscription_of_another_type_is_refused_while_in_use(client, topic):
    client.subscribe(topic, "typed", consumer_type=Type.Exclusive)
    with pytest.raises(pulsar.ConsumerBusy):
        client.subscribe(topic, "typed", consumer_type=Type.Shared)


def test_exclusive_subscription_is_free_again_after_close(client, topic):
    first = client.subscribe(topic, "reusable", consumer_type=Type.Exclusive)
    first.close()
    second = client.subscribe(topic, "reusable", consumer_type=Type.Exclusive)
    client.create_producer(topic).send(b"for the second")
    assert receive_n(second, 1)[0].data() == b"for the second"


# ------------------------------------------------------------------ Shared


def test_shared_subscription_spreads_messages_across_consumers(client, topic):
    count = 100
    consumers = [
        client.subscribe(topic, "spread", consumer_type=Type.Shared, receiver_queue_size=10)
        for _ in range(2)
    ]
    producer = client.create_producer(topic)
    send_all_async(producer, [f"m{i}".encode() for i in range(count)])

    received = collect_from(consumers, count, on_message=lambda i, m: consumers[i].acknowledge(m))
    all_payloads = [p for per_consumer in received for p in payloads(per_consumer)]
    assert sorted(all_payloads) == sorted(f"m{i}".encode() for i in range(count))
    assert len(set(all_payloads)) == count, "a message was delivered twice"
    assert all(per_consumer for per_consumer in received), (
        f"one consumer got everything: {[len(r) for r in received]}"
    )
    for consumer in consumers:
        assert_no_more(consumer)


def test_shared_unacked_messages_of_a_closed_consumer_go_to_the_others(client, topic):
    count = 20
    leaving = client.subscribe(topic, "handover", consumer_type=Type.Shared)
    producer = client.create_producer(topic)
    send_all_async(producer, [f"m{i}".encode() for i in range(count)])

    # `leaving` is the only consumer, so everything is dispatched to it. It acks the first five.
    taken = receive_n(leaving, count)
    assert payloads(taken) == [f"m{i}".encode() for i in range(count)]
    for message in taken[:5]:
        leaving.acknowledge(message)
    assert all(m.redelivery_count() == 0 for m in taken)

    staying = client.subscribe(topic, "handover", consumer_type=Type.Shared)
    leaving.close()  # flushes the five acks, then closes

    redelivered = receive_n(staying, count - 5)
    assert sorted(payloads(redelivered)) == sorted(f"m{i}".encode() for i in range(5, count))
    counts = [m.redelivery_count() for m in redelivered]
    assert all(c >= 1 for c in counts), f"redelivered messages must count the redelivery: {counts}"
    assert_no_more(staying, what="acked messages must not come back")


# ------------------------------------------------------------------ Failover


def test_failover_only_the_active_consumer_receives(client, topic):
    count = 30
    consumers = [
        client.subscribe(topic, "failover", consumer_type=Type.Failover, consumer_name=f"c{i}")
        for i in range(2)
    ]
    producer = client.create_producer(topic)
    send_all_async(producer, [f"m{i}".encode() for i in range(count)])

    received = collect_from(consumers, count)
    sizes = sorted(len(r) for r in received)
    assert sizes == [0, count], f"both Failover consumers received messages: {sizes}"
    active = next(r for r in received if r)
    assert payloads(active) == [f"m{i}".encode() for i in range(count)]
    for consumer in consumers:
        assert_no_more(consumer)


def test_failover_standby_takes_over_without_losing_messages(client, topic):
    first_batch, second_batch = 20, 10
    consumers = [
        client.subscribe(topic, "failover", consumer_type=Type.Failover, consumer_name=f"c{i}")
        for i in range(2)
    ]
    producer = client.create_producer(topic)
    send_all_async(producer, [f"m{i}".encode() for i in range(first_batch)])

    received = collect_from(consumers, first_batch)
    active_index = next(i for i, r in enumerate(received) if r)
    active, standby = consumers[active_index], consumers[1 - active_index]
    assert payloads(received[active_index]) == [f"m{i}".encode() for i in range(first_batch)]
    # The active consumer processes half and then goes away.
    active.acknowledge_cumulative(received[active_index][first_batch // 2 - 1])
    active.close()

    send_all_async(producer, [f"m{i}".encode() for i in range(first_batch, first_batch + second_batch)])
    taken_over = receive_n(standby, first_batch - first_batch // 2 + second_batch)
    assert payloads(taken_over) == [
        f"m{i}".encode() for i in range(first_batch // 2, first_batch + second_batch)
    ]
    assert_no_more(standby)


# ------------------------------------------------------------------ Key_Shared


class KeyedWorker(threading.Thread):
    """Receives, records (under a shared lock, in global processing order) and acks."""

    def __init__(self, consumer, name: str, journal: list, lock: threading.Lock):
        super().__init__(daemon=True, name=f"keyed-{name}")
        self.consumer = consumer
        self.worker_name = name
        self.journal = journal
        self.lock = lock
        self.halt = threading.Event()
        self.processed = 0
        self.error = None

    def run(self):
        try:
            while not self.halt.is_set():
                try:
                    message = self.consumer.receive(timeout_millis=100)
                except pulsar.Timeout:
                    continue
                key, sequence = message.data().decode().split(":")
                with self.lock:
                    self.journal.append((self.worker_name, key, int(sequence)))
                    self.processed += 1
                self.consumer.acknowledge(message)
        except Exception as error:  # surfaced by stop()
            self.error = error

    def stop(self):
        self.halt.set()
        self.join(timeout=30)
        assert not self.is_alive(), f"worker {self.worker_name} did not stop"
        assert self.error is None, f"worker {self.worker_name} failed: {self.error!r}"


def _send_keyed(producer, keys: list[str], next_sequence: dict, rounds: int):
    contents, keys_used = [], []
    for _ in range(rounds):
        for key in keys:
            contents.append(f"{key}:{next_sequence[key]}".encode())
            keys_used.append(key)
            next_sequence[key] += 1
    tracker = SendTracker()
    for index, (content, key) in enumerate(zip(contents, keys_used)):
        producer.send_async(content, tracker.callback(index), partition_key=key)
    producer.flush()
    wait_until(lambda: tracker.settled_count() == len(contents), "keyed sends settled")
    assert not tracker.failed, f"keyed sends failed: {tracker.failed}"
    return len(contents)


def _check_per_key_order(journal, next_sequence):
    by_key: dict[str, list[int]] = {}
    for _, key, sequence in journal:
        by_key.setdefault(key, []).append(sequence)
    for key, sequences in by_key.items():
        assert sequences == list(range(next_sequence[key])), (
            f"key {key}: processed out of order, twice or not at all: {sequences}"
        )
    assert set(by_key) == set(next_sequence)


def test_key_shared_each_key_goes_to_one_consumer_in_order(client, topic):
    keys = [f"key{i}" for i in range(20)]
    next_sequence = {key: 0 for key in keys}
    journal: list = []
    lock = threading.Lock()
    workers = [
        KeyedWorker(
            client.subscribe(topic, "keyed", consumer_type=Type.KeyShared, receiver_queue_size=20),
            f"c{i}",
            journal,
            lock,
        )
        for i in range(2)
    ]
    for worker in workers:
        worker.start()
    producer = client.create_producer(topic)
    total = _send_keyed(producer, keys, next_sequence, rounds=15)
    wait_until(lambda: len(journal) >= total, f"all {total} keyed messages processed")
    for worker in workers:
        worker.stop()

    owners: dict[str, set] = {}
    for name, key, _ in journal:
        owners.setdefault(key, set()).add(name)
    shared_keys = {key: names for key, names in owners.items() if len(names) > 1}
    assert not shared_keys, f"keys delivered to more than one consumer: {shared_keys}"
    assert {name for names in owners.values() for name in names} == {"c0", "c1"}, (
        "Key_Shared gave every key to one consumer"
    )
    _check_per_key_order(journal, next_sequence)


@pytest.mark.timeout(180)
def test_key_shared_keeps_per_key_order_when_consumers_join_and_leave(client, topic):
    keys = [f"key{i}" for i in range(20)]
    next_sequence = {key: 0 for key in keys}
    journal: list = []
    lock = threading.Lock()

    def worker(name):
        consumer = client.subscribe(
            topic, "keyed", consumer_type=Type.KeyShared, receiver_queue_size=10
        )
        started = KeyedWorker(consumer, name, journal, lock)
        started.start()
        return started

    producer = client.create_producer(topic)
    first = worker("first")
    total = _send_keyed(producer, keys, next_sequence, rounds=15)
    wait_until(lambda: first.processed >= 50, "the first consumer processed some messages")

    # A consumer joins mid-stream.
    second = worker("second")
    total += _send_keyed(producer, keys, next_sequence, rounds=15)
    wait_until(
        lambda: second.processed > 0,
        "the joining consumer was given keys",
        timeout_s=CONDITION_TIMEOUT_S,
    )
    wait_until(lambda: len(journal) >= total // 2 + 100, "processing progressed after the join")

    # The first consumer leaves mid-stream: what it held goes to the second.
    first.stop()
    first.consumer.close()
    total += _send_keyed(producer, keys, next_sequence, rounds=15)
    wait_until(lambda: len(journal) >= total, f"all {total} keyed messages processed")
    second.stop()

    _check_per_key_order(journal, next_sequence)
    assert_no_more(second.consumer, what="every message was processed and acked once")
