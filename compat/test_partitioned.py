"""Partitioned topics, on a broker that auto-creates new topics as partitioned with 3 partitions
(`allow_auto_topic_creation_type = "partitioned"`, `default_num_partitions = 3`)."""

import pulsar
import pytest

from helpers import (
    assert_no_more,
    receive_n,
    SendTracker,
    wait_until,
)

PARTITIONS = 3


@pytest.fixture(scope="module")
def broker(module_brokers):
    return module_brokers.start(
        config={
            "allow_auto_topic_creation_type": "partitioned",
            "default_num_partitions": PARTITIONS,
        }
    )


def partition_index(topic_name: str) -> int:
    return int(topic_name.rsplit("-partition-", 1)[1])


def send_tracked(producer, items):
    """items: (content, partition_key or None); returns the message ids in send order."""
    tracker = SendTracker()
    for index, (content, key) in enumerate(items):
        kwargs = {"partition_key": key} if key else {}
        producer.send_async(content, tracker.callback(index), **kwargs)
    producer.flush()
    wait_until(lambda: tracker.settled_count() == len(items), "all sends settled")
    assert not tracker.failed, f"sends failed: {tracker.failed}"
    return [tracker.acked[i] for i in range(len(items))]


def test_new_topic_is_created_with_the_default_partitions(client, topic):
    client.create_producer(topic).send(b"creates it")
    assert client.get_topic_partitions(topic) == [
        f"{topic}-partition-{i}" for i in range(PARTITIONS)
    ]


def test_messages_with_a_key_stay_in_one_partition_in_order(client, topic):
    keys = [f"key{i}" for i in range(30)]
    rounds = 5
    consumer = client.subscribe(topic, "by-key", initial_position=pulsar.InitialPosition.Earliest)
    producer = client.create_producer(topic)
    items = [(f"{key}:{r}".encode(), key) for r in range(rounds) for key in keys]
    ids = send_tracked(producer, items)

    received = receive_n(consumer, len(items))
    partitions_of_key: dict[str, set] = {}
    order_of_key: dict[str, list[int]] = {}
    for message in received:
        key, sequence = message.data().decode().split(":")
        assert message.partition_key() == key
        partitions_of_key.setdefault(key, set()).add(partition_index(message.topic_name()))
        order_of_key.setdefault(key, []).append(int(sequence))
    split_keys = {k: p for k, p in partitions_of_key.items() if len(p) > 1}
    assert not split_keys, f"keys routed to several partitions: {split_keys}"
    for key, sequences in order_of_key.items():
        assert sequences == list(range(rounds)), f"order of key {key} broken: {sequences}"
    used = set().union(*partitions_of_key.values())
    assert used == set(range(PARTITIONS)), f"30 keys all hashed into partitions {used}"
    # The send receipts name the same partitions the consumer saw.
    assert {mid.partition() for mid in ids} == used
    assert_no_more(consumer)


def test_consumer_of_a_partitioned_topic_receives_every_partition(client, topic):
    count = 30
    consumer = client.subscribe(topic, "all", initial_position=pulsar.InitialPosition.Earliest)
    producer = client.create_producer(
        topic, message_routing_mode=pulsar.PartitionsRoutingMode.RoundRobinDistribution
    )
    send_tracked(producer, [(f"m{i}".encode(), None) for i in range(count)])

    received = receive_n(consumer, count)
    assert sorted(m.data() for m in received) == sorted(f"m{i}".encode() for i in range(count))
    partitions = {partition_index(m.topic_name()) for m in received}
    assert partitions == set(range(PARTITIONS)), f"round-robin used only partitions {partitions}"
    assert_no_more(consumer)


def test_each_partition_is_a_topic_of_its_own(client, topic):
    client.create_producer(topic)  # creates the partitioned topic
    for index in range(PARTITIONS):
        partition = f"{topic}-partition-{index}"
        # A partition name is never itself made partitioned (Pulsar skips auto-creation of
        # partitioned metadata for `-partition-N` names).
        assert client.get_topic_partitions(partition) == [partition]
        client.create_producer(partition).send(f"direct to {index}".encode())

    consumer = client.subscribe(topic, "all", initial_position=pulsar.InitialPosition.Earliest)
    received = receive_n(consumer, PARTITIONS)
    assert sorted((partition_index(m.topic_name()), m.data()) for m in received) == [
        (i, f"direct to {i}".encode()) for i in range(PARTITIONS)
    ]
    for index in range(PARTITIONS):
        reader = client.create_reader(f"{topic}-partition-{index}", pulsar.MessageId.earliest)
        assert receive_n(reader, 1)[0].data() == f"direct to {index}".encode()
        assert_no_more(reader)
