"""Schemas: String, JSON and Avro round trips, and an incompatible schema refused as Pulsar does.

Pulsar's default compatibility check refuses a producer or consumer whose schema *type* differs
from the schema the topic already has (IncompatibleSchema). The registry gives every stored
schema a version; messages carry it, and the Avro consumer of pulsar-client fetches the writer
schema by that version (GET_SCHEMA).
"""

import pulsar
import pytest
from pulsar.schema import (
    Array,
    AvroSchema,
    Double,
    Integer,
    JsonSchema,
    Record,
    String,
    StringSchema,
)

from helpers import assert_no_more, receive_n

Earliest = pulsar.InitialPosition.Earliest


def schema_version(message) -> int:
    """The message's schema version as the registry's 8-byte big-endian number (-1 if none).

    pulsar.Message exposes it only as text; the wrapped _pulsar.Message has the number, which
    is what pulsar-client's own AvroSchema uses to fetch the writer schema.
    """
    return message._message.int_schema_version()


class Reading(Record):
    sensor = String()
    value = Double()
    count = Integer()
    tags = Array(String())


def readings() -> list[Reading]:
    return [
        Reading(sensor="thermo-ü", value=21.5, count=1, tags=["a", "b"]),
        Reading(sensor="baro", value=-0.25, count=2, tags=[]),
    ]


def as_tuple(reading: Reading) -> tuple:
    return (reading.sensor, reading.value, reading.count, list(reading.tags))


def test_string_schema_round_trip(client, topic):
    consumer = client.subscribe(topic, "strings", schema=StringSchema(), initial_position=Earliest)
    producer = client.create_producer(topic, schema=StringSchema())
    texts = ["plain", "ünïcödé ✓", ""]
    for text in texts:
        producer.send(text)
    assert [m.value() for m in receive_n(consumer, len(texts))] == texts
    assert_no_more(consumer)


@pytest.mark.parametrize("schema_class", [JsonSchema, AvroSchema], ids=["json", "avro"])
def test_record_schema_round_trip(client, topic, schema_class):
    consumer = client.subscribe(
        topic, "records", schema=schema_class(Reading), initial_position=Earliest
    )
    producer = client.create_producer(topic, schema=schema_class(Reading))
    for reading in readings():
        producer.send(reading)

    received = receive_n(consumer, 2)
    assert [as_tuple(m.value()) for m in received] == [as_tuple(r) for r in readings()]
    versions = {schema_version(m) for m in received}
    assert len(versions) == 1 and min(versions) >= 0, (
        f"messages must carry the schema version the broker assigned, got {versions}"
    )
    assert_no_more(consumer)


def test_same_schema_again_gets_the_same_version(client, topic):
    consumer = client.subscribe(
        topic, "records", schema=JsonSchema(Reading), initial_position=Earliest
    )
    first = client.create_producer(topic, schema=JsonSchema(Reading))
    first.send(readings()[0])
    second = client.create_producer(topic, schema=JsonSchema(Reading))
    second.send(readings()[1])
    versions = [schema_version(m) for m in receive_n(consumer, 2)]
    assert versions[0] == versions[1] >= 0


def test_producer_with_an_incompatible_schema_is_refused(client, topic):
    json_producer = client.create_producer(topic, schema=JsonSchema(Reading))
    json_producer.send(readings()[0])
    with pytest.raises(pulsar.IncompatibleSchema):
        client.create_producer(topic, schema=StringSchema())
    json_producer.send(readings()[1])  # the registered schema is untouched


def test_consumer_with_an_incompatible_schema_is_refused(client, topic):
    client.create_producer(topic, schema=JsonSchema(Reading)).send(readings()[0])
    with pytest.raises(pulsar.IncompatibleSchema):
        client.subscribe(topic, "wrong-type", schema=StringSchema())
