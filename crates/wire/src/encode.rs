//! Encoding frames and entries.
//!
//! A payload frame is returned as two parts: a freshly encoded header (a [`FrameHeader`],
//! inline when it is short) and the entry, untouched. A broker dispatching a stored entry
//! therefore never copies or re-encodes it; the connection writes both parts (vectored, or
//! one after the other) with [`PayloadFrame::write_to`] as the fallback.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

use crate::error::EncodeError;
use crate::proto::{
    base_command, BaseCommand, BrokerEntryMetadata, CommandMessage, CommandSend, MessageIdData,
    MessageMetadata,
};
use crate::{BROKER_ENTRY_METADATA_MAGIC, CHECKSUM_MAGIC};

/// A `usize` length as a wire `u32`, or an error naming what was too large.
fn wire_size(section: &'static str, length: usize) -> Result<u32, EncodeError> {
    u32::try_from(length).map_err(|_| EncodeError::TooLarge { section, length })
}

/// Appends a simple command frame, `[total_size][command_size][BaseCommand]`,
/// to `buffer`.
pub fn encode_command(command: &BaseCommand, buffer: &mut BytesMut) -> Result<(), EncodeError> {
    let command_length = command.encoded_len();
    let command_size = wire_size("command", command_length)?;
    let total_size = wire_size("frame", command_length.saturating_add(4))?;
    buffer.reserve(command_length.saturating_add(8));
    let start = buffer.len();
    buffer.put_u32(total_size);
    buffer.put_u32(command_size);
    command.encode(buffer)?;
    debug_assert_eq!(buffer.len() - start, command_length + 8);
    Ok(())
}

/// A payload frame's header, `[total_size][command_size][BaseCommand]`. A header of up to
/// [`FrameHeader::INLINE`] bytes (a MESSAGE frame's, unless it carries a long ack set) is
/// kept in the value itself: a broker delivering an entry then allocates nothing for its
/// header, where an allocation per delivered entry, made on the dispatching task and freed by
/// the connection's writer, was the largest one of unbatched delivery (issue 16).
#[derive(Clone)]
pub struct FrameHeader(HeaderBytes);

#[derive(Clone)]
enum HeaderBytes {
    Inline {
        length: u8,
        bytes: [u8; FrameHeader::INLINE],
    },
    Shared(Bytes),
}

impl FrameHeader {
    /// The longest header kept inline (a `SendError` of an outbound frame stays within
    /// clippy's bound for an error variant).
    pub const INLINE: usize = 72;

    /// Whether the header is kept in the value itself, not in an allocation of its own.
    pub fn is_inline(&self) -> bool {
        matches!(self.0, HeaderBytes::Inline { .. })
    }
}

impl std::ops::Deref for FrameHeader {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            HeaderBytes::Inline { length, bytes } => &bytes[..usize::from(*length)],
            HeaderBytes::Shared(bytes) => bytes,
        }
    }
}

impl From<Vec<u8>> for FrameHeader {
    fn from(header: Vec<u8>) -> FrameHeader {
        FrameHeader(HeaderBytes::Shared(Bytes::from(header)))
    }
}

impl PartialEq for FrameHeader {
    fn eq(&self, other: &FrameHeader) -> bool {
        self[..] == other[..]
    }
}

impl Eq for FrameHeader {}

impl std::fmt::Debug for FrameHeader {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_tuple("FrameHeader")
            .field(&&self[..])
            .finish()
    }
}

/// Where a MESSAGE frame's header is written: an inline [`FrameHeader`] being filled, or a
/// `Vec` for a longer one.
trait HeaderOut {
    fn push(&mut self, byte: u8);
    fn extend_from_slice(&mut self, bytes: &[u8]);
}

impl HeaderOut for Vec<u8> {
    fn push(&mut self, byte: u8) {
        Vec::push(self, byte);
    }

    fn extend_from_slice(&mut self, bytes: &[u8]) {
        Vec::extend_from_slice(self, bytes);
    }
}

/// An inline header being written; the caller checked that the header fits.
struct InlineHeader {
    length: usize,
    bytes: [u8; FrameHeader::INLINE],
}

