//! Helpers shared by the storage engine's integration tests (`mod support;` in a test file).
//! Each test file is its own crate and uses only some of them.
#![allow(dead_code)]

pub mod cursors;
pub mod engine;
pub mod entry_wal;
pub mod gated_io;
