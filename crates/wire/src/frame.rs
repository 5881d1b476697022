//! Frame decoding, in two phases as in mini-redis: [`check_frame`] says
//! whether a whole frame is buffered, then [`parse_frame`] decodes it.
//! [`decode_frame`] combines the two over a connection's read buffer.
//!
//! Unlike mini-redis, the check enforces a maximum frame size given by the
//! caller, and it does so from the 4-byte size field alone: a peer announcing
//! a huge frame is refused before the reader buffers any of it.
//!
//! Which frames carry a payload is decided by the command type, as Pulsar
//! does: SEND and MESSAGE must be followed by an entry, every other command
//! must not. Frames whose type this crate does not know are returned as
//! simple commands if nothing follows them.

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;

use crate::entry::{parse_entry, ParsedEntry};
use crate::error::FrameError;
use crate::proto::{base_command, BaseCommand, CommandAck, MessageIdData};
use crate::read;

/// Bytes of the `total_size` field that starts every frame.
const TOTAL_SIZE_LENGTH: usize = 4;

/// Bytes of `total_size` plus `command_size`.
const HEADER_LENGTH: usize = 8;

/// Outcome of [`check_frame`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameCheck {
    /// A whole frame of `frame_length` bytes (size field included) starts the
    /// buffer.
    Complete { frame_length: usize },
    /// The frame is not all there yet; at least `bytes_needed` more bytes
    /// must arrive before checking again is useful.
    Incomplete { bytes_needed: usize },
}

/// Checks whether `buffer` starts with a whole frame, without decoding it.
///
/// `max_frame_size` bounds the whole frame, size field included (Pulsar's is
/// the max message size plus 10 KiB, [`crate::DEFAULT_MAX_FRAME_SIZE`]). A
/// larger declared frame is an error as soon as its size field is buffered.
pub fn check_frame(buffer: &[u8], max_frame_size: usize) -> Result<FrameCheck, FrameError> {
    let Some(total_size) = read::u32_at(buffer, 0) else {
        return Ok(FrameCheck::Incomplete {
            bytes_needed: TOTAL_SIZE_LENGTH - buffer.len(),
        });
    };
    // Widen before adding: total_size may be u32::MAX.
    let frame_length = u64::from(total_size) + TOTAL_SIZE_LENGTH as u64;
    let max_frame_length = u64::try_from(max_frame_size).unwrap_or(u64::MAX);
    if frame_length > max_frame_length {
        return Err(FrameError::FrameTooLarge {
            frame_length,
            max_frame_size,
        });
    }
    if total_size < 4 {
        return Err(FrameError::FrameTooSmall { total_size });
    }
    // frame_length <= max_frame_size, so it fits a usize.
    let frame_length = usize::try_from(frame_length).unwrap_or(usize::MAX);
    if buffer.len() < frame_length {
        return Ok(FrameCheck::Incomplete {
            bytes_needed: frame_length - buffer.len(),
        });
    }
    Ok(FrameCheck::Complete { frame_length })
}

/// A decoded frame.
///
/// Both variants are boxed: a `BaseCommand` lays the commands of every message (SEND,
/// MESSAGE, ACK, …) out inline, which makes it most of 1 KiB, and frames are moved through
/// queues.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// A command alone: everything except SEND and MESSAGE.
    Simple(Box<BaseCommand>),
    /// A SEND or MESSAGE command and the entry that follows it.
    Payload(Box<PayloadCommand>),
}

impl Frame {
    /// The command, whichever shape the frame has.
    pub fn command(&self) -> &BaseCommand {
        match self {
            Frame::Simple(command) => command,
            Frame::Payload(payload_command) => &payload_command.command,
        }
    }
}

/// A SEND or MESSAGE command with its entry.
#[derive(Clone, Debug, PartialEq)]
pub struct PayloadCommand {
    /// The command (its `send` or `message` field is the one set).
    pub command: BaseCommand,
    /// The entry after the command: its exact bytes to store
    /// ([`ParsedEntry::bytes`], without any 0x0e02 block), the decoded
    /// metadata, the payload, the checksum verdict, and the broker entry
    /// metadata if a 0x0e02 block was present.
    pub entry: ParsedEntry,
}