impl HeaderOut for InlineHeader {
    fn push(&mut self, byte: u8) {
        self.bytes[self.length] = byte;
        self.length += 1;
    }

    fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.bytes[self.length..self.length + bytes.len()].copy_from_slice(bytes);
        self.length += bytes.len();
    }
}

/// A payload frame (SEND or MESSAGE) as its two parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayloadFrame {
    /// `[total_size][command_size][BaseCommand]`.
    pub header: FrameHeader,
    /// The entry, exactly as it was given.
    pub entry: Bytes,
}

impl PayloadFrame {
    /// Length of the whole frame on the wire.
    pub fn frame_length(&self) -> usize {
        self.header.len() + self.entry.len()
    }

    /// Appends the whole frame to `buffer` (copies the entry).
    pub fn write_to(&self, buffer: &mut BytesMut) {
        buffer.reserve(self.frame_length());
        buffer.extend_from_slice(&self.header);
        buffer.extend_from_slice(&self.entry);
    }

    /// The whole frame as one contiguous buffer (copies the entry).
    pub fn to_bytes(&self) -> Bytes {
        let mut buffer = BytesMut::with_capacity(self.frame_length());
        self.write_to(&mut buffer);
        buffer.freeze()
    }
}

/// The start of a payload frame's header, `[total_size][command_size]`, in a buffer with room
/// for the command (`command_length` bytes) that follows it, in front of `entry`.
/// A payload frame's two sizes, `[total_size][command_size]`, for a command of
/// `command_length` bytes in front of `entry`.
fn payload_frame_sizes(command_length: usize, entry: &[u8]) -> Result<[u8; 8], EncodeError> {
    let command_size = wire_size("command", command_length)?;
    let total_length = command_length
        .checked_add(4)
        .and_then(|length| length.checked_add(entry.len()))
        .ok_or(EncodeError::TooLarge {
            section: "frame",
            length: usize::MAX,
        })?;
    let total_size = wire_size("frame", total_length)?;
    let mut sizes = [0; 8];
    sizes[..4].copy_from_slice(&total_size.to_be_bytes());
    sizes[4..].copy_from_slice(&command_size.to_be_bytes());
    Ok(sizes)
}

/// Builds a payload frame: a header for `command` in front of `entry`, which
/// is not copied or inspected.
pub fn encode_payload_frame(
    command: &BaseCommand,
    entry: Bytes,
) -> Result<PayloadFrame, EncodeError> {
    let command_length = command.encoded_len();
    let mut header = Vec::with_capacity(command_length.saturating_add(8));
    header.extend_from_slice(&payload_frame_sizes(command_length, &entry)?);
    command.encode(&mut header)?;
    debug_assert_eq!(header.len(), command_length + 8);
    Ok(PayloadFrame {
        header: FrameHeader::from(header),
        entry,
    })
}

/// Builds the MESSAGE frame a broker sends to a consumer: a new header in
/// front of the stored entry, which goes out byte for byte as it was stored.
///
/// The command, `BaseCommand { type: MESSAGE, message }`, is written field by field, the
/// bytes prost would write for it: `BaseCommand`'s own encoder visits each of its dozens of
/// optional fields twice (length, then bytes), once per delivered entry (issue 16), and
/// `CommandMessage`'s computes its message id's length twice.
pub fn encode_message_frame(
    message: CommandMessage,
    entry: Bytes,
) -> Result<PayloadFrame, EncodeError> {
    let id_length = message_id_length(&message.message_id);
    let message_length = command_message_length(&message, id_length);
    let command_length = 1
        + prost::encoding::encoded_len_varint(MESSAGE_TYPE)
        + 1
        + prost::encoding::encoded_len_varint(message_length as u64)
        + message_length;
    let sizes = payload_frame_sizes(command_length, &entry)?;
    let header = if command_length + 8 <= FrameHeader::INLINE {
        let mut inline = InlineHeader {
            length: 0,
            bytes: [0; FrameHeader::INLINE],
        };
        put_message_header(&mut inline, sizes, message_length, &message, id_length);
        debug_assert_eq!(inline.length, command_length + 8);
        FrameHeader(HeaderBytes::Inline {
            length: inline.length as u8,
            bytes: inline.bytes,
        })
    } else {
        let mut header = Vec::with_capacity(command_length + 8);
        put_message_header(&mut header, sizes, message_length, &message, id_length);
        debug_assert_eq!(header.len(), command_length + 8);
        FrameHeader::from(header)
    };
    Ok(PayloadFrame { header, entry })
}

