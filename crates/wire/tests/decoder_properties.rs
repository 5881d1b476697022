//! Property tests of the decoder through the public API: no input panics it,
//! and every frame it encodes decodes back to the same values; and of the hand-written MESSAGE
//! encoder against prost's.

use bytes::{Bytes, BytesMut};
use meridian_wire::proto::{
    command_ack, BrokerEntryMetadata, CommandAck, CommandFlow, CommandMessage, CommandSend,
    KeyLongValue, KeyValue, SingleMessageMetadata,
};
use meridian_wire::{
    batch_messages, check_frame, decode_frame, decode_frame_or_ack, decode_frame_or_ack_reusing,
    encode_command, encode_entry, encode_entry_without_checksum, encode_message_frame,
    encode_payload_frame, encode_send_frame, entry_metadata, entry_metadata_fields,
    prepend_broker_entry_metadata, BaseCommand, ChecksumStatus, CommandType, Decoded, EntryError,
    Frame, FrameCheck, MessageIdData, MessageMetadata, DEFAULT_MAX_FRAME_SIZE,
};
use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message;

/// Decodes every frame in `bytes` until the decoder needs more or fails, and
/// walks into batch payloads, as a broker would. Returns how many frames
/// decoded.
fn decode_everything(bytes: &[u8], max_frame_size: usize) -> usize {
    let mut buffer = BytesMut::from(bytes);
    let mut decoded = 0;
    while let Ok(Some(frame)) = decode_frame(&mut buffer, max_frame_size) {
        decoded += 1;
        if let Frame::Payload(payload_command) = frame {
            let entry = payload_command.entry;
            if let Ok(messages) = batch_messages(&entry.metadata, entry.payload) {
                for message in messages.take(10_000) {
                    let _ = message;
                }
            }
        }
    }
    decoded
}

