"""Where consumption starts: initial positions, readers, has_message_available, last message id."""

import pulsar
import pytest

from helpers import (
    assert_no_more,
    payloads,
    receive_n,
    receive_one,
    send_all_async,
)

Earliest = pulsar.InitialPosition.Earliest
Latest = pulsar.InitialPosition.Latest


def contents(prefix: str, count: int) -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(count)]


# ------------------------------------------------------------------ durable subscriptions


def test_initial_position_earliest_sees_existing_messages(client, topic):
    producer = client.create_producer(topic)
    send_all_async(producer, contents("old", 5))
    consumer = client.subscribe(topic, "from-earliest", initial_position=Earliest)
    assert payloads(receive_n(consumer, 5)) == contents("old", 5)
    assert_no_more(consumer)


def test_initial_position_latest_sees_only_new_messages(client, topic):
    producer = client.create_producer(topic)
    send_all_async(producer, contents("old", 5))
    consumer = client.subscribe(topic, "from-latest", initial_position=Latest)
    send_all_async(producer, contents("new", 3))
    assert payloads(receive_n(consumer, 3)) == contents("new", 3)
    assert_no_more(consumer)


def test_subscription_keeps_its_backlog_while_no_consumer_is_connected(client, topic):
    """The initial position applies only when the subscription is created."""
    producer = client.create_producer(topic)
    client.subscribe(topic, "durable", initial_position=Latest).close()
    send_all_async(producer, contents("while-away", 4))
    again = client.subscribe(topic, "durable", initial_position=Latest)
    assert payloads(receive_n(again, 4)) == contents("while-away", 4)
    assert_no_more(again)


# ------------------------------------------------------------------ readers


def test_reader_from_earliest_reads_everything(client, topic):
    producer = client.create_producer(topic)
    send_all_async(producer, contents("m", 10))
    reader = client.create_reader(topic, pulsar.MessageId.earliest)
    assert payloads(receive_n(reader, 10)) == contents("m", 10)
    assert_no_more(reader)


def test_reader_from_latest_reads_only_new_messages(client, topic):
    producer = client.create_producer(topic)
    send_all_async(producer, contents("old", 5))
    reader = client.create_reader(topic, pulsar.MessageId.latest)
    send_all_async(producer, contents("new", 3))
    assert payloads(receive_n(reader, 3)) == contents("new", 3)
    assert_no_more(reader)


@pytest.mark.parametrize("batching", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("inclusive", [False, True], ids=["exclusive", "inclusive"])
def test_reader_from_a_message_id(client, topic, inclusive, batching):
    producer = client.create_producer(
        topic,
        batching_enabled=batching,
        batching_max_messages=5,
        batching_max_publish_delay_ms=1000,
    )
    sent = contents("m", 10)
    ids = send_all_async(producer, sent)
    if batching:
        assert ids[6].batch_index() == 1, f"expected batches of five, got id {ids[6]}"

    reader = client.create_reader(topic, ids[6], start_message_id_inclusive=inclusive)
    first = 6 if inclusive else 7
    assert payloads(receive_n(reader, 10 - first)) == sent[first:]
    assert_no_more(reader)


def test_reader_from_latest_inclusive_reads_the_last_message(client, topic):
    producer = client.create_producer(topic)
    send_all_async(producer, contents("m", 5))
    reader = client.create_reader(topic, pulsar.MessageId.latest, start_message_id_inclusive=True)
    # The client resolves "latest, inclusive" with GET_LAST_MESSAGE_ID and a seek to that id.
    assert reader.has_message_available()
    assert reader.read_next(timeout_millis=15_000).data() == b"m4"
    assert not reader.has_message_available()


def test_has_message_available_follows_the_topic(client, topic):
    reader = client.create_reader(topic, pulsar.MessageId.earliest)
    assert not reader.has_message_available(), "an empty topic has nothing to read"

    producer = client.create_producer(topic)
    send_all_async(producer, contents("m", 2))
    assert reader.has_message_available()
    assert payloads(receive_n(reader, 2)) == contents("m", 2)
    assert not reader.has_message_available()

    producer.send(b"m2")
    assert reader.has_message_available()
    assert receive_one(reader).data() == b"m2"
    assert not reader.has_message_available()


def test_has_message_available_on_a_reader_from_a_message_id(client, topic):
    producer = client.create_producer(topic)
    ids = send_all_async(producer, contents("m", 3))
    at_last = client.create_reader(topic, ids[2])
    assert not at_last.has_message_available(), "nothing follows the last message"
    before_last = client.create_reader(topic, ids[1])
    assert before_last.has_message_available()
    assert receive_one(before_last).data() == b"m2"


def test_get_last_message_id_is_the_last_stored_message(client, topic):
    consumer = client.subscribe(topic, "last-id")
    empty = consumer.get_last_message_id()
    assert empty.entry_id() < 0, f"an empty topic has no last entry, got {empty}"

    producer = client.create_producer(topic)
    ids = send_all_async(producer, contents("m", 3))
    last = consumer.get_last_message_id()
    assert (last.ledger_id(), last.entry_id()) == (ids[2].ledger_id(), ids[2].entry_id())

    fourth = producer.send(b"m3")
    last = consumer.get_last_message_id()
    assert (last.ledger_id(), last.entry_id()) == (fourth.ledger_id(), fourth.entry_id())