/// A MESSAGE frame's header: its sizes, then `BaseCommand { type: MESSAGE, message }` of
/// `message_length` bytes.
fn put_message_header<H: HeaderOut>(
    header: &mut H,
    sizes: [u8; 8],
    message_length: usize,
    message: &CommandMessage,
    id_length: usize,
) {
    /// Key of `BaseCommand.type`: field 1, varint.
    const TYPE_KEY: u8 = 1 << 3;
    /// Key of `BaseCommand.message`: field 9, length-delimited.
    const MESSAGE_KEY: u8 = (9 << 3) | 2;
    header.extend_from_slice(&sizes);
    header.push(TYPE_KEY);
    put_varint(header, MESSAGE_TYPE);
    header.push(MESSAGE_KEY);
    put_varint(header, message_length as u64);
    put_command_message(header, message, id_length);
}

const MESSAGE_TYPE: u64 = base_command::Type::Message as u64;

// `CommandMessage` and its `MessageIdData` written by hand, fields in tag order as prost writes
// them (every field number is below 16, so each key is one byte). prost's encoder computes a
// nested message's length once for the length and again inside it, per delivered entry.

/// The key of field `field` with wire type `wire_type` (0 varint, 2 length-delimited).
const fn key(field: u8, wire_type: u8) -> u8 {
    (field << 3) | wire_type
}

/// An `int32`'s varint: negative values take ten bytes, sign-extended, as protobuf says.
fn int32_varint(value: i32) -> u64 {
    i64::from(value) as u64
}

/// Length of a varint field: its key and its value.
fn varint_field_length(value: u64) -> usize {
    1 + prost::encoding::encoded_len_varint(value)
}

/// Appends `value` as a varint: seven bits per byte, low bits first, the high bit set on all
/// but the last byte.
fn put_varint<H: HeaderOut>(buffer: &mut H, mut value: u64) {
    while value >= 0x80 {
        buffer.push(value as u8 | 0x80);
        value >>= 7;
    }
    buffer.push(value as u8);
}

fn put_varint_field<H: HeaderOut>(buffer: &mut H, field: u8, value: u64) {
    buffer.push(key(field, 0));
    put_varint(buffer, value);
}

fn message_id_length(id: &MessageIdData) -> usize {
    let optional =
        |value: Option<i32>| value.map_or(0, |value| varint_field_length(int32_varint(value)));
    varint_field_length(id.ledger_id)
        + varint_field_length(id.entry_id)
        + optional(id.partition)
        + optional(id.batch_index)
        + id.ack_set
            .iter()
            .map(|word| varint_field_length(*word as u64))
            .sum::<usize>()
        + optional(id.batch_size)
        + id.first_chunk_message_id.as_deref().map_or(0, |first| {
            let length = message_id_length(first);
            1 + prost::encoding::encoded_len_varint(length as u64) + length
        })
}

fn put_message_id<H: HeaderOut>(buffer: &mut H, id: &MessageIdData) {
    put_varint_field(buffer, 1, id.ledger_id);
    put_varint_field(buffer, 2, id.entry_id);
    if let Some(partition) = id.partition {
        put_varint_field(buffer, 3, int32_varint(partition));
    }
    if let Some(batch_index) = id.batch_index {
        put_varint_field(buffer, 4, int32_varint(batch_index));
    }
    for word in &id.ack_set {
        put_varint_field(buffer, 5, *word as u64);
    }
    if let Some(batch_size) = id.batch_size {
        put_varint_field(buffer, 6, int32_varint(batch_size));
    }
    if let Some(first) = id.first_chunk_message_id.as_deref() {
        buffer.push(key(7, 2));
        put_varint(buffer, message_id_length(first) as u64);
        put_message_id(buffer, first);
    }
}