/// Decodes one whole frame: exactly the bytes [`check_frame`] reported as
/// complete, size field included.
pub fn parse_frame(frame: Bytes) -> Result<Frame, FrameError> {
    let (Some(total_size), Some(command_size)) = (read::u32_at(&frame, 0), read::u32_at(&frame, 4))
    else {
        return Err(FrameError::Truncated {
            needed: HEADER_LENGTH,
            available: frame.len(),
        });
    };
    let declared_length = u64::from(total_size) + TOTAL_SIZE_LENGTH as u64;
    if u64::try_from(frame.len()).ok() != Some(declared_length) {
        return Err(FrameError::FrameLengthMismatch {
            declared_length,
            actual_length: frame.len(),
        });
    }

    let after_header = frame.len() - HEADER_LENGTH;
    let command_length = read::size(command_size);
    if command_length > after_header {
        return Err(FrameError::CommandSizeOutOfBounds {
            command_size,
            available: after_header,
        });
    }
    let command_end = HEADER_LENGTH + command_length;
    // Decoded in place on the heap: decoding a `BaseCommand` by value and then boxing it
    // would copy it twice for every frame, every acknowledgement included (issue 16).
    let mut command = Box::<BaseCommand>::default();
    command
        .merge(frame.slice(HEADER_LENGTH..command_end))
        .map_err(FrameError::InvalidCommand)?;
    let rest = frame.slice(command_end..);

    if !carries_payload(command.r#type) {
        if !rest.is_empty() {
            return Err(FrameError::UnexpectedPayload {
                command_type: command.r#type,
                payload_length: rest.len(),
            });
        }
        return Ok(Frame::Simple(command));
    }
    if rest.is_empty() {
        return Err(FrameError::MissingPayload {
            command_type: command.r#type,
        });
    }
    match parse_entry(rest) {
        Ok(entry) => Ok(Frame::Payload(Box::new(PayloadCommand {
            command: *command,
            entry,
        }))),
        Err(source) => Err(FrameError::InvalidEntry { command, source }),
    }
}

/// Takes one frame off the front of a connection's read buffer, if a whole
/// one is there. Returns `Ok(None)` when more bytes are needed.
///
/// The frame is split off the buffer before parsing, so after an error that
/// is not about the size field the buffer is positioned at the next frame.
pub fn decode_frame(
    buffer: &mut BytesMut,
    max_frame_size: usize,
) -> Result<Option<Frame>, FrameError> {
    match check_frame(buffer, max_frame_size)? {
        FrameCheck::Incomplete { .. } => Ok(None),
        FrameCheck::Complete { frame_length } => {
            let frame = buffer.split_to(frame_length).freeze();
            parse_frame(frame).map(Some)
        }
    }
}

/// What [`decode_frame_or_ack`] takes off a read buffer.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    /// A frame whose command is an ACK and nothing else, the shape every client sends.
    Ack(CommandAck),
    /// Any other frame, as [`decode_frame`] returns it.
    Frame(Frame),
}

impl Decoded {
    /// As a [`Frame`] (an ACK in its `BaseCommand`).
    pub fn into_frame(self) -> Frame {
        match self {
            Decoded::Ack(ack) => Frame::Simple(Box::new(BaseCommand {
                r#type: base_command::Type::Ack as i32,
                ack: Some(ack),
                ..BaseCommand::default()
            })),
            Decoded::Frame(frame) => frame,
        }
    }
}

/// [`decode_frame`] for a broker: an ACK frame (one per acknowledged message from many
/// clients, so the most common frame a broker reads) comes back as its `CommandAck` alone,
/// decoded without building and dropping a `BaseCommand` around it (issue 16). The result is
/// what [`decode_frame`] would give: any frame that is not exactly a command type of ACK and
/// one ACK body, or whose ACK does not decode, goes through [`parse_frame`].
pub fn decode_frame_or_ack(
    buffer: &mut BytesMut,
    max_frame_size: usize,
) -> Result<Option<Decoded>, FrameError> {
    decode_frame_or_ack_reusing(buffer, max_frame_size, &mut None)
}

/// [`decode_frame_or_ack`] that decodes an ACK into `spare` (taken; an ACK handled before,
/// given back by the caller), reusing its list of message ids: a connection that gives each
/// ACK back once handled decodes a stream of ACKs without allocating. Every field of `spare`
/// is replaced: the result is the same as [`decode_frame_or_ack`]'s.
pub fn decode_frame_or_ack_reusing(
    buffer: &mut BytesMut,
    max_frame_size: usize,
    spare: &mut Option<CommandAck>,
) -> Result<Option<Decoded>, FrameError> {
    match check_frame(buffer, max_frame_size)? {
        FrameCheck::Incomplete { .. } => Ok(None),
        FrameCheck::Complete { frame_length } => {
            // An ACK is decoded from the buffer in place: its bytes are not kept, so they need
            // not be split off into a `Bytes` of their own.
            if let Some(ack) = ack_alone(&buffer[..frame_length], spare) {
                buffer.advance(frame_length);
                return Ok(Some(Decoded::Ack(ack)));
            }
            let frame = buffer.split_to(frame_length).freeze();
            parse_frame(frame).map(|frame| Some(Decoded::Frame(frame)))
        }
    }
}

