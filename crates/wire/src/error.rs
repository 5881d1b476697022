//! Errors of this crate, one enum per job.
//!
//! A [`FrameError`] other than [`FrameError::InvalidEntry`] means the byte
//! stream can no longer be trusted: the connection should be closed. An
//! [`FrameError::InvalidEntry`] means the frame boundaries were sound but the
//! entry inside a SEND was not; the command is attached so that a broker can
//! answer the producer (for example with `SEND_ERROR`) and read on.

use crate::proto::BaseCommand;

/// A frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The declared frame (including its 4-byte size field) is larger than
    /// the caller's limit. Raised before any of the body is read.
    #[error("frame of {frame_length} bytes exceeds the maximum of {max_frame_size} bytes")]
    FrameTooLarge {
        frame_length: u64,
        max_frame_size: usize,
    },

    /// The frame's total size cannot even hold the command size field.
    #[error(
        "frame total size {total_size} is too small to hold a command size (needs at least 4)"
    )]
    FrameTooSmall { total_size: u32 },

    /// [`crate::parse_frame`] was given fewer bytes than a frame header.
    #[error("frame truncated: needs {needed} bytes, {available} available")]
    Truncated { needed: usize, available: usize },

    /// [`crate::parse_frame`] was given a buffer that is not exactly one frame.
    #[error("frame declares {declared_length} bytes but the buffer holds {actual_length}")]
    FrameLengthMismatch {
        declared_length: u64,
        actual_length: usize,
    },

    /// The command size points past the end of the frame.
    #[error("command size {command_size} exceeds the {available} bytes left in the frame")]
    CommandSizeOutOfBounds { command_size: u32, available: usize },

    /// The `BaseCommand` protobuf does not decode.
    #[error("invalid BaseCommand protobuf")]
    InvalidCommand(#[source] prost::DecodeError),

    /// Bytes follow a command that never carries a payload.
    #[error("command type {command_type} is followed by {payload_length} unexpected bytes")]
    UnexpectedPayload {
        command_type: i32,
        payload_length: usize,
    },

    /// A SEND or MESSAGE command without the entry that must follow it.
    #[error("command type {command_type} carries no payload")]
    MissingPayload { command_type: i32 },

    /// The frame was well formed but the entry after its command was not.
    #[error("invalid entry after command type {}", command.r#type)]
    InvalidEntry {
        command: Box<BaseCommand>,
        #[source]
        source: EntryError,
    },
}

impl FrameError {
    /// The decoded command, when the error is confined to the entry after it.
    pub fn command(&self) -> Option<&BaseCommand> {
        match self {
            FrameError::InvalidEntry { command, .. } => Some(command),
            _ => None,
        }
    }
}

/// An entry (the bytes of one SEND, as stored) could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// A fixed-size part of the entry is cut short.
    #[error("entry truncated in the {section}: needs {needed} bytes, {available} available")]
    Truncated {
        section: &'static str,
        needed: usize,
        available: usize,
    },

    /// The broker-entry-metadata size points past the end of the entry.
    #[error("broker entry metadata size {size} exceeds the {available} bytes left in the entry")]
    BrokerEntryMetadataSizeOutOfBounds { size: u32, available: usize },

    /// The `BrokerEntryMetadata` protobuf does not decode.
    #[error("invalid BrokerEntryMetadata protobuf")]
    InvalidBrokerEntryMetadata(#[source] prost::DecodeError),

    /// The metadata size points past the end of the entry.
    #[error("metadata size {metadata_size} exceeds the {available} bytes left in the entry")]
    MetadataSizeOutOfBounds {
        metadata_size: u32,
        available: usize,
    },

    /// The `MessageMetadata` protobuf does not decode.
    #[error("invalid MessageMetadata protobuf")]
    InvalidMetadata(#[source] prost::DecodeError),

    /// Batch iteration was asked of an entry without `num_messages_in_batch`.
    #[error("entry is not a batch (num_messages_in_batch is absent)")]
    NotABatch,

    /// `num_messages_in_batch` is negative.
    #[error("invalid batch message count {count}")]
    InvalidBatchCount { count: i32 },

    /// The batch payload is compressed; it must be decompressed first.
    #[error("batch payload is compressed (compression type {compression})")]
    CompressedBatch { compression: i32 },

    /// The batch payload is encrypted; only the consumer can read it.
    #[error("batch payload is encrypted")]
    EncryptedBatch,

    /// A size inside a batch payload points past its end.
    #[error(
        "batch message {index}: {section} size {declared_size} exceeds the {available} bytes left"
    )]
    BatchMessageOutOfBounds {
        index: u32,
        section: &'static str,
        declared_size: i64,
        available: usize,
    },

    /// A `SingleMessageMetadata` protobuf inside a batch does not decode.
    #[error("batch message {index}: invalid SingleMessageMetadata protobuf")]
    InvalidSingleMessageMetadata {
        index: u32,
        #[source]
        source: prost::DecodeError,
    },
}

/// A frame or entry could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The frame or one of its sections does not fit a 32-bit size field.
    #[error("{section} of {length} bytes does not fit a 32-bit size field")]
    TooLarge {
        section: &'static str,
        length: usize,
    },

    /// prost refused to encode (only possible if the buffer cannot grow).
    #[error("protobuf encoding failed")]
    Protobuf(#[from] prost::EncodeError),
}
