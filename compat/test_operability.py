"""Failures an operator must see: a topic whose log cannot be opened.

The official client must get the broker's error at once (not its operation timeout), and the
broker must log the failure once at ERROR, count it in /metrics and list the topic in the
health check's details.
"""

import json
import re
import urllib.request

import pulsar
import pytest

from helpers import corrupt_segments, unique_topic, wait_until
import pulsar_frames as frames

Earliest = pulsar.InitialPosition.Earliest
NOT_ALLOWED_ERROR = 22


def get(broker, path):
    with urllib.request.urlopen(broker.web_url + path, timeout=20) as response:
        return response.status, response.read().decode()


def get_error(broker, path):
    try:
        return get(broker, path)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric(broker, name, labels=""):
    _, text = get(broker, "/metrics")
    for line in text.splitlines():
        if line.startswith(name + "{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} with {labels} not in /metrics")


@pytest.mark.allow_broker_errors(r"topic cannot be loaded")
def test_unloadable_topic_fails_clients_at_once_and_is_reported(broker_factory, client_factory):
    broker = broker_factory.start()
    topic = unique_topic("unloadable")
    client = client_factory(broker)
    producer = client.create_producer(topic)
    producer.send(b"before")
    client.close()
    broker.stop()
    assert corrupt_segments(broker.data_dir, topic.rsplit("/", 1)[1]) > 0
    broker.start()

    client = client_factory(broker)
    for attempt in range(3):
        with pytest.raises(pulsar.PulsarException) as raised:
            client.subscribe(topic, "sub", initial_position=Earliest)
        # NotAllowedError: the client gives up at once; a retried code would end in Timeout.
        assert isinstance(raised.value, pulsar.NotAllowedError), repr(raised.value)
        with pytest.raises(pulsar.NotAllowedError):
            client.create_producer(topic)

    # The reason travels with the code (the C++ client logs it; the Python exception carries
    # only the code), here read from the ERROR frame itself.
    with frames.RawConnection(broker.broker_port) as connection:
        connection.handshake()
        reply = connection.request(frames.producer_frame(topic, 1, 7), frames.ERROR)
        assert reply.first(2) == NOT_ALLOWED_ERROR, reply.body
        message = reply.first(3).decode()
        assert topic in message and "cannot be opened: corrupted data" in message, message

    # Logged once at ERROR with the topic and the cause, however often clients retried.
    error_lines = [
        line
        for line in broker.log_text().splitlines()
        if " ERROR " in line and "topic cannot be loaded" in line
    ]
    assert len(error_lines) == 1, error_lines
    assert topic in error_lines[0] and "corrupt" in error_lines[0].lower(), error_lines[0]

    assert metric(broker, "meridian_topic_load_failures_total") == 1
    assert metric(broker, "meridian_unavailable_topics", 'kind="loadFailed"') == 1

    status, text = get(broker, "/admin/v2/brokers/health")
    assert (status, text) == (200, "ok")  # pulsar-admin's healthcheck still passes
    status, text = get(broker, "/admin/v2/brokers/health?details=true")
    details = json.loads(text)
    assert details["status"] == "degraded"
    [failure] = details["unavailableTopics"]
    assert failure["topic"] == topic and failure["kind"] == "loadFailed"
    assert "cannot be opened" in failure["reason"]

    # Topic stats answer with the reason instead of a bare 500.
    path = "/admin/v2/persistent/" + topic.split("://", 1)[1] + "/stats"
    status, text = get_error(broker, path)
    assert status == 500 and "cannot be opened" in json.loads(text)["reason"], (status, text)

    # Deleting the broken topic clears it; the name serves again (a new, empty topic).
    topic_path = "/admin/v2/persistent/" + topic.split("://", 1)[1]
    request = urllib.request.Request(broker.web_url + topic_path, method="DELETE")
    with urllib.request.urlopen(request, timeout=20) as response:
        assert response.status in (200, 204)
    details = json.loads(get(broker, "/admin/v2/brokers/health?details=true")[1])
    assert details["status"] == "ok" and details["unavailableTopics"] == []
    assert metric(broker, "meridian_unavailable_topics", 'kind="loadFailed"') == 0
    client.create_producer(topic).send(b"after")


# ------------------------------------------------------------------ pulsar-admin's brokers API


def test_brokers_endpoints_have_pulsars_shapes(broker, client):
    web_address = broker.web_url.split("://", 1)[1]
    status, text = get(broker, "/admin/v2/brokers/standalone")
    assert (status, json.loads(text)) == (200, [web_address])
    assert json.loads(get(broker, "/admin/v2/brokers")[1]) == [web_address]
    assert get_error(broker, "/admin/v2/brokers/no-such-cluster")[0] == 404
    assert get(broker, "/admin/v2/brokers/ready") == (200, "ok")
    assert get(broker, "/admin/v2/brokers/health") == (200, "ok")
    assert get(broker, "/status.html") == (200, "OK")
    status, text = get(broker, "/admin/v2/brokers/version")
    assert status == 200 and re.fullmatch(r"\d+\.\d+\.\d+.*", text), text
    leader = json.loads(get(broker, "/admin/v2/brokers/leaderBroker")[1])
    assert leader == {"brokerId": web_address, "serviceUrl": broker.web_url}
    # No setting of Meridian changes at runtime: no dynamic configuration.
    assert json.loads(get(broker, "/admin/v2/brokers/configuration")[1]) == []
    assert json.loads(get(broker, "/admin/v2/brokers/configuration/values")[1]) == {}
    runtime = json.loads(get(broker, "/admin/v2/brokers/configuration/runtime")[1])
    assert runtime["web_port"] == str(broker.web_port)
    assert runtime["cluster_name"] == "standalone"
    assert "storage.segment_max_bytes" in runtime
    assert all(isinstance(value, str) for value in runtime.values())

    topic = unique_topic("broker-stats")
    producer = client.create_producer(topic)
    producer.send(b"one")
    stats = json.loads(get(broker, "/admin/v2/broker-stats/topics")[1])
    topic_stats = stats["public/default"]["0x00000000_0xffffffff"]["persistent"][topic]
    assert topic_stats["msgInCounter"] == 1
    assert [publisher["producerName"] for publisher in topic_stats["publishers"]] == [producer.producer_name()]


