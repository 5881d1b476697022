"""Hand-built Pulsar frames for the bad-input tests, which must not go through a client.

Numbers are those of Meridian's own protocol definition, crates/wire/proto/pulsar.proto
(identical to Apache Pulsar's PulsarApi.proto for everything used here):

- BaseCommand: `type` = field 1 (enum); `connect` = 2, `connected` = 3, `error` = 14,
  `ping` = 18, `pong` = 19, `partitioned_metadata` = 21, `partitioned_metadata_response` = 22,
  `lookup` = 23, `lookup_response` = 24.
- Type values: CONNECT 2, CONNECTED 3, ERROR 14, PING 18, PONG 19, PARTITIONED_METADATA 21,
  PARTITIONED_METADATA_RESPONSE 22, LOOKUP 23, LOOKUP_RESPONSE 24.
- CommandConnect: client_version 1 (string, required), protocol_version 4 (int32).
- CommandPartitionedTopicMetadata: topic 1, request_id 2.
  Response: partitions 1, request_id 2, response 3 (Success 0 / Failed 1), error 4, message 5.
- CommandLookupTopic: topic 1, request_id 2.
  Response: response 3 (Redirect 0 / Connect 1 / Failed 2), request_id 4, error 6, message 7.
- CommandError: request_id 1, error 2, message 3.
- ServerError.InvalidTopicName = 17, ServiceNotReady = 6.
- CommandSubscribe: topic 1, subscription 2, sub_type 3 (Exclusive 0, Shared 1, Failover 2,
  Key_Shared 3), consumer_id 4, request_id 5, consumer_name 6, initial_position 13 (Earliest 1).
- CommandFlow: consumer_id 1, message_permits 2. CommandAck: consumer_id 1, ack_type 2,
  message_id 3 (MessageIdData: ledger_id 1, entry_id 2).
- CommandProducer: topic 1, producer_id 2, request_id 3. CommandSend: producer_id 1,
  sequence_id 2, num_messages 3. CommandSendReceipt / CommandSendError: producer_id 1,
  sequence_id 2; SendError's error 3 and message 4.
- MessageMetadata: producer_name 1, sequence_id 2, publish_time 3, compression 8,
  uncompressed_size 9, num_messages_in_batch 11.

Framing (all sizes big-endian): a simple command is
`[u32 total_size][u32 command_size][BaseCommand]` with total_size = 4 + command_size; a SEND
adds `[u32 metadata_size][MessageMetadata][payload]` (the optional checksum block is left out).
The default frame limit is 5 MiB of message plus 10 KiB of padding.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Optional

# BaseCommand.Type values and the BaseCommand field that carries each command's body.
CONNECT = 2
CONNECTED = 3
SUBSCRIBE = 4
PRODUCER = 5
SEND = 6
SEND_RECEIPT = 7
SEND_ERROR = 8
MESSAGE = 9
ACK = 10
FLOW = 11
SUCCESS = 13
ERROR = 14
PRODUCER_SUCCESS = 17
ACTIVE_CONSUMER_CHANGE = 31
CLOSE_PRODUCER = 15
CLOSE_CONSUMER = 16
UNSOLICITED = (ACTIVE_CONSUMER_CHANGE, CLOSE_PRODUCER, CLOSE_CONSUMER)
PING = 18
PONG = 19
PARTITIONED_METADATA = 21
PARTITIONED_METADATA_RESPONSE = 22
LOOKUP = 23
LOOKUP_RESPONSE = 24

TYPE_NAMES = {
    CONNECT: "CONNECT",
    CONNECTED: "CONNECTED",
    SUBSCRIBE: "SUBSCRIBE",
    PRODUCER: "PRODUCER",
    SEND: "SEND",
    SEND_RECEIPT: "SEND_RECEIPT",
    SEND_ERROR: "SEND_ERROR",
    MESSAGE: "MESSAGE",
    ACK: "ACK",
    FLOW: "FLOW",
    SUCCESS: "SUCCESS",
    ERROR: "ERROR",
    PRODUCER_SUCCESS: "PRODUCER_SUCCESS",
    ACTIVE_CONSUMER_CHANGE: "ACTIVE_CONSUMER_CHANGE",
    PING: "PING",
    PONG: "PONG",
    PARTITIONED_METADATA: "PARTITIONED_METADATA",
    PARTITIONED_METADATA_RESPONSE: "PARTITIONED_METADATA_RESPONSE",
    LOOKUP: "LOOKUP",
    LOOKUP_RESPONSE: "LOOKUP_RESPONSE",
}

SERVER_ERROR_INVALID_TOPIC_NAME = 17
SERVER_ERROR_SERVICE_NOT_READY = 6
SERVER_ERROR_NOT_ALLOWED = 22

EXCLUSIVE, SHARED, FAILOVER, KEY_SHARED = 0, 1, 2, 3
PARTITIONED_METADATA_FAILED = 1
LOOKUP_FAILED = 2

MAX_MESSAGE_SIZE = 5 * 1024 * 1024
FRAME_PADDING = 10 * 1024
REPLICATION_METADATA_ALLOWANCE = 1024  # what geo-replication adds to an entry's metadata
MAX_FRAME_SIZE = MAX_MESSAGE_SIZE + FRAME_PADDING + REPLICATION_METADATA_ALLOWANCE

PROTOCOL_VERSION = 20  # what pulsar-client 3.x (C++ 3.x/4.x) announces


# ------------------------------------------------------------------ protobuf encoding


def varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int32/int64 negatives are ten-byte varints
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def field_bytes(number: int, data: bytes) -> bytes:
    return varint((number << 3) | 2) + varint(len(data)) + data


def field_string(number: int, text: str) -> bytes:
    return field_bytes(number, text.encode("utf-8"))


def base_command(command_type: int, body: bytes) -> bytes:
    """BaseCommand{type, <body in the field numbered like the type>}.

    For every command used here the body field number equals the type value.
    """
    return field_varint(1, command_type) + field_bytes(command_type, body)


def simple_frame(command: bytes) -> bytes:
    return struct.pack(">II", 4 + len(command), len(command)) + command


def connect_frame(client_version: str = "compat-raw-socket", protocol_version: int = PROTOCOL_VERSION) -> bytes:
    body = field_string(1, client_version) + field_varint(4, protocol_version)
    return simple_frame(base_command(CONNECT, body))


def ping_frame() -> bytes:
    return simple_frame(base_command(PING, b""))


def lookup_frame(topic: str, request_id: int) -> bytes:
    return simple_frame(base_command(LOOKUP, field_string(1, topic) + field_varint(2, request_id)))


def partitioned_metadata_frame(topic: str, request_id: int) -> bytes:
    body = field_string(1, topic) + field_varint(2, request_id)
    return simple_frame(base_command(PARTITIONED_METADATA, body))


def subscribe_frame(
    topic: str, subscription: str, consumer_id: int, request_id: int, sub_type: int = SHARED,
    consumer_name: str = "raw-consumer",
) -> bytes:
    body = (
        field_string(1, topic) + field_string(2, subscription) + field_varint(3, sub_type)
        + field_varint(4, consumer_id) + field_varint(5, request_id)
        + field_string(6, consumer_name) + field_varint(13, 1)
    )
    return simple_frame(base_command(SUBSCRIBE, body))


def flow_frame(consumer_id: int, permits: int) -> bytes:
    return simple_frame(base_command(FLOW, field_varint(1, consumer_id) + field_varint(2, permits)))


def ack_frame(consumer_id: int, positions: list[tuple[int, int]]) -> bytes:
    body = field_varint(1, consumer_id) + field_varint(2, 0)
    for ledger_id, entry_id in positions:
        body += field_bytes(3, field_varint(1, ledger_id) + field_varint(2, entry_id))
    return simple_frame(base_command(ACK, body))


def producer_frame(topic: str, producer_id: int, request_id: int) -> bytes:
    body = field_string(1, topic) + field_varint(2, producer_id) + field_varint(3, request_id)
    return simple_frame(base_command(PRODUCER, body))


def send_frame(
    producer_id: int, sequence_id: int, payload: bytes, producer_name: str = "raw-producer",
    num_messages: Optional[int] = None, metadata_fields: bytes = b"",
) -> bytes:
    """A SEND without checksum; `metadata_fields` are appended to the MessageMetadata."""
    command = field_varint(1, producer_id) + field_varint(2, sequence_id)
    if num_messages is not None:
        command += field_varint(3, num_messages)
    command = base_command(SEND, command)
    metadata = (
        field_string(1, producer_name) + field_varint(2, sequence_id)
        + field_varint(3, int(time.time() * 1000)) + metadata_fields
    )
    rest = struct.pack(">I", len(command)) + command + struct.pack(">I", len(metadata)) + metadata + payload
    return struct.pack(">I", len(rest)) + rest


# ------------------------------------------------------------------ protobuf decoding


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if offset >= len(data):
            raise ValueError("truncated varint")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def decode_fields(data: bytes) -> dict[int, list]:
    """Field number -> values (ints for varints, bytes for length-delimited)."""
    fields: dict[int, list] = {}
    offset = 0
    while offset < len(data):
        key, offset = _read_varint(data, offset)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, offset = _read_varint(data, offset)
        elif wire_type == 2:
            length, offset = _read_varint(data, offset)
            value = data[offset : offset + length]
            if len(value) != length:
                raise ValueError("truncated length-delimited field")
            offset += length
        elif wire_type == 1:
            value = data[offset : offset + 8]
            offset += 8
        elif wire_type == 5:
            value = data[offset : offset + 4]
            offset += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        fields.setdefault(number, []).append(value)
    return fields


@dataclass
class Frame:
    """A frame received from the broker: its type and the fields of its command body."""

    command_type: int
    body: dict[int, list] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return TYPE_NAMES.get(self.command_type, f"type {self.command_type}")

    def first(self, number: int, default=None):
        values = self.body.get(number)
        return values[0] if values else default


# ------------------------------------------------------------------ a raw connection


class RawConnection:
    """A plain TCP connection to the broker's binary port, speaking frames by hand."""

    def __init__(
        self, port: int, timeout_s: float = 10.0, receive_buffer: Optional[int] = None,
        source_address: str = "127.0.0.1",
    ):
        """`receive_buffer` shrinks the socket's receive buffer (before connecting), so that a
        client that stops reading stops the broker's writes soon; `source_address` connects
        from another loopback address (127.0.0.0/8)."""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(timeout_s)
        self.sock.bind((source_address, 0))
        self.sock.connect(("127.0.0.1", port))
        self.timeout_s = timeout_s
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        """Read more bytes; False when the peer closed the connection."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no frame from the broker before the deadline")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no frame from the broker before the deadline") from None
        except ConnectionResetError:
            return False
        if not chunk:
            return False
        self.buffer += chunk
        return True

    def read_frame(self, timeout_s: Optional[float] = None) -> Optional[Frame]:
        """The next frame, or None if the broker closed the connection first."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while len(self.buffer) < 4:
            if not self._fill(deadline):
                return None
        (total_size,) = struct.unpack(">I", self.buffer[:4])
        while len(self.buffer) < 4 + total_size:
            if not self._fill(deadline):
                return None
        frame = self.buffer[4 : 4 + total_size]
        self.buffer = self.buffer[4 + total_size :]
        (command_size,) = struct.unpack(">I", frame[:4])
        command = decode_fields(frame[4 : 4 + command_size])
        command_type = command[1][0]
        body_values = command.get(command_type, [b""])
        return Frame(command_type, decode_fields(body_values[0]))

    def reply(self, timeout_s: Optional[float] = None) -> Optional[Frame]:
        """The next frame that is not a keep-alive PING from the broker (those are answered)."""
        while True:
            frame = self.read_frame(timeout_s)
            if frame is None or frame.command_type != PING:
                return frame
            self.send(simple_frame(base_command(PONG, b"")))

    def handshake(self) -> Frame:
        """CONNECT and expect CONNECTED."""
        self.send(connect_frame())
        frame = self.reply()
        assert frame is not None, "broker closed the connection instead of answering CONNECT"
        assert frame.command_type == CONNECTED, f"expected CONNECTED, got {frame.name} {frame.body}"
        return frame

    def ping(self) -> None:
        """PING and expect PONG."""
        self.send(ping_frame())
        frame = self.reply()
        assert frame is not None, "broker closed the connection instead of answering PING"
        assert frame.command_type == PONG, f"expected PONG, got {frame.name} {frame.body}"

    def request(self, frame: bytes, expected: int) -> Frame:
        """Send a request and expect a reply of type `expected` (frames the broker sends on its
        own, ACTIVE_CONSUMER_CHANGE, CLOSE_PRODUCER and CLOSE_CONSUMER, are skipped)."""
        self.send(frame)
        reply = self.reply()
        while reply is not None and reply.command_type in UNSOLICITED:
            reply = self.reply()
        assert reply is not None, "broker closed the connection instead of answering"
        assert reply.command_type == expected, f"expected {TYPE_NAMES.get(expected)}, got {reply.name} {reply.body}"
        return reply

    def frames_until_closed(self, timeout_s: float = 10.0) -> list[Frame]:
        """Every frame the broker still sends, until it closes the connection.

        Fails if the connection is still open at the deadline.
        """
        frames = []
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                frame = self.read_frame(timeout_s=max(remaining, 0.001))
            except TimeoutError:
                raise AssertionError(
                    f"the broker kept the connection open for {timeout_s:.0f} s "
                    f"(frames received meanwhile: {[f.name for f in frames]})"
                ) from None
            if frame is None:
                return frames
            frames.append(frame)