/// The ACK of a whole frame whose command has exactly two fields, `type` = ACK and `ack`, and
/// nothing after the command; `None` for anything else (including bytes that do not decode),
/// which [`parse_frame`] then judges.
fn ack_alone(frame: &[u8], spare: &mut Option<CommandAck>) -> Option<CommandAck> {
    /// Key of `BaseCommand.type`: field 1, varint.
    const TYPE_KEY: u8 = 1 << 3;
    /// Key of `BaseCommand.ack`: field 10, length-delimited.
    const ACK_KEY: u8 = (10 << 3) | 2;
    let total_length = read::size(read::u32_at(frame, 0)?).checked_add(TOTAL_SIZE_LENGTH)?;
    let command_end = HEADER_LENGTH.checked_add(read::size(read::u32_at(frame, 4)?))?;
    // The command must fill the frame: a payload after it is parse_frame's error to report.
    if total_length != frame.len() || command_end != frame.len() {
        return None;
    }
    let mut at = HEADER_LENGTH;
    let mut kind = None;
    let mut body = None;
    while at < command_end {
        let key = *frame.get(at)?;
        at += 1;
        let (value, length) = varint(frame.get(at..command_end)?)?;
        at += length;
        match key {
            TYPE_KEY if kind.is_none() => kind = Some(value),
            ACK_KEY if body.is_none() => {
                let end = at.checked_add(usize::try_from(value).ok()?)?;
                if end > command_end {
                    return None;
                }
                body = Some(at..end);
                at = end;
            }
            _ => return None,
        }
    }
    if kind? != base_command::Type::Ack as u64 {
        return None;
    }
    let body = body?;
    let body = frame.get(body)?;
    ack_by_hand(body, spare).or_else(|| CommandAck::decode(body).ok())
}

/// A `CommandAck` with only the fields clients send for a plain acknowledgement (consumer id,
/// ack type, message ids, request id), decoded field by field as prost would decode it, at a
/// fraction of prost's cost (issue 16); `None` for any other field or bytes that do not decode,
/// which prost then judges.
fn ack_by_hand(bytes: &[u8], spare: &mut Option<CommandAck>) -> Option<CommandAck> {
    // Only the list's allocation is kept from the spare: every field starts as the default.
    let mut message_id = spare.take().map(|ack| ack.message_id).unwrap_or_default();
    message_id.clear();
    let mut ack = CommandAck {
        message_id,
        ..CommandAck::default()
    };
    let mut fields = Fields { bytes };
    while let Some(field) = fields.next()? {
        // Scalars are cast as prost casts them: the varint truncated to the field's width.
        match field {
            Field::Varint(1, value) => ack.consumer_id = value,
            Field::Varint(2, value) => ack.ack_type = value as i32,
            Field::Bytes(3, message_id) => ack.message_id.push(message_id_by_hand(message_id)?),
            Field::Varint(8, value) => ack.request_id = Some(value),
            _ => return None,
        }
    }
    Some(ack)
}

/// A `MessageIdData` without a first-chunk id, as [`ack_by_hand`] decodes it.
fn message_id_by_hand(bytes: &[u8]) -> Option<MessageIdData> {
    let mut id = MessageIdData::default();
    let mut fields = Fields { bytes };
    while let Some(field) = fields.next()? {
        match field {
            Field::Varint(1, value) => id.ledger_id = value,
            Field::Varint(2, value) => id.entry_id = value,
            Field::Varint(3, value) => id.partition = Some(value as i32),
            Field::Varint(4, value) => id.batch_index = Some(value as i32),
            Field::Varint(5, value) => id.ack_set.push(value as i64),
            Field::Bytes(5, mut packed) => {
                while !packed.is_empty() {
                    let (value, length) = varint(packed)?;
                    id.ack_set.push(value as i64);
                    packed = packed.get(length..)?;
                }
            }
            Field::Varint(6, value) => id.batch_size = Some(value as i32),
            _ => return None,
        }
    }
    Some(id)
}

/// One field of a protobuf message, as [`Fields`] reads it.
enum Field<'a> {
    /// A varint field: its number and value.
    Varint(u64, u64),
    /// A length-delimited field: its number and bytes.
    Bytes(u64, &'a [u8]),
}

