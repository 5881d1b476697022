//! Generates the Rust types for `proto/pulsar.proto` with prost.
//!
//! There is no system `protoc` on the build machines, so the compiler comes
//! from the `protoc-bin-vendored` crate, which ships prebuilt binaries inside
//! the crate package itself. It is handed to prost-build directly rather than
//! through the `PROTOC` environment variable, which would need `set_var`.

use std::io;

fn main() -> io::Result<()> {
    let protoc_path = protoc_bin_vendored::protoc_bin_path()
        .map_err(|error| io::Error::other(format!("no vendored protoc for this host: {error}")))?;

    println!("cargo:rerun-if-changed=proto/pulsar.proto");

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_path);
    // `bytes` fields become `bytes::Bytes`, so decoding from a `Bytes` buffer
    // slices instead of copying.
    config.bytes(["."]);
    // The large commands of `BaseCommand` are boxed, so that the envelope is under 1 KiB
    // instead of about 4 KiB (each optional command laid out inline): decoding any frame
    // builds and drops one, and so does building any command to send (issue 16). The commands
    // of every message (SEND, SEND_RECEIPT, MESSAGE, ACK, FLOW) stay inline, which spares them
    // an allocation each, and so do those of 24 bytes or less and
    // REPLICATED_SUBSCRIPTION_STATE_RESPONSE (56 bytes, built by the replication code).
    for field in BOXED_COMMANDS {
        config.boxed(format!(".pulsar.proto.BaseCommand.{field}"));
    }
    config.compile_protos(&["proto/pulsar.proto"], &["proto"])?;
    Ok(())
}

/// The fields of `BaseCommand` generated as `Option<Box<_>>`.
const BOXED_COMMANDS: &[&str] = &[
    "connect",
    "connected",
    "subscribe",
    "producer",
    "send_error",
    "success",
    "error",
    "close_producer",
    "close_consumer",
    "producer_success",
    "redeliver_unacknowledged_messages",
    "partitioned_metadata",
    "partitioned_metadata_response",
    "lookup",
    "lookup_response",
    "consumer_stats_response",
    "seek",
    "get_last_message_id_response",
    "get_topics_of_namespace",
    "get_topics_of_namespace_response",
    "get_schema",
    "get_schema_response",
    "auth_challenge",
    "auth_response",
    "ack_response",
    "get_or_create_schema",
    "get_or_create_schema_response",
    "topic_migrated",
    "replicated_subscription_state",
];