/// Length of `message` encoded, its message id being `id_length` bytes.
fn command_message_length(message: &CommandMessage, id_length: usize) -> usize {
    varint_field_length(message.consumer_id)
        + 1
        + prost::encoding::encoded_len_varint(id_length as u64)
        + id_length
        + message
            .redelivery_count
            .map_or(0, |count| varint_field_length(u64::from(count)))
        + message
            .ack_set
            .iter()
            .map(|word| varint_field_length(*word as u64))
            .sum::<usize>()
        + message.consumer_epoch.map_or(0, varint_field_length)
}

fn put_command_message<H: HeaderOut>(buffer: &mut H, message: &CommandMessage, id_length: usize) {
    put_varint_field(buffer, 1, message.consumer_id);
    buffer.push(key(2, 2));
    put_varint(buffer, id_length as u64);
    put_message_id(buffer, &message.message_id);
    if let Some(count) = message.redelivery_count {
        put_varint_field(buffer, 3, u64::from(count));
    }
    for word in &message.ack_set {
        put_varint_field(buffer, 4, *word as u64);
    }
    if let Some(epoch) = message.consumer_epoch {
        put_varint_field(buffer, 5, epoch);
    }
}

/// Builds the SEND frame a producer sends, with the 0x0e01 checksum block.
pub fn encode_send_frame(
    send: CommandSend,
    metadata: &MessageMetadata,
    payload: &[u8],
) -> Result<PayloadFrame, EncodeError> {
    let command = BaseCommand {
        r#type: base_command::Type::Send as i32,
        send: Some(send),
        ..BaseCommand::default()
    };
    encode_payload_frame(&command, encode_entry(metadata, payload)?)
}

/// Encodes an entry with its checksum block:
/// `[0x0e01][crc32c][metadata_size][metadata][payload]`. This is what a
/// producer sends and what a broker writes for its own entries (markers).
pub fn encode_entry(metadata: &MessageMetadata, payload: &[u8]) -> Result<Bytes, EncodeError> {
    let mut buffer = BytesMut::new();
    buffer.put_u16(CHECKSUM_MAGIC);
    // Placeholder for the checksum, filled in once the covered bytes exist.
    buffer.put_u32(0);
    put_metadata_and_payload(&mut buffer, metadata, payload)?;
    let checksum = crc32c::crc32c(&buffer[6..]);
    buffer[2..6].copy_from_slice(&checksum.to_be_bytes());
    Ok(buffer.freeze())
}

/// Encodes an entry without a checksum block, as producers did before
/// protocol v6: `[metadata_size][metadata][payload]`.
pub fn encode_entry_without_checksum(
    metadata: &MessageMetadata,
    payload: &[u8],
) -> Result<Bytes, EncodeError> {
    let mut buffer = BytesMut::new();
    put_metadata_and_payload(&mut buffer, metadata, payload)?;
    Ok(buffer.freeze())
}

fn put_metadata_and_payload(
    buffer: &mut BytesMut,
    metadata: &MessageMetadata,
    payload: &[u8],
) -> Result<(), EncodeError> {
    let metadata_length = metadata.encoded_len();
    let metadata_size = wire_size("metadata", metadata_length)?;
    buffer.reserve(4 + metadata_length + payload.len());
    let start = buffer.len();
    buffer.put_u32(metadata_size);
    metadata.encode(buffer)?;
    debug_assert_eq!(buffer.len() - start, 4 + metadata_length);
    buffer.extend_from_slice(payload);
    Ok(())
}

/// Puts a 0x0e02 broker-entry-metadata block in front of `entry` (copying
/// it), for a broker that records broker timestamps or indexes with entries.
pub fn prepend_broker_entry_metadata(
    broker_entry_metadata: &BrokerEntryMetadata,
    entry: &[u8],
) -> Result<Bytes, EncodeError> {
    let metadata_length = broker_entry_metadata.encoded_len();
    let metadata_size = wire_size("broker entry metadata", metadata_length)?;
    let mut buffer = BytesMut::with_capacity(6 + metadata_length + entry.len());
    buffer.put_u16(BROKER_ENTRY_METADATA_MAGIC);
    buffer.put_u32(metadata_size);
    broker_entry_metadata.encode(&mut buffer)?;
    buffer.extend_from_slice(entry);
    Ok(buffer.freeze())
}