/// Reads the fields of a protobuf message one by one, varint and length-delimited ones only.
struct Fields<'a> {
    bytes: &'a [u8],
}

impl<'a> Fields<'a> {
    /// `Some(None)` at the end, `None` on bytes that do not decode or a field of another wire
    /// type. Inlined into the decoders' loops: a call per field cost more than the field's
    /// decoding (issue 16).
    #[inline(always)]
    fn next(&mut self) -> Option<Option<Field<'a>>> {
        if self.bytes.is_empty() {
            return Some(None);
        }
        let (key, key_length) = varint(self.bytes)?;
        let (value, value_length) = varint(self.bytes.get(key_length..)?)?;
        let after = key_length + value_length;
        let number = key >> 3;
        match key & 0b111 {
            0 => {
                self.bytes = self.bytes.get(after..)?;
                Some(Some(Field::Varint(number, value)))
            }
            2 => {
                let end = after.checked_add(usize::try_from(value).ok()?)?;
                let field = self.bytes.get(after..end)?;
                self.bytes = self.bytes.get(end..)?;
                Some(Some(Field::Bytes(number, field)))
            }
            _ => None,
        }
    }
}

/// A base-128 varint at the start of `bytes`: its value and its length, or `None` if it is
/// cut short, longer than ten bytes or beyond 64 bits.
#[inline]
fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    // Keys and small values take one byte: inlined; longer ones call out.
    match bytes.first() {
        Some(&byte) if byte < 0x80 => Some((u64::from(byte), 1)),
        _ => long_varint(bytes),
    }
}

/// [`varint`] of two bytes or more (or none).
fn long_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (index, byte) in bytes.iter().take(10).enumerate() {
        // The tenth byte holds the 64th bit alone.
        if index == 9 && *byte > 1 {
            return None;
        }
        value |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Some((value, index + 1));
        }
    }
    None
}

