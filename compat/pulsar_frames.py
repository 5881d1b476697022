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
- ServerError.InvalidTopicName = 17.

Framing (all sizes big-endian): a simple command is
`[u32 total_size][u32 command_size][BaseCommand]` with total_size = 4 + command_size.
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
ERROR = 14
PING = 18
PONG = 19
PARTITIONED_METADATA = 21
PARTITIONED_METADATA_RESPONSE = 22
LOOKUP = 23
LOOKUP_RESPONSE = 24

TYPE_NAMES = {
    CONNECT: "CONNECT",
    CONNECTED: "CONNECTED",
    ERROR: "ERROR",
    PING: "PING",
    PONG: "PONG",
    PARTITIONED_METADATA: "PARTITIONED_METADATA",
    PARTITIONED_METADATA_RESPONSE: "PARTITIONED_METADATA_RESPONSE",
    LOOKUP: "LOOKUP",
    LOOKUP_RESPONSE: "LOOKUP_RESPONSE",
}

SERVER_ERROR_INVALID_TOPIC_NAME = 17
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

    def __init__(self, port: int, timeout_s: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
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
