"""Batch-index acknowledgements (`acknowledgment_at_batch_index_level_enabled`, Pulsar's
`acknowledgmentAtBatchIndexLevelEnabled`), observed through the official client with
`batch_index_ack_enabled=True`: acknowledging some messages of a batch is kept with the cursor,
so after a restart (or a redelivery) only the others come back.

Each test starts its own broker, because it restarts it.
"""

import pulsar

from helpers import assert_no_more, payloads, receive_n, unique_topic

ENABLED = {"acknowledgment_at_batch_index_level_enabled": True}


def produce_one_batch(client, topic: str, count: int) -> list:
    producer = client.create_producer(
        topic,
        batching_enabled=True,
        batching_max_messages=count,
        batching_max_publish_delay_ms=10_000,
    )
    sent = [f"m{index}".encode() for index in range(count)]
    for payload in sent:
        producer.send_async(payload, None)
    producer.flush()
    producer.close()
    return sent


def subscribe(client, topic: str, consumer_type=pulsar.ConsumerType.Shared):
    return client.subscribe(
        topic,
        "billing",
        consumer_type=consumer_type,
        batch_index_ack_enabled=True,
    )


def test_half_a_batch_acknowledged_survives_a_restart(broker_factory, client_factory):
    broker = broker_factory.start(config=ENABLED)
    topic = unique_topic("batch-index")
    client = client_factory(broker)
    consumer = subscribe(client, topic)
    produce_one_batch(client, topic, 10)
    received = receive_n(consumer, 10)
    assert len({message.message_id().entry_id() for message in received}) == 1, "one batch"
    left = []
    for message in received:
        if int(message.data()[1:]) % 2 == 0:
            consumer.acknowledge(message)
        else:
            left.append(message.data())
    client.close()  # flushes the acknowledgements

    broker.restart()

    client = client_factory(broker)
    consumer = subscribe(client, topic)
    assert payloads(receive_n(consumer, len(left))) == left
    assert_no_more(consumer, what="acknowledged messages of the batch must not come back")


def test_a_cumulative_acknowledgement_inside_a_batch(broker_factory, client_factory):
    broker = broker_factory.start(config=ENABLED)
    topic = unique_topic("batch-cumulative")
    client = client_factory(broker)
    consumer = subscribe(client, topic, pulsar.ConsumerType.Exclusive)
    sent = produce_one_batch(client, topic, 6)
    received = receive_n(consumer, 6)
    consumer.acknowledge_cumulative(received[2])
    client.close()

    broker.restart()

    client = client_factory(broker)
    consumer = subscribe(client, topic, pulsar.ConsumerType.Exclusive)
    assert payloads(receive_n(consumer, 3)) == sent[3:]
    assert_no_more(consumer, what="messages up to the cumulative acknowledgement")
