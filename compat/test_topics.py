"""Topics with the default configuration: auto-creation, regex subscriptions, unsubscribe,
and names that merely look like partitions."""

import re

import _pulsar
import pulsar
import pytest

from helpers import (
    RECEIVE_TIMEOUT_MS,
    assert_no_more,
    payloads,
    receive_n,
    receive_one,
    send_all_async,
    unique,
    unique_topic,
)

Earliest = pulsar.InitialPosition.Earliest
Latest = pulsar.InitialPosition.Latest


def test_topics_are_created_on_first_use(client):
    topic = unique_topic("never-seen")
    producer = client.create_producer(topic)
    producer.send(b"creates the topic")
    reader = client.create_reader(topic, pulsar.MessageId.earliest)
    assert receive_one(reader).data() == b"creates the topic"


def test_short_topic_names_mean_public_default(client):
    local = unique("short-name")
    client.create_producer(local).send(b"short")
    reader = client.create_reader(f"persistent://public/default/{local}", pulsar.MessageId.earliest)
    assert receive_one(reader).data() == b"short"


def test_a_plain_topic_reports_no_partitions(client, topic):
    client.create_producer(topic).send(b"x")
    assert client.get_topic_partitions(topic) == [topic]


def test_partition_like_names_are_ordinary_topics(client):
    """`...-partition-N` names are plain topics when no partitioned metadata exists."""
    base = unique_topic("looks-partitioned")
    name = f"{base}-partition-1"
    client.create_producer(name).send(b"in a plain topic")
    reader = client.create_reader(name, pulsar.MessageId.earliest)
    assert receive_one(reader).data() == b"in a plain topic"
    assert client.get_topic_partitions(name) == [name]


# ------------------------------------------------------------------ regex subscriptions


def test_regex_subscription_receives_from_matching_topics_only(client):
    prefix = unique("rx")
    matching = [f"persistent://public/default/{prefix}-{i}" for i in range(3)]
    other = f"persistent://public/default/{unique('not-rx')}"
    for name in matching + [other]:
        client.create_producer(name).send(f"hello from {name}".encode())

    consumer = client.subscribe(
        re.compile(f"persistent://public/default/{prefix}-.*"),
        "regex",
        initial_position=Earliest,
    )
    received = receive_n(consumer, 3)
    assert sorted(m.topic_name() for m in received) == sorted(matching)
    assert sorted(payloads(received)) == sorted(f"hello from {n}".encode() for n in matching)
    assert_no_more(consumer, what=f"{other} does not match the pattern")


def test_regex_subscription_picks_up_a_topic_created_later(client):
    """The client re-lists the namespace (GET_TOPICS_OF_NAMESPACE) and subscribes to new matches.

    pulsar-client 3.13's Python wrapper accepts `pattern_auto_discovery_period` but never hands
    it to the C++ consumer (whose default is 60 s), so this test builds the consumer through the
    package's own binding, `_pulsar`, to rediscover every second.
    """
    prefix = unique("rx-later")
    first = f"persistent://public/default/{prefix}-first"
    client.create_producer(first).send(b"first")
    configuration = _pulsar.ConsumerConfiguration()
    configuration.subscription_initial_position(Earliest)
    configuration.pattern_auto_discovery_period(1)
    consumer = client._client.subscribe_pattern(
        f"persistent://public/default/{prefix}-.*", "regex", configuration
    )
    try:
        assert consumer.receive(RECEIVE_TIMEOUT_MS).data() == b"first"
        later = f"persistent://public/default/{prefix}-later"
        client.create_producer(later).send(b"later")
        message = consumer.receive(RECEIVE_TIMEOUT_MS)
        assert (message.data(), message.topic_name()) == (b"later", later)
    finally:
        consumer.close()


# ------------------------------------------------------------------ unsubscribe


def test_unsubscribe_drops_the_backlog(client, topic):
    producer = client.create_producer(topic)
    consumer = client.subscribe(topic, "gone", initial_position=Latest)
    send_all_async(producer, [b"old0", b"old1", b"old2"])
    receive_n(consumer, 1)  # received, never acknowledged
    consumer.unsubscribe()
    send_all_async(producer, [b"between"])

    again = client.subscribe(topic, "gone", initial_position=Latest)
    send_all_async(producer, [b"new0", b"new1"])
    assert payloads(receive_n(again, 2)) == [b"new0", b"new1"]
    assert_no_more(again, what="the old subscription's backlog must be gone")


def test_unsubscribe_with_another_consumer_attached_is_refused(client, topic):
    first = client.subscribe(topic, "busy", consumer_type=pulsar.ConsumerType.Shared)
    client.subscribe(topic, "busy", consumer_type=pulsar.ConsumerType.Shared)
    with pytest.raises(pulsar.ConsumerBusy):
        first.unsubscribe()


# ------------------------------------------------------------------ auto-creation switched off


@pytest.mark.parametrize("role", ["producer", "consumer"])
def test_unknown_topic_is_not_found_when_auto_creation_is_off(broker_factory, client_factory, role):
    broker = broker_factory.start(config={"allow_auto_topic_creation": False})
    client = client_factory(broker)
    topic = unique_topic("unknown")
    with pytest.raises(pulsar.TopicNotFound):
        if role == "producer":
            client.create_producer(topic)
        else:
            client.subscribe(topic, "sub")
