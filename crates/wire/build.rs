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
    config.compile_protos(&["proto/pulsar.proto"], &["proto"])?;
    Ok(())
}
