"""Bad input at the socket level: the offending connection is closed (or refused), the broker
keeps serving everybody else.

These tests speak raw frames (pulsar_frames.py) because the official client never sends such
bytes. Each test has its own broker; ERROR lines about the bad input are tolerated, panics are
not (see conftest.py).
"""

import struct

import pulsar
import pytest

import pulsar_frames as frames
from helpers import receive_one, unique_topic

pytestmark = pytest.mark.allow_broker_errors()


@pytest.fixture
def broker(broker_factory):
    return broker_factory.start()


@pytest.fixture
def bystander(broker):
    """A healthy raw connection opened before the bad input; it must stay usable."""
    connection = frames.RawConnection(broker.broker_port)
    connection.handshake()
    yield connection
    connection.close()


def assert_broker_still_serves(broker, client_factory, bystander):
    bystander.ping()
    assert broker.health_status() == 200
    client = client_factory(broker)
    topic = unique_topic("still-serving")
    consumer = client.subscribe(topic, "after", initial_position=pulsar.InitialPosition.Earliest)
    client.create_producer(topic).send(b"still here")
    assert receive_one(consumer).data() == b"still here"


GARBAGE = {
    # An HTTP request on the binary port: "GET " read as a frame size is about 1.2 GB.
    "http-request": b"GET /admin/v2/brokers/health HTTP/1.1\r\nHost: x\r\n\r\n",
    # A well-framed command whose protobuf does not parse.
    "undecodable-command": struct.pack(">II", 12, 8) + b"\xff" * 8,
    # A command size larger than the frame that is supposed to contain it.
    "command-larger-than-frame": struct.pack(">II", 8, 1000) + b"\x08\x02\x12\x00",
    # A frame too short to hold even a command size.
    "frame-smaller-than-command-size": struct.pack(">I", 2) + b"\x00\x00",
}


@pytest.mark.parametrize("garbage", list(GARBAGE))
def test_garbage_closes_that_connection_only(broker, bystander, client_factory, garbage):
    with frames.RawConnection(broker.broker_port) as connection:
        connection.send(GARBAGE[garbage])
        replies = connection.frames_until_closed()
    assert all(f.command_type not in (frames.CONNECTED, frames.PONG) for f in replies), (
        f"the broker answered garbage with {[f.name for f in replies]}"
    )
    assert_broker_still_serves(broker, client_factory, bystander)


def test_garbage_after_a_handshake_closes_that_connection_only(broker, bystander, client_factory):
    with frames.RawConnection(broker.broker_port) as connection:
        connection.handshake()
        connection.send(GARBAGE["undecodable-command"])
        connection.frames_until_closed()
    assert_broker_still_serves(broker, client_factory, bystander)


def test_client_vanishing_in_the_middle_of_a_frame(broker, bystander, client_factory):
    with frames.RawConnection(broker.broker_port) as connection:
        connection.handshake()
        whole = frames.ping_frame()
        connection.send(struct.pack(">I", 1000) + whole[4:])  # announces more than it sends
    assert_broker_still_serves(broker, client_factory, bystander)


def test_oversized_frame_closes_that_connection(broker, bystander, client_factory):
    oversized = frames.MAX_FRAME_SIZE + 1  # total_size alone exceeds 5 MiB + 11 KiB
    with frames.RawConnection(broker.broker_port) as connection:
        connection.handshake()
        header = struct.pack(">II", oversized, 64)
        try:
            connection.send(header)
            chunk = b"\x00" * 65536
            remaining = oversized - 4
            while remaining > 0:
                connection.send(chunk[: min(len(chunk), remaining)])
                remaining -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: that is the expected outcome
        except TimeoutError:
            pass  # the broker stopped reading; whether it closed is checked below
        connection.frames_until_closed()
    assert_broker_still_serves(broker, client_factory, bystander)


@pytest.mark.parametrize("command", ["ping", "lookup"])
def test_a_command_before_connect_is_refused(broker, bystander, client_factory, command):
    first = (
        frames.ping_frame()
        if command == "ping"
        else frames.lookup_frame(unique_topic("before-connect"), request_id=1)
    )
    with frames.RawConnection(broker.broker_port) as connection:
        connection.send(first)
        replies = connection.frames_until_closed()
    assert all(f.command_type in (frames.ERROR,) for f in replies), (
        f"a {command} before CONNECT was served: {[f.name for f in replies]}"
    )
    assert_broker_still_serves(broker, client_factory, bystander)


INVALID_TOPIC_NAMES = [
    "persistent://public/default",  # no local name
    "persistent://public/default/",  # empty local name
    "persistent://bad tenant!/default/topic",  # tenant outside [A-Za-z0-9_-=:.]
    "persistent://public/bad namespace!/topic",
    "bogus://public/default/topic",  # unknown domain
]


@pytest.mark.parametrize("name", INVALID_TOPIC_NAMES)
def test_invalid_topic_name_is_refused_and_the_connection_stays_usable(
    broker, bystander, client_factory, name
):
    """PARTITIONED_METADATA and LOOKUP for an invalid name fail with InvalidTopicName.

    This speaks the protocol itself because pulsar-client validates tenant, namespace and domain
    before sending anything: through the client these names raise pulsar.InvalidTopicName
    without reaching the broker, which would test nothing of the broker.
    """
    with frames.RawConnection(broker.broker_port) as connection:
        connection.handshake()

        connection.send(frames.partitioned_metadata_frame(name, request_id=11))
        reply = connection.reply()
        assert reply is not None, "the broker closed the connection over an invalid topic name"
        if reply.command_type == frames.PARTITIONED_METADATA_RESPONSE:
            assert reply.first(2) == 11
            assert reply.first(3) == frames.PARTITIONED_METADATA_FAILED
            assert reply.first(4) == frames.SERVER_ERROR_INVALID_TOPIC_NAME
        else:
            assert reply.command_type == frames.ERROR, f"unexpected reply {reply.name}"
            assert (reply.first(1), reply.first(2)) == (11, frames.SERVER_ERROR_INVALID_TOPIC_NAME)

        connection.send(frames.lookup_frame(name, request_id=12))
        reply = connection.reply()
        assert reply is not None, "the broker closed the connection over an invalid topic name"
        if reply.command_type == frames.LOOKUP_RESPONSE:
            assert reply.first(4) == 12
            assert reply.first(3) == frames.LOOKUP_FAILED
            assert reply.first(6) == frames.SERVER_ERROR_INVALID_TOPIC_NAME
        else:
            assert reply.command_type == frames.ERROR, f"unexpected reply {reply.name}"
            assert (reply.first(1), reply.first(2)) == (12, frames.SERVER_ERROR_INVALID_TOPIC_NAME)

        connection.ping()  # the same connection still works
    assert_broker_still_serves(broker, client_factory, bystander)

