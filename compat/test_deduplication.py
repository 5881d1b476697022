"""De-duplication by (producer name, sequence id), switched on broker-wide
(`deduplication_enabled = true`): a resend is acknowledged but stored once, across restarts too,
and a producer that comes back under the same name continues its sequence."""

import pulsar
import pytest

from helpers import assert_no_more, payloads, receive_n, unique, unique_topic, wait_until

DEDUP = {"deduplication_enabled": True}
Earliest = pulsar.InitialPosition.Earliest


@pytest.fixture(scope="module")
def broker(module_brokers):
    return module_brokers.start(config=DEDUP)


def test_last_sequence_id_continues_after_the_producer_comes_back(client, topic):
    name = unique("continuing")
    producer = client.create_producer(topic, producer_name=name)
    assert producer.last_sequence_id() == -1
    for index in range(5):
        producer.send(f"m{index}".encode())
    assert producer.last_sequence_id() == 4
    producer.close()

    again = client.create_producer(topic, producer_name=name)
    assert again.last_sequence_id() == 4, "the broker must hand back the stored sequence id"
    again.send(b"m5")
    assert again.last_sequence_id() == 5

    consumer = client.subscribe(topic, "all", initial_position=Earliest)
    assert payloads(receive_n(consumer, 6)) == [f"m{i}".encode() for i in range(6)]
    assert_no_more(consumer)


def test_resent_sequence_ids_are_acknowledged_and_stored_once(client, topic):
    name = unique("resender")
    producer = client.create_producer(topic, producer_name=name)
    for sequence in (1, 2, 3):
        producer.send(f"s{sequence}".encode(), sequence_id=sequence)
    producer.close()

    # The same producer, reconnected, resends what it is unsure about and then goes on.
    again = client.create_producer(topic, producer_name=name)
    assert again.last_sequence_id() == 3
    again.send(b"s2", sequence_id=2)  # acknowledged, not stored
    again.send(b"s3", sequence_id=3)  # acknowledged, not stored
    again.send(b"s4", sequence_id=4)

    consumer = client.subscribe(topic, "all", initial_position=Earliest)
    assert payloads(receive_n(consumer, 4)) == [b"s1", b"s2", b"s3", b"s4"]
    assert_no_more(consumer, what="duplicates must not be stored")


def test_producers_with_different_names_are_not_deduplicated_against_each_other(client, topic):
    first = client.create_producer(topic, producer_name=unique("a"))
    second = client.create_producer(topic, producer_name=unique("b"))
    first.send(b"from a", sequence_id=7)
    second.send(b"from b", sequence_id=7)
    consumer = client.subscribe(topic, "all", initial_position=Earliest)
    assert sorted(payloads(receive_n(consumer, 2))) == [b"from a", b"from b"]


def test_deduplication_survives_a_restart(broker_factory, client_factory):
    # Models: a producer reconnects to a broker that restarted (graceful SIGTERM) and resends
    # the messages whose receipts it did not see.
    broker = broker_factory.start(config=DEDUP)
    topic = unique_topic("dedup-restart")
    name = unique("survivor")
    client = client_factory(broker)
    producer = client.create_producer(topic, producer_name=name)
    for sequence in (1, 2, 3):
        producer.send(f"s{sequence}".encode(), sequence_id=sequence)
    client.close()

    broker.restart()

    client = client_factory(broker)
    again = client.create_producer(topic, producer_name=name)
    assert again.last_sequence_id() == 3, "the sequence state must survive the restart"
    again.send(b"s3", sequence_id=3)
    again.send(b"s4", sequence_id=4)
    consumer = client.subscribe(topic, "all", initial_position=Earliest)
    assert payloads(receive_n(consumer, 4)) == [b"s1", b"s2", b"s3", b"s4"]
    assert_no_more(consumer)


def test_deduplication_survives_a_crash(broker_factory, client_factory):
    # Models: the broker is killed (SIGKILL) right after acknowledging; the producer comes back
    # and resends the last messages.
    broker = broker_factory.start(config=DEDUP)
    topic = unique_topic("dedup-crash")
    name = unique("crash-survivor")
    client = client_factory(broker)
    producer = client.create_producer(topic, producer_name=name)
    for sequence in range(1, 11):
        producer.send(f"s{sequence}".encode(), sequence_id=sequence)

    broker.kill9_and_restart()
    client.close()  # so that the old producer does not come back and hold the name

    client = client_factory(broker)
    # The old producer may have reconnected before its client closed; the name is free once
    # the broker has seen that connection go.
    created = []

    def create():
        try:
            created.append(client.create_producer(topic, producer_name=name))
        except pulsar.ProducerBusy:
            return False
        return True

    wait_until(create, "the closed client's producer releases its name")
    producer = created[0]
    assert producer.last_sequence_id() == 10
    for sequence in (9, 10):
        producer.send(f"s{sequence}".encode(), sequence_id=sequence)
    producer.send(b"s11", sequence_id=11)
    consumer = client.subscribe(topic, "all", initial_position=Earliest)
    assert payloads(receive_n(consumer, 11)) == [f"s{i}".encode() for i in range(1, 12)]
    assert_no_more(consumer)