/// A frame header with a truthful total size in front of arbitrary bytes, so
/// that the decoder goes past the size check into the command and entry.
fn with_valid_total_size(body: &[u8]) -> Vec<u8> {
    let total_size = u32::try_from(body.len()).expect("test bodies are small");
    let mut frame = total_size.to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

fn send_command(sequence_id: u64) -> BaseCommand {
    BaseCommand {
        r#type: CommandType::Send as i32,
        send: Some(CommandSend {
            producer_id: 1,
            sequence_id,
            ..CommandSend::default()
        }),
        ..BaseCommand::default()
    }
}

/// A spare ACK for [`decode_frame_or_ack_reusing`] with every field set, as one decoded by
/// prost could be: none of it may show in the next ACK decoded into it.
fn dirty_spare() -> CommandAck {
    CommandAck {
        consumer_id: 77,
        ack_type: command_ack::AckType::Cumulative as i32,
        message_id: vec![
            MessageIdData {
                ledger_id: 9,
                entry_id: 8,
                partition: Some(3),
                batch_index: Some(2),
                ack_set: vec![-1, 5],
                batch_size: Some(64),
                ..MessageIdData::default()
            };
            3
        ],
        validation_error: Some(1),
        properties: vec![KeyLongValue {
            key: "k".to_string(),
            value: 1,
        }],
        txnid_least_bits: Some(4),
        txnid_most_bits: Some(5),
        request_id: Some(6),
    }
}

/// Decodes every frame in `bytes` with [`decode_frame`], [`decode_frame_or_ack`] and
/// [`decode_frame_or_ack_reusing`] (each ACK given back as the next one's spare, as the broker's
/// connection does, starting from [`dirty_spare`]) and checks that they agree, frame by frame
/// and error for error (by message: `FrameError` has no `PartialEq`). Returns how many frames
/// came back as an ACK alone.
fn both_decoders_agree(bytes: &[u8]) -> Result<usize, TestCaseError> {
    let mut plain = BytesMut::from(bytes);
    let mut fast = BytesMut::from(bytes);
    let mut reusing = BytesMut::from(bytes);
    let mut spare = Some(dirty_spare());
    let mut acks = 0;
    loop {
        let expected = decode_frame(&mut plain, DEFAULT_MAX_FRAME_SIZE);
        let actual = decode_frame_or_ack(&mut fast, DEFAULT_MAX_FRAME_SIZE);
        let reused = decode_frame_or_ack_reusing(&mut reusing, DEFAULT_MAX_FRAME_SIZE, &mut spare);
        match (expected, actual, reused) {
            (Ok(None), Ok(None), Ok(None)) => return Ok(acks),
            (Ok(Some(expected)), Ok(Some(actual)), Ok(Some(reused))) => {
                acks += usize::from(matches!(actual, Decoded::Ack(_)));
                prop_assert_eq!(&expected, &actual.into_frame());
                match reused {
                    Decoded::Ack(ack) => {
                        prop_assert_eq!(&expected, &Decoded::Ack(ack.clone()).into_frame());
                        spare = Some(ack);
                    }
                    other => prop_assert_eq!(&expected, &other.into_frame()),
                }
            }
            (Err(expected), Err(actual), Err(reused)) => {
                prop_assert_eq!(expected.to_string(), actual.to_string());
                prop_assert_eq!(expected.to_string(), reused.to_string());
                return Ok(acks);
            }
            (expected, actual, reused) => {
                prop_assert!(
                    false,
                    "decode_frame gave {:?}, decode_frame_or_ack {:?}, decode_frame_or_ack_reusing {:?}",
                    expected,
                    actual,
                    reused
                );
            }
        }
        prop_assert_eq!(&plain[..], &fast[..]);
        prop_assert_eq!(&plain[..], &reusing[..]);
    }
}

fn ack_command(
    consumer_id: u64,
    cumulative: bool,
    ids: Vec<(u64, u64, Option<i32>, Vec<i64>)>,
    request_id: Option<u64>,
    partition: Option<i32>,
    txnid: Option<u64>,
) -> BaseCommand {
    let ack_type = if cumulative {
        command_ack::AckType::Cumulative
    } else {
        command_ack::AckType::Individual
    };
    BaseCommand {
        r#type: CommandType::Ack as i32,
        ack: Some(CommandAck {
            consumer_id,
            ack_type: ack_type as i32,
            message_id: ids
                .into_iter()
                .map(
                    |(ledger_id, entry_id, batch_index, ack_set)| MessageIdData {
                        ledger_id,
                        entry_id,
                        batch_index,
                        batch_size: batch_index.map(|_| 128),
                        ack_set,
                        partition,
                        ..MessageIdData::default()
                    },
                )
                .collect(),
            request_id,
            txnid_least_bits: txnid,
            ..CommandAck::default()
        }),
        ..BaseCommand::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// ACK frames as clients send them come back as their ACK alone, and the same as through
    /// `decode_frame` (with a transaction id too, which the hand decoder leaves to prost); so do
    /// the same frames with a byte flipped, a field added (FLOW), the fields swapped, and the
    /// ACK of a frame with another command type.
    #[test]
    fn ack_frames_decode_alone_and_as_decode_frame_has_them(
        consumer_id in any::<u64>(),
        cumulative in any::<bool>(),
        ids in vec((any::<u64>(), any::<u64>(), prop::option::of(0i32..128), vec(any::<i64>(), 0..3)), 0..4),
        request_id in prop::option::of(any::<u64>()),
        partition in prop::option::of(any::<i32>()),
        txnid in prop::option::of(any::<u64>()),
        flip_position in any::<prop::sample::Index>(),
        flip_mask in 1u8..=255,
    ) {
        let command = ack_command(consumer_id, cumulative, ids, request_id, partition, txnid);
        let mut stream = BytesMut::new();
        encode_command(&command, &mut stream).expect("encode");
        let frame = stream.to_vec();
        prop_assert_eq!(both_decoders_agree(&frame)?, 1);

        let mut flipped = frame.clone();
        let position = flip_position.index(flipped.len());
        flipped[position] ^= flip_mask;
        both_decoders_agree(&flipped)?;

        let with_flow = BaseCommand {
            flow: Some(CommandFlow { consumer_id, message_permits: 1 }),
            ..command.clone()
        };
        let mut stream = BytesMut::new();
        encode_command(&with_flow, &mut stream).expect("encode");
        prop_assert_eq!(both_decoders_agree(&stream)?, 0);

        // The `ack` field before `type`: the same command to a protobuf decoder.
        let mut swapped = Vec::new();
        prost::encoding::message::encode(10, command.ack.as_ref().expect("an ack"), &mut swapped);
        prost::encoding::int32::encode(1, &command.r#type, &mut swapped);
        let mut reordered = u32::try_from(swapped.len() + 4).expect("small").to_be_bytes().to_vec();
        reordered.extend_from_slice(&u32::try_from(swapped.len()).expect("small").to_be_bytes());
        reordered.extend_from_slice(&swapped);
        prop_assert_eq!(both_decoders_agree(&reordered)?, 1);

        let flow_typed = BaseCommand { r#type: CommandType::Flow as i32, ..command };
        let mut stream = BytesMut::new();
        encode_command(&flow_typed, &mut stream).expect("encode");
        prop_assert_eq!(both_decoders_agree(&stream)?, 0);
    }

    /// An ack set may come packed (one length-delimited field) as well as one field per word.
    #[test]
    fn packed_ack_sets_decode_alike(
        ledger_id in any::<u64>(),
        entry_id in any::<u64>(),
        ack_set in vec(any::<i64>(), 0..4),
    ) {
        let mut message_id = Vec::new();
        prost::encoding::uint64::encode(1, &ledger_id, &mut message_id);
        prost::encoding::uint64::encode(2, &entry_id, &mut message_id);
        prost::encoding::int64::encode_packed(5, &ack_set, &mut message_id);
        let mut ack = Vec::new();
        prost::encoding::uint64::encode(1, &7, &mut ack);
        prost::encoding::int32::encode(2, &0, &mut ack);
        prost::encoding::bytes::encode(3, &message_id, &mut ack);
        let mut command = Vec::new();
        prost::encoding::int32::encode(1, &(CommandType::Ack as i32), &mut command);
        prost::encoding::bytes::encode(10, &ack, &mut command);
        let mut frame = u32::try_from(command.len() + 4).expect("small").to_be_bytes().to_vec();
        frame.extend_from_slice(&u32::try_from(command.len()).expect("small").to_be_bytes());
        frame.extend_from_slice(&command);
        prop_assert_eq!(both_decoders_agree(&frame)?, 1);
    }

    #[test]
    fn random_frame_bodies_decode_alike_with_the_ack_path(body in vec(any::<u8>(), 0..256)) {
        // Half of them start like an ACK command, so the fast path's own checks are reached.
        let mut ack_like = vec![0, 0, 0, 0, 0x08, 0x0a, 0x52];
        ack_like.extend_from_slice(&body);
        let command_size = u32::try_from(ack_like.len() - 4).expect("small");
        ack_like[..4].copy_from_slice(&command_size.to_be_bytes());
        both_decoders_agree(&with_valid_total_size(&ack_like))?;
        both_decoders_agree(&with_valid_total_size(&body))?;
    }

    #[test]
    fn random_bytes_never_panic(
        bytes in vec(any::<u8>(), 0..1_024),
        max_frame_size in prop_oneof![Just(DEFAULT_MAX_FRAME_SIZE), 0usize..2_048],
    ) {
        decode_everything(&bytes, max_frame_size);
    }

    #[test]
    fn random_frame_bodies_never_panic(body in vec(any::<u8>(), 0..1_024)) {
        decode_everything(&with_valid_total_size(&body), DEFAULT_MAX_FRAME_SIZE);
    }

    #[test]
    fn random_entries_after_a_send_never_panic(
        entry in vec(any::<u8>(), 1..1_024),
        checksum_magic in any::<bool>(),
    ) {
        let mut entry = entry;
        if checksum_magic && entry.len() >= 2 {
            entry[0] = 0x0e;
            entry[1] = 0x01;
        }
        let frame = encode_payload_frame(&send_command(1), Bytes::from(entry))
            .expect("encode")
            .to_bytes();
        decode_everything(&frame, DEFAULT_MAX_FRAME_SIZE);
    }

    /// The metadata read in place (`entry_metadata_fields`, dispatch's path) is what the
    /// whole parse of the entry reads, with or without the broker's and the producer's blocks,
    /// and a cut or damaged entry is refused by both; only the broker's block is skipped in
    /// place without being decoded.
    #[test]
    fn metadata_read_in_place_is_what_the_whole_parse_reads(
        producer_name in "[a-z]{0,12}",
        sequence_id in any::<u64>(),
        partition_key in prop::option::of("[a-z0-9]{0,16}"),
        ordering_key in prop::option::of(vec(any::<u8>(), 0..16)),
        num_messages in prop::option::of(1..1_000_i32),
        payload in vec(any::<u8>(), 0..64),
        checksum in any::<bool>(),
        broker_index in prop::option::of(any::<u64>()),
        cut in prop::option::of(0..256_usize),
        flip in prop::option::of((0..256_usize, 1..=255_u8)),
    ) {
        let metadata = MessageMetadata {
            producer_name,
            sequence_id,
            partition_key,
            ordering_key: ordering_key.map(Bytes::from),
            num_messages_in_batch: num_messages,
            ..MessageMetadata::default()
        };
        let entry = if checksum {
            encode_entry(&metadata, &payload)
        } else {
            encode_entry_without_checksum(&metadata, &payload)
        }
        .expect("encode");
        let entry = match broker_index {
            Some(index) => prepend_broker_entry_metadata(
                &BrokerEntryMetadata { index: Some(index), ..BrokerEntryMetadata::default() },
                &entry,
            )
            .expect("prepend"),
            None => entry,
        };
        let mut entry = entry.to_vec();
        if let Some(cut) = cut {
            entry.truncate(cut);
        }
        if let Some((at, bits)) = flip {
            if let Some(byte) = entry.get_mut(at) {
                *byte ^= bits;
            }
        }
        let in_place = entry_metadata_fields::<MessageMetadata>(&entry);
        let mut whole = entry_metadata(Bytes::from(entry.clone()));
        if let Err(EntryError::InvalidBrokerEntryMetadata(_)) = whole {
            // The broker's block is skipped, not decoded, in place: what follows it must be
            // read alike.
            let size = u32::from_be_bytes(entry[2..6].try_into().expect("4 bytes")) as usize;
            whole = entry_metadata(Bytes::copy_from_slice(&entry[6 + size..]));
        }
        match (&in_place, &whole) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            _ => prop_assert!(false, "in place {:?}, whole parse {:?}", in_place, whole),
        }
        if cut.is_none() && flip.is_none() {
            prop_assert_eq!(in_place.expect("whole entry"), metadata);
        }
    }

    #[test]
    fn random_batch_payloads_never_panic(
        payload in vec(any::<u8>(), 0..1_024),
        count in any::<i32>(),
    ) {
        let metadata = MessageMetadata {
            num_messages_in_batch: Some(count),
            ..MessageMetadata::default()
        };
        if let Ok(messages) = batch_messages(&metadata, Bytes::from(payload)) {
            for message in messages.take(10_000) {
                let _ = message;
            }
        }
    }

    #[test]
    fn send_frames_round_trip_and_flips_never_panic(
        sequence_id in any::<u64>(),
        producer_name in "[a-z0-9.-]{0,24}",
        properties in vec(("[a-z]{1,8}", "[ -~]{0,16}"), 0..4),
        payload in vec(any::<u8>(), 0..512),
        flip_position in any::<prop::sample::Index>(),
        flip_mask in 1u8..=255,
    ) {
        let metadata = MessageMetadata {
            producer_name,
            sequence_id,
            publish_time: 1_700_000_000_000,
            properties: properties
                .into_iter()
                .map(|(key, value)| KeyValue { key, value })
                .collect(),
            ..MessageMetadata::default()
        };
        let send = CommandSend { producer_id: 9, sequence_id, ..CommandSend::default() };
        let frame = encode_send_frame(send.clone(), &metadata, &payload)
            .expect("encode")
            .to_bytes();

        let mut buffer = BytesMut::from(&frame[..]);
        let decoded = decode_frame(&mut buffer, DEFAULT_MAX_FRAME_SIZE)
            .expect("decode")
            .expect("complete");
        let Frame::Payload(payload_command) = decoded else {
            panic!("a SEND decodes as a payload frame");
        };
        prop_assert_eq!(payload_command.command.send, Some(send));
        prop_assert_eq!(&payload_command.entry.metadata, &metadata);
        prop_assert_eq!(&payload_command.entry.payload[..], &payload[..]);
        prop_assert_eq!(payload_command.entry.checksum, ChecksumStatus::Verified);

        let mut flipped = frame.to_vec();
        let position = flip_position.index(flipped.len());
        flipped[position] ^= flip_mask;
        decode_everything(&flipped, DEFAULT_MAX_FRAME_SIZE);
    }

    #[test]
    fn check_never_reports_complete_before_the_last_byte(
        payload in vec(any::<u8>(), 0..256),
        split_position in any::<prop::sample::Index>(),
    ) {
        let metadata = MessageMetadata { producer_name: "p".to_owned(), ..MessageMetadata::default() };
        let frame = encode_send_frame(CommandSend::default(), &metadata, &payload)
            .expect("encode")
            .to_bytes();
        let split = split_position.index(frame.len());
        match check_frame(&frame[..split], DEFAULT_MAX_FRAME_SIZE).expect("check") {
            FrameCheck::Incomplete { bytes_needed } => {
                prop_assert!(bytes_needed > 0 && split + bytes_needed <= frame.len());
            }
            FrameCheck::Complete { .. } => prop_assert!(false, "complete at {}", split),
        }
    }

    #[test]
    fn batches_round_trip(bodies in vec(vec(any::<u8>(), 0..64), 1..16)) {
        let mut payload = Vec::new();
        for body in &bodies {
            let single = SingleMessageMetadata {
                payload_size: i32::try_from(body.len()).expect("small"),
                ..SingleMessageMetadata::default()
            };
            let encoded = single.encode_to_vec();
            payload.extend_from_slice(&u32::try_from(encoded.len()).expect("small").to_be_bytes());
            payload.extend_from_slice(&encoded);
            payload.extend_from_slice(body);
        }
        let metadata = MessageMetadata {
            num_messages_in_batch: Some(i32::try_from(bodies.len()).expect("small")),
            ..MessageMetadata::default()
        };
        let messages: Vec<_> = batch_messages(&metadata, Bytes::from(payload))
            .expect("a batch")
            .collect::<Result<_, _>>()
            .expect("valid");
        let decoded: Vec<Vec<u8>> = messages.iter().map(|message| message.payload.to_vec()).collect();
        prop_assert_eq!(decoded, bodies);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    /// The MESSAGE frame written field by field is, byte for byte, the frame prost writes for
    /// `BaseCommand { type: MESSAGE, message }` in front of the same entry, with commands long
    /// enough for lengths of two and three bytes (a batch's ack set, a chunk's first id); the
    /// expected sizes are written here, not by the encoder's helper.
    #[test]
    fn message_frames_are_what_prost_writes(
        consumer_id in any::<u64>(),
        ledger_id in any::<u64>(),
        entry_id in any::<u64>(),
        partition in prop::option::of(any::<i32>()),
        batch_index in prop::option::of(any::<i32>()),
        batch_size in prop::option::of(any::<i32>()),
        id_ack_set in vec(any::<i64>(), 0..4),
        first_chunk in prop::option::of((any::<u64>(), any::<u64>())),
        redelivery_count in prop::option::of(any::<u32>()),
        ack_set in prop_oneof![vec(any::<i64>(), 0..4), vec(any::<i64>(), 0..2_000)],
        consumer_epoch in prop::option::of(any::<u64>()),
        entry in vec(any::<u8>(), 0..64),
    ) {
        let message = CommandMessage {
            consumer_id,
            message_id: MessageIdData {
                ledger_id,
                entry_id,
                partition,
                batch_index,
                batch_size,
                ack_set: id_ack_set,
                first_chunk_message_id: first_chunk.map(|(ledger_id, entry_id)| {
                    Box::new(MessageIdData { ledger_id, entry_id, ..MessageIdData::default() })
                }),
            },
            redelivery_count,
            ack_set,
            consumer_epoch,
        };
        let entry = Bytes::from(entry);
        let by_hand = encode_message_frame(message.clone(), entry.clone()).expect("encode");
        let command = BaseCommand {
            r#type: CommandType::Message as i32,
            message: Some(message),
            ..BaseCommand::default()
        }
        .encode_to_vec();
        let size = |length: usize| u32::try_from(length).expect("small").to_be_bytes();
        let mut header = size(command.len() + 4 + entry.len()).to_vec();
        header.extend_from_slice(&size(command.len()));
        header.extend_from_slice(&command);
        prop_assert_eq!(&by_hand.header[..], &header[..]);
        prop_assert_eq!(by_hand.entry, entry);
    }
}
