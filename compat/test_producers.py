"""Producers: names, sequence ids without de-duplication, and access modes.

Sequence-id continuity *with* de-duplication is in test_deduplication.py, which runs a broker
with `deduplication_enabled = true`.
"""

import threading

import pulsar
import pytest

from helpers import (
    ABSENCE_WAIT_MS,
    assert_no_more,
    payloads,
    receive_n,
    unique,
    wait_until,
)

Mode = pulsar.ProducerAccessMode


def test_broker_generates_unique_producer_names(client, topic):
    first = client.create_producer(topic)
    second = client.create_producer(topic)
    assert first.producer_name(), "the broker must name a producer that came without a name"
    assert second.producer_name()
    assert first.producer_name() != second.producer_name()

    consumer = client.subscribe(topic, "sub", initial_position=pulsar.InitialPosition.Earliest)
    first.send(b"from first")
    second.send(b"from second")
    names = {m.data(): m.producer_name() for m in receive_n(consumer, 2)}
    assert names == {b"from first": first.producer_name(), b"from second": second.producer_name()}


def test_given_producer_name_is_kept(client, topic):
    name = unique("my-producer")
    producer = client.create_producer(topic, producer_name=name)
    assert producer.producer_name() == name
    consumer = client.subscribe(topic, "sub", initial_position=pulsar.InitialPosition.Earliest)
    producer.send(b"named")
    assert receive_n(consumer, 1)[0].producer_name() == name


def test_second_producer_with_same_name_is_refused(client, topic):
    name = unique("taken")
    first = client.create_producer(topic, producer_name=name)
    with pytest.raises(pulsar.ProducerBusy):
        client.create_producer(topic, producer_name=name)
    first.send(b"first still works")


def test_last_sequence_id_starts_fresh_without_dedup(client, topic):
    """Without de-duplication the broker keeps no sequence state: a new producer starts at 0."""
    name = unique("no-dedup")
    producer = client.create_producer(topic, producer_name=name)
    assert producer.last_sequence_id() == -1
    for index in range(3):
        producer.send(f"m{index}".encode())
    assert producer.last_sequence_id() == 2
    producer.close()

    again = client.create_producer(topic, producer_name=name)
    assert again.last_sequence_id() == -1
    again.send(b"m3")
    assert again.last_sequence_id() == 0


@pytest.mark.parametrize(
    "first_mode, second_mode, refusal",
    [
        (Mode.Exclusive, Mode.Exclusive, pulsar.ProducerFenced),
        (Mode.Exclusive, Mode.Shared, pulsar.ProducerBusy),
        (Mode.Shared, Mode.Exclusive, pulsar.ProducerFenced),
    ],
    ids=["exclusive-then-exclusive", "exclusive-then-shared", "shared-then-exclusive"],
)
def test_exclusive_access_refuses_a_second_producer(client, topic, first_mode, second_mode, refusal):
    first = client.create_producer(topic, access_mode=first_mode)
    with pytest.raises(refusal):
        client.create_producer(topic, access_mode=second_mode)
    first.send(b"first keeps its access")
    first.close()
    # Once the first producer is gone the topic is free again.
    second = client.create_producer(topic, access_mode=second_mode)
    second.send(b"second got access")


def test_shared_access_allows_many_producers(client, topic):
    consumer = client.subscribe(topic, "sub", initial_position=pulsar.InitialPosition.Earliest)
    producers = [client.create_producer(topic, access_mode=Mode.Shared) for _ in range(3)]
    for index, producer in enumerate(producers):
        producer.send(f"from {index}".encode())
    assert sorted(payloads(receive_n(consumer, 3))) == [b"from 0", b"from 1", b"from 2"]


def test_wait_for_exclusive_waits_and_takes_over(client, topic):
    consumer = client.subscribe(topic, "sub", initial_position=pulsar.InitialPosition.Earliest)
    holder = client.create_producer(topic, access_mode=Mode.Exclusive)

    outcome: dict = {}

    def create_waiting_producer():
        try:
            outcome["producer"] = client.create_producer(topic, access_mode=Mode.WaitForExclusive)
        except Exception as error:  # reported by the assertions below
            outcome["error"] = error

    waiter = threading.Thread(target=create_waiting_producer, daemon=True)
    waiter.start()
    # While the holder is open, the waiter must neither succeed nor fail...
    waiter.join(timeout=ABSENCE_WAIT_MS / 1000)
    assert not outcome, f"WaitForExclusive did not wait for the exclusive holder: {outcome}"
    # ...and the holder keeps its access.
    holder.send(b"from holder")
    assert waiter.is_alive() and not outcome

    holder.close()
    wait_until(lambda: bool(outcome), "the waiting producer was created after the holder closed")
    assert "error" not in outcome, f"WaitForExclusive failed: {outcome['error']!r}"
    outcome["producer"].send(b"from waiter")

    assert payloads(receive_n(consumer, 2)) == [b"from holder", b"from waiter"]
    assert_no_more(consumer)
