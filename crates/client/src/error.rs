//! The client's errors: one enum, because every public operation can fail for
//! the same handful of reasons (the network, the broker, a timeout, a closed
//! handle) and callers match on the reason, not on the operation.
//!
//! `Error` is `Clone` so that one failure can complete many waiters (every
//! pending send of a producer that was fenced, every request of a connection
//! that dropped). Sources that are not `Clone` are held in an `Arc`.

use std::sync::Arc;
use std::time::Duration;

use meridian_wire::{EncodeError, EntryError, FrameError, ServerError};

/// What went wrong.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The service URL is not `pulsar://host[:port][,host[:port]...]`.
    #[error("invalid service URL {url:?}: {reason}")]
    InvalidServiceUrl { url: String, reason: &'static str },

    /// The topic name cannot be normalised to `domain://tenant/namespace/topic`.
    #[error("invalid topic name {topic:?}: {reason}")]
    InvalidTopicName { topic: String, reason: &'static str },

    /// A builder was given settings that do not go together.
    #[error("invalid configuration: {0}")]
    InvalidConfiguration(String),

    /// The TCP connection to a broker could not be opened.
    #[error("cannot connect to {address}")]
    Connect {
        address: String,
        #[source]
        source: Arc<std::io::Error>,
    },

    /// The TLS settings cannot be used, or the TLS handshake failed (the server's certificate
    /// is not trusted or does not name the host, the server refused ours).
    #[error("TLS with {address}: {reason}")]
    Tls { address: String, reason: String },

    /// Reading from or writing to an open connection failed.
    #[error("I/O error on the connection to {address}")]
    Io {
        address: String,
        #[source]
        source: Arc<std::io::Error>,
    },

    /// The broker sent bytes that are not a valid frame; the connection is closed.
    #[error("undecodable frame from {address}")]
    Frame {
        address: String,
        #[source]
        source: Arc<FrameError>,
    },

    /// The broker broke the protocol in a way the frame decoder cannot see (a
    /// missing reply body, a handshake answered with something else, a
    /// consumer flooded beyond its permits).
    #[error("protocol violation by {address}: {reason}")]
    Protocol { address: String, reason: String },

    /// A command could not be encoded (it would not fit a 32-bit size field).
    #[error("cannot encode a command")]
    Encode(#[source] Arc<EncodeError>),

    /// The connection closed before the operation completed.
    #[error("the connection to {address} is closed")]
    Disconnected { address: String },

    /// A request got no answer in time.
    #[error("{operation} got no answer within {timeout:?}")]
    Timeout {
        operation: &'static str,
        timeout: Duration,
    },

    /// The broker refused: an ERROR reply, a failed lookup, a SEND_ERROR.
    #[error("broker error {code:?}: {message}")]
    Server { code: ServerError, message: String },

    /// Lookup redirects did not end at a broker that owns the topic.
    #[error("lookup of {topic} was redirected more than {max_redirects} times")]
    TooManyRedirects { topic: String, max_redirects: u32 },

    /// The message (or a batch holding only it) exceeds the broker's limit.
    #[error("message of {size} bytes exceeds the broker's maximum of {max_size} bytes")]
    MessageTooLarge { size: usize, max_size: usize },

    /// The message was not acknowledged by the broker within the send timeout.
    #[error("send to {topic} (sequence id {sequence_id}) timed out after {timeout:?}")]
    SendTimeout {
        topic: String,
        sequence_id: u64,
        timeout: Duration,
    },

    /// The producer was closed, or failed for good, before the message was sent.
    #[error("the producer for {topic} is closed")]
    ProducerClosed { topic: String },

    /// The consumer or reader was closed, or failed for good.
    #[error("the consumer of {topic} is closed")]
    ConsumerClosed { topic: String },

    /// A compressed payload could not be compressed or decompressed.
    #[error("{codec} payload: {reason}")]
    Compression { codec: &'static str, reason: String },

    /// An entry delivered by the broker could not be taken apart.
    #[error("invalid entry from {topic}")]
    Entry {
        topic: String,
        #[source]
        source: Arc<EntryError>,
    },

    /// The topic was terminated and everything in it has been received.
    #[error("reached the end of topic {topic}")]
    EndOfTopic { topic: String },

    /// The operation is not allowed for this consumer or producer.
    #[error("not allowed: {0}")]
    NotAllowed(String),
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The broker's error code, for errors the broker reported.
    pub fn server_error(&self) -> Option<ServerError> {
        match self {
            Error::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// A broker error from the raw numbers of an ERROR or *_RESPONSE command.
    pub(crate) fn server(code: i32, message: impl Into<String>) -> Error {
        Error::Server {
            code: ServerError::try_from(code).unwrap_or(ServerError::UnknownError),
            message: message.into(),
        }
    }

    /// Whether retrying (after a fresh lookup and a new connection) can help.
    ///
    /// Transport failures and timeouts are retryable, and so are broker
    /// errors that describe a passing state (a broker that is not ready, a
    /// producer or consumer name that the broker has not yet released). Errors
    /// about the request itself (authorisation, names, schemas, fencing, a
    /// terminated topic) are not: they would fail the same way again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. }
            | Error::Io { .. }
            | Error::Frame { .. }
            | Error::Protocol { .. }
            | Error::Disconnected { .. }
            | Error::Timeout { .. }
            | Error::TooManyRedirects { .. } => true,
            Error::Server { code, .. } => !matches!(
                code,
                ServerError::AuthenticationError
                    | ServerError::AuthorizationError
                    | ServerError::UnsupportedVersionError
                    | ServerError::InvalidTopicName
                    | ServerError::IncompatibleSchema
                    | ServerError::TopicTerminatedError
                    | ServerError::ProducerFenced
                    | ServerError::NotAllowedError
                    | ServerError::ProducerBlockedQuotaExceededException
            ),
            _ => false,
        }
    }

    pub(crate) fn encode(source: EncodeError) -> Error {
        Error::Encode(Arc::new(source))
    }
}
