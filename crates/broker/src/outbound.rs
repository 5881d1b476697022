//! Frames the broker hands to a connection's writer.

use bytes::{Bytes, BytesMut};
use meridian_wire::encode::PayloadFrame;
use meridian_wire::{encode_command, BaseCommand};
use tokio::sync::mpsc;

/// One frame to write to a client, already encoded.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A simple command frame.
    Frame(Bytes),
    /// A MESSAGE: a fresh header in front of a stored entry (never copied).
    Payload(PayloadFrame),
}

/// Where a connection's frames go. Bounded: a slow client makes its senders wait.
pub type OutboundSender = mpsc::Sender<Outbound>;

/// Encodes a simple command frame. Commands built by the broker always encode.
pub fn command_frame(command: &BaseCommand) -> Outbound {
    let mut buffer = BytesMut::new();
    if let Err(error) = encode_command(command, &mut buffer) {
        tracing::error!(%error, "encoding a command failed");
    }
    Outbound::Frame(buffer.freeze())
}