# ------------------------------------------------------------------ other ways to meet a broken log


def admin_put(broker, path, body):
    request = urllib.request.Request(
        broker.web_url + path, data=body.encode(), method="PUT", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=20) as response:
        return response.status


@pytest.mark.allow_broker_errors(r"topic cannot be loaded")
def test_reader_partition_and_pattern_consumer_meet_an_unloadable_log_at_once(broker_factory, client_factory):
    broker = broker_factory.start()
    single = unique_topic("unloadable-reader")
    partitioned = unique_topic("unloadable-parts")
    admin_put(broker, "/admin/v2/persistent/" + partitioned.split("://", 1)[1] + "/partitions", "2")
    client = client_factory(broker)
    for name in (single, partitioned):
        producer = client.create_producer(name)
        for index in range(4):
            producer.send(b"m%d" % index)
    client.close()
    broker.stop()
    assert corrupt_segments(broker.data_dir, single.rsplit("/", 1)[1]) > 0
    broken_partition = partitioned + "-partition-1"
    assert corrupt_segments(broker.data_dir, broken_partition.rsplit("/", 1)[1]) > 0
    broker.start()

    client = client_factory(broker)
    # A reader (a non-durable subscription) gets the error, not its operation timeout.
    with pytest.raises(pulsar.NotAllowedError):
        client.create_reader(single, pulsar.MessageId.earliest)
    # A partitioned topic with one broken partition: producer and consumer fail at once.
    with pytest.raises(pulsar.NotAllowedError):
        client.create_producer(partitioned)
    with pytest.raises(pulsar.NotAllowedError):
        client.subscribe(partitioned, "sub", initial_position=Earliest)
    # A consumer on a pattern matching the broken topic.
    pattern = re.compile(re.escape(single))
    with pytest.raises(pulsar.NotAllowedError):
        client.subscribe(pattern, "pattern-sub", initial_position=Earliest)

    details = json.loads(get(broker, "/admin/v2/brokers/health?details=true")[1])
    assert sorted(failure["topic"] for failure in details["unavailableTopics"]) == sorted([single, broken_partition])
    for name in (single, broken_partition):
        lines = [
            line
            for line in broker.log_text().splitlines()
            if " ERROR " in line and "topic cannot be loaded" in line and f'topic="{name}"' in line
        ]
        assert len(lines) == 1, (name, lines)
    # The partitioned topic's stats name the broken partition instead of a bare failure.
    path = "/admin/v2/persistent/" + partitioned.split("://", 1)[1] + "/partitioned-stats"
    status, text = get_error(broker, path)
    assert status == 500 and broken_partition in text, (status, text)


@pytest.mark.allow_broker_errors(r"topic log poisoned")
def test_corruption_found_by_a_read_of_a_loaded_topic_is_reported_once(broker_factory, client_factory, monkeypatch):
    # Debug lines of the dispatcher show its retries meeting the broken log.
    monkeypatch.setenv("RUST_LOG", "info,meridian_broker::subscription=debug")
    broker = broker_factory.start()
    topic = unique_topic("rot")
    local = topic.rsplit("/", 1)[1]
    # Two segments: the broker seals the first at a restart and opens the second.
    for batch in (b"first", b"second"):
        client = client_factory(broker)
        producer = client.create_producer(topic, batching_enabled=False)
        for index in range(5):
            producer.send(b"%s-%d" % (batch, index))
        client.close()
        broker.restart()
    client = client_factory(broker)
    client.create_producer(topic, batching_enabled=False)  # the topic is loaded, intact
    # Bit rot in the sealed segment while the broker runs: found by the next read of it.
    [directory] = [path for path in (broker.data_dir / "storage" / "logs").iterdir() if local in path.name]
    first_segment = sorted(directory.glob("*.segment"))[0]
    data = bytearray(first_segment.read_bytes())
    data[data.index(b"first-3")] ^= 0xFF
    first_segment.write_bytes(bytes(data))

    consumer = client.subscribe(topic, "reader", initial_position=Earliest)
    with pytest.raises(pulsar.Timeout):
        consumer.receive(500)  # nothing readable beyond the damage, and no crash

    def listed():
        details = json.loads(get(broker, "/admin/v2/brokers/health?details=true")[1])
        return [failure for failure in details["unavailableTopics"] if failure["topic"] == topic]

    wait_until(lambda: listed(), "the topic is listed in the health details")
    [failure] = listed()
    assert failure["kind"] == "poisoned" and "corrupted data" in failure["reason"], failure
    # New producers and consumers get the reason at once.
    with pytest.raises(pulsar.NotAllowedError):
        client.create_producer(topic)
    with pytest.raises(pulsar.NotAllowedError):
        client.subscribe(topic, "late", initial_position=Earliest)
    assert metric(broker, "meridian_unavailable_topics", 'kind="poisoned"') == 1

    # The dispatcher keeps meeting it; the ERROR log says it once.
    wait_until(
        lambda: broker.log_text().count("dispatch read refused") >= 3, "the dispatcher retried the broken log"
    )
    error_lines = [line for line in broker.log_text().splitlines() if " ERROR " in line and local in line]
    assert len(error_lines) == 1 and "topic log poisoned" in error_lines[0], error_lines