/// Whether frames of this command type carry an entry after the command.
fn carries_payload(command_type: i32) -> bool {
    command_type == base_command::Type::Send as i32
        || command_type == base_command::Type::Message as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::{
        encode_command, encode_entry, encode_entry_without_checksum, encode_message_frame,
        encode_payload_frame, encode_send_frame, prepend_broker_entry_metadata,
    };
    use crate::entry::ChecksumStatus;
    use crate::proto::{
        command_ack, command_subscribe, BrokerEntryMetadata, CommandConnect, CommandError,
        CommandFlow, CommandMessage, CommandPing, CommandSend, CommandSubscribe, FeatureFlags,
        IntRange, KeySharedMeta, KeySharedMode, MessageIdData, MessageMetadata, ServerError,
    };
    use crate::{command_type, CommandType, DEFAULT_MAX_FRAME_SIZE};

    fn simple_frame(command: &BaseCommand) -> Bytes {
        let mut buffer = BytesMut::new();
        encode_command(command, &mut buffer).expect("encode");
        buffer.freeze()
    }

    fn ping() -> BaseCommand {
        BaseCommand {
            r#type: CommandType::Ping as i32,
            ping: Some(CommandPing {}),
            ..BaseCommand::default()
        }
    }

    fn send_command(sequence_id: u64) -> CommandSend {
        CommandSend {
            producer_id: 3,
            sequence_id,
            num_messages: Some(1),
            ..CommandSend::default()
        }
    }

    fn metadata(sequence_id: u64) -> MessageMetadata {
        MessageMetadata {
            producer_name: "standalone-0-1".to_owned(),
            sequence_id,
            publish_time: 1_700_000_000_123,
            ..MessageMetadata::default()
        }
    }

    fn message_command() -> CommandMessage {
        CommandMessage {
            consumer_id: 11,
            message_id: MessageIdData {
                ledger_id: 5,
                entry_id: 42,
                ..MessageIdData::default()
            },
            redelivery_count: Some(2),
            ..CommandMessage::default()
        }
    }

    fn expect_payload(frame: Frame) -> PayloadCommand {
        match frame {
            Frame::Payload(payload_command) => *payload_command,
            Frame::Simple(command) => panic!("expected a payload frame, got {command:?}"),
        }
    }

    /// The acknowledgements clients send are decoded by hand, not left to prost: one message,
    /// one of a batch (index, size, ack set), a partition and a request id.
    #[test]
    fn common_acks_are_decoded_by_hand_as_prost_decodes_them() {
        let ids = [
            MessageIdData {
                ledger_id: 12,
                entry_id: 345,
                ..MessageIdData::default()
            },
            MessageIdData {
                ledger_id: 1 << 40,
                entry_id: 7,
                partition: Some(-1),
                batch_index: Some(127),
                batch_size: Some(128),
                ack_set: vec![-1, 0, i64::MIN],
                ..MessageIdData::default()
            },
        ];
        for request_id in [None, Some(99)] {
            let ack = CommandAck {
                consumer_id: 3,
                ack_type: command_ack::AckType::Cumulative as i32,
                message_id: ids.to_vec(),
                request_id,
                ..CommandAck::default()
            };
            let bytes = ack.encode_to_vec();
            assert_eq!(ack_by_hand(&bytes, &mut None), Some(ack.clone()));
            assert_eq!(CommandAck::decode(&bytes[..]).expect("decode"), ack);
        }
        // A field the hand decoder leaves to prost.
        let with_transaction = CommandAck {
            txnid_least_bits: Some(1),
            ..CommandAck::default()
        };
        assert_eq!(
            ack_by_hand(&with_transaction.encode_to_vec(), &mut None),
            None
        );
    }

    #[test]
    fn ping_frame_matches_the_pulsar_bytes() {
        // type = 18 (field 1, varint), ping = {} (field 18, empty message).
        let expected: &[u8] = &[0, 0, 0, 9, 0, 0, 0, 5, 0x08, 0x12, 0x92, 0x01, 0x00];
        assert_eq!(&simple_frame(&ping())[..], expected);
        let frame = parse_frame(Bytes::from_static(expected)).expect("parse");
        assert_eq!(frame, Frame::Simple(Box::new(ping())));
    }

    #[test]
    fn required_fields_are_encoded_even_when_zero() {
        let flow = CommandFlow {
            consumer_id: 0,
            message_permits: 0,
        };
        assert_eq!(flow.encode_to_vec(), vec![0x08, 0x00, 0x10, 0x00]);
    }

    #[test]
    fn proto2_defaults_apply_to_absent_fields() {
        let message_id = MessageIdData::default();
        assert_eq!(message_id.partition(), -1);
        assert_eq!(message_id.batch_index(), -1);
        let subscribe = CommandSubscribe::default();
        assert!(subscribe.durable());
        assert!(subscribe.force_topic_creation());
        assert_eq!(
            subscribe.initial_position(),
            command_subscribe::InitialPosition::Latest
        );
        assert_eq!(MessageMetadata::default().num_messages_in_batch(), 1);
        assert_eq!(CommandSend::default().num_messages(), 1);
        let producer_success = crate::proto::CommandProducerSuccess::default();
        assert_eq!(producer_success.last_sequence_id(), -1);
        assert!(producer_success.producer_ready());
        assert!(crate::proto::CommandPartitionedTopicMetadata::default()
            .metadata_auto_creation_enabled());
    }

    #[test]
    fn simple_commands_round_trip() {
        let commands = [
            ping(),
            BaseCommand {
                r#type: CommandType::Connect as i32,
                connect: Some(Box::new(CommandConnect {
                    client_version: "Pulsar-CPP-v4.2.0".to_owned(),
                    auth_method_name: Some("none".to_owned()),
                    protocol_version: Some(20),
                    feature_flags: Some(FeatureFlags {
                        supports_auth_refresh: Some(true),
                        supports_broker_entry_metadata: Some(true),
                        ..FeatureFlags::default()
                    }),
                    ..CommandConnect::default()
                })),
                ..BaseCommand::default()
            },
            BaseCommand {
                r#type: CommandType::Subscribe as i32,
                subscribe: Some(Box::new(CommandSubscribe {
                    topic: "persistent://public/default/orders".to_owned(),
                    subscription: "billing".to_owned(),
                    sub_type: command_subscribe::SubType::KeyShared as i32,
                    consumer_id: 1,
                    request_id: 2,
                    key_shared_meta: Some(KeySharedMeta {
                        key_shared_mode: KeySharedMode::Sticky as i32,
                        hash_ranges: vec![IntRange {
                            start: 0,
                            end: 32_767,
                        }],
                        allow_out_of_order_delivery: Some(false),
                    }),
                    ..CommandSubscribe::default()
                })),
                ..BaseCommand::default()
            },
            BaseCommand {
                r#type: CommandType::Error as i32,
                error: Some(Box::new(CommandError {
                    request_id: 9,
                    error: ServerError::TopicNotFound as i32,
                    message: "no such topic".to_owned(),
                })),
                ..BaseCommand::default()
            },
        ];
        for command in commands {
            let frame = parse_frame(simple_frame(&command)).expect("parse");
            assert_eq!(frame, Frame::Simple(Box::new(command)));
        }
    }

    #[test]
    fn unknown_and_unsupported_command_types_still_decode() {
        // 56 is END_TXN (recognised, to be refused); 75 is a scalable-topic
        // command this crate does not describe.
        for type_number in [56, 75] {
            let command = BaseCommand {
                r#type: type_number,
                ..BaseCommand::default()
            };
            let frame = parse_frame(simple_frame(&command)).expect("parse");
            assert_eq!(frame.command().r#type, type_number);
        }
        let end_transaction = BaseCommand {
            r#type: 56,
            ..BaseCommand::default()
        };
        assert_eq!(command_type(&end_transaction), Some(CommandType::EndTxn));
        let scalable = BaseCommand {
            r#type: 75,
            ..BaseCommand::default()
        };
        assert_eq!(command_type(&scalable), None);
    }

    #[test]
    fn send_frame_round_trips_with_a_verified_checksum() {
        let frame = encode_send_frame(send_command(17), &metadata(17), b"hello pulsar")
            .expect("encode")
            .to_bytes();
        let payload_command = expect_payload(parse_frame(frame).expect("parse"));
        assert_eq!(payload_command.command.send, Some(send_command(17)));
        assert_eq!(payload_command.entry.metadata, metadata(17));
        assert_eq!(&payload_command.entry.payload[..], b"hello pulsar");
        assert_eq!(payload_command.entry.checksum, ChecksumStatus::Verified);
        assert_eq!(
            payload_command.entry.bytes,
            encode_entry(&metadata(17), b"hello pulsar").expect("entry")
        );
    }

    #[test]
    fn send_frame_without_checksum_round_trips() {
        let entry = encode_entry_without_checksum(&metadata(4), b"old client").expect("entry");
        let command = BaseCommand {
            r#type: CommandType::Send as i32,
            send: Some(send_command(4)),
            ..BaseCommand::default()
        };
        let frame = encode_payload_frame(&command, entry.clone())
            .expect("encode")
            .to_bytes();
        let payload_command = expect_payload(parse_frame(frame).expect("parse"));
        assert_eq!(payload_command.entry.checksum, ChecksumStatus::Absent);
        assert_eq!(payload_command.entry.bytes, entry);
        assert_eq!(&payload_command.entry.payload[..], b"old client");
    }

    #[test]
    fn send_frame_with_a_corrupt_payload_reports_the_mismatch() {
        let frame = encode_send_frame(send_command(5), &metadata(5), b"payload")
            .expect("encode")
            .to_bytes();
        let mut corrupted = frame.to_vec();
        let last = corrupted.len() - 1;
        corrupted[last] ^= 0xff;
        let payload_command = expect_payload(parse_frame(Bytes::from(corrupted)).expect("parse"));
        assert!(payload_command.entry.checksum.is_present());
        assert!(!payload_command.entry.checksum.is_verified());
        // The command is intact, so a broker can answer SEND_ERROR(ChecksumError).
        assert_eq!(payload_command.command.send, Some(send_command(5)));
    }

    #[test]
    fn message_frame_carries_the_stored_entry_unchanged() {
        let stored = encode_entry(&metadata(1), b"stored payload").expect("entry");
        let encoded = encode_message_frame(message_command(), stored.clone()).expect("encode");
        // The entry is the same allocation, not a copy.
        assert_eq!(encoded.entry.as_ptr(), stored.as_ptr());
        let frame_bytes = encoded.to_bytes();
        assert_eq!(frame_bytes.len(), encoded.frame_length());
        assert_eq!(&frame_bytes[encoded.header.len()..], &stored[..]);

        let payload_command = expect_payload(parse_frame(frame_bytes).expect("parse"));
        assert_eq!(payload_command.command.message, Some(message_command()));
        assert_eq!(payload_command.entry.bytes, stored);
        assert_eq!(payload_command.entry.checksum, ChecksumStatus::Verified);
    }

    #[test]
    fn a_delivered_entry_header_is_inline_and_a_long_ack_set_is_not() {
        let stored = encode_entry(&metadata(1), b"stored payload").expect("entry");
        let long = CommandMessage {
            ack_set: vec![-1; 16],
            ..message_command()
        };
        for (message, inline) in [(message_command(), true), (long, false)] {
            let encoded = encode_message_frame(message.clone(), stored.clone()).expect("encode");
            assert_eq!(encoded.header.is_inline(), inline, "{message:?}");
            let payload_command = expect_payload(parse_frame(encoded.to_bytes()).expect("parse"));
            assert_eq!(payload_command.command.message, Some(message));
            assert_eq!(payload_command.entry.bytes, stored);
        }
    }

    #[test]
    fn message_frame_with_broker_entry_metadata_round_trips() {
        let stored = encode_entry(&metadata(1), b"with index").expect("entry");
        let broker_metadata = BrokerEntryMetadata {
            broker_timestamp: Some(1_700_000_000_999),
            index: Some(12),
        };
        let with_block = prepend_broker_entry_metadata(&broker_metadata, &stored).expect("block");
        let frame = encode_message_frame(message_command(), with_block)
            .expect("encode")
            .to_bytes();
        let payload_command = expect_payload(parse_frame(frame).expect("parse"));
        assert_eq!(
            payload_command.entry.broker_entry_metadata,
            Some(broker_metadata)
        );
        // The entry exposed for storage excludes the 0x0e02 block.
        assert_eq!(payload_command.entry.bytes, stored);
        assert_eq!(payload_command.entry.checksum, ChecksumStatus::Verified);
        assert_eq!(&payload_command.entry.payload[..], b"with index");
    }

    #[test]
    fn check_says_incomplete_at_every_split_point() {
        let frame = encode_send_frame(send_command(1), &metadata(1), b"split me anywhere")
            .expect("encode")
            .to_bytes();
        for split in 0..frame.len() {
            match check_frame(&frame[..split], DEFAULT_MAX_FRAME_SIZE).expect("check") {
                FrameCheck::Incomplete { bytes_needed } => {
                    assert!(bytes_needed > 0, "split {split}");
                    assert!(split + bytes_needed <= frame.len(), "split {split}");
                }
                FrameCheck::Complete { .. } => panic!("complete at split {split}"),
            }
        }
        assert_eq!(
            check_frame(&frame, DEFAULT_MAX_FRAME_SIZE).expect("check"),
            FrameCheck::Complete {
                frame_length: frame.len()
            }
        );
    }

    #[test]
    fn decode_frame_reassembles_frames_fed_one_byte_at_a_time() {
        let mut stream = BytesMut::new();
        encode_command(&ping(), &mut stream).expect("ping");
        encode_send_frame(send_command(2), &metadata(2), b"second")
            .expect("send")
            .write_to(&mut stream);
        encode_command(&ping(), &mut stream).expect("ping");

        let mut read_buffer = BytesMut::new();
        let mut frames = Vec::new();
        for byte in stream.iter() {
            read_buffer.extend_from_slice(&[*byte]);
            while let Some(frame) =
                decode_frame(&mut read_buffer, DEFAULT_MAX_FRAME_SIZE).expect("decode")
            {
                frames.push(frame);
            }
        }
        assert!(read_buffer.is_empty());
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0], Frame::Simple(Box::new(ping())));
        assert_eq!(
            &expect_payload(frames[1].clone()).entry.payload[..],
            b"second"
        );
        assert_eq!(frames[2], Frame::Simple(Box::new(ping())));
    }

    #[test]
    fn oversized_frame_is_rejected_from_its_size_field_alone() {
        // Only the 4-byte size is buffered: 100 MiB declared.
        let size_only = (100u32 * 1024 * 1024).to_be_bytes();
        let error = check_frame(&size_only, DEFAULT_MAX_FRAME_SIZE).expect_err("too large");
        assert!(matches!(
            error,
            FrameError::FrameTooLarge {
                frame_length,
                max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            } if frame_length == 100 * 1024 * 1024 + 4
        ));

        let largest = u32::MAX.to_be_bytes();
        assert!(matches!(
            check_frame(&largest, DEFAULT_MAX_FRAME_SIZE),
            Err(FrameError::FrameTooLarge { .. })
        ));

        let mut read_buffer = BytesMut::from(&size_only[..]);
        assert!(decode_frame(&mut read_buffer, DEFAULT_MAX_FRAME_SIZE).is_err());
    }

    #[test]
    fn the_maximum_counts_the_size_field_and_is_inclusive() {
        let frame = simple_frame(&ping());
        assert!(matches!(
            check_frame(&frame, frame.len()),
            Ok(FrameCheck::Complete { .. })
        ));
        assert!(matches!(
            check_frame(&frame, frame.len() - 1),
            Err(FrameError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn total_size_too_small_for_a_command_size_is_rejected() {
        for total_size in 0u32..4 {
            let mut bytes = total_size.to_be_bytes().to_vec();
            bytes.extend_from_slice(&[0; 8]);
            assert!(matches!(
                check_frame(&bytes, DEFAULT_MAX_FRAME_SIZE),
                Err(FrameError::FrameTooSmall { .. })
            ));
        }
    }

    #[test]
    fn command_size_beyond_the_frame_is_rejected() {
        let bytes = Bytes::from_static(&[0, 0, 0, 6, 0, 0, 0, 3, 0x08, 0x12]);
        assert!(matches!(
            parse_frame(bytes),
            Err(FrameError::CommandSizeOutOfBounds {
                command_size: 3,
                available: 2
            })
        ));
        let huge = Bytes::from_static(&[0, 0, 0, 6, 0xff, 0xff, 0xff, 0xff, 0x08, 0x12]);
        assert!(matches!(
            parse_frame(huge),
            Err(FrameError::CommandSizeOutOfBounds { .. })
        ));
    }

    #[test]
    fn parse_frame_requires_exactly_one_frame() {
        assert!(matches!(
            parse_frame(Bytes::from_static(&[0, 0, 0])),
            Err(FrameError::Truncated { .. })
        ));
        let mut two_pings = simple_frame(&ping()).to_vec();
        two_pings.extend_from_slice(&simple_frame(&ping()));
        assert!(matches!(
            parse_frame(Bytes::from(two_pings)),
            Err(FrameError::FrameLengthMismatch { .. })
        ));
    }

    #[test]
    fn garbage_command_bytes_are_an_invalid_command() {
        // Wire type 7 does not exist.
        let bytes = Bytes::from_static(&[0, 0, 0, 6, 0, 0, 0, 2, 0x0f, 0xff]);
        assert!(matches!(
            parse_frame(bytes),
            Err(FrameError::InvalidCommand(_))
        ));
        // A length-delimited field whose length runs past the command.
        let bytes = Bytes::from_static(&[0, 0, 0, 7, 0, 0, 0, 3, 0x12, 0x7f, 0x00]);
        assert!(matches!(
            parse_frame(bytes),
            Err(FrameError::InvalidCommand(_))
        ));
    }

    #[test]
    fn payload_after_a_simple_command_is_rejected() {
        let mut bytes = simple_frame(&ping()).to_vec();
        bytes.extend_from_slice(b"junk");
        let total_size = u32::try_from(bytes.len() - 4).expect("fits");
        bytes[..4].copy_from_slice(&total_size.to_be_bytes());
        assert!(matches!(
            parse_frame(Bytes::from(bytes)),
            Err(FrameError::UnexpectedPayload {
                payload_length: 4,
                ..
            })
        ));
    }

    #[test]
    fn send_without_payload_is_rejected() {
        let command = BaseCommand {
            r#type: CommandType::Send as i32,
            send: Some(send_command(1)),
            ..BaseCommand::default()
        };
        assert!(matches!(
            parse_frame(simple_frame(&command)),
            Err(FrameError::MissingPayload { command_type: 6 })
        ));
    }

    #[test]
    fn a_bad_entry_keeps_the_command_for_the_reply() {
        let command = BaseCommand {
            r#type: CommandType::Send as i32,
            send: Some(send_command(77)),
            ..BaseCommand::default()
        };
        // Metadata size 1000 with 2 bytes behind it.
        let entry = Bytes::from_static(&[0, 0, 0x03, 0xe8, 1, 2]);
        let frame = encode_payload_frame(&command, entry)
            .expect("encode")
            .to_bytes();
        let error = parse_frame(frame).expect_err("bad entry");
        let sequence_id = error
            .command()
            .and_then(|command| command.send.as_ref())
            .map(|send| send.sequence_id);
        assert_eq!(sequence_id, Some(77));
        assert!(matches!(
            error,
            FrameError::InvalidEntry {
                source: crate::EntryError::MetadataSizeOutOfBounds { .. },
                ..
            }
        ));
    }

    #[test]
    fn decoded_payload_shares_the_read_buffer_allocation() {
        let mut read_buffer = BytesMut::new();
        encode_send_frame(send_command(1), &metadata(1), b"no copies please")
            .expect("encode")
            .write_to(&mut read_buffer);
        let buffer_start = read_buffer.as_ptr() as usize;
        let buffer_end = buffer_start + read_buffer.len();
        let frame = decode_frame(&mut read_buffer, DEFAULT_MAX_FRAME_SIZE)
            .expect("decode")
            .expect("complete");
        let payload_command = expect_payload(frame);
        let payload_start = payload_command.entry.payload.as_ptr() as usize;
        let entry_start = payload_command.entry.bytes.as_ptr() as usize;
        assert!((buffer_start..buffer_end).contains(&payload_start));
        assert!((buffer_start..buffer_end).contains(&entry_start));
    }
}
