//! The etcd records of one topic's log (keys relative to the cluster root):
//!
//! | key | value |
//! |---|---|
//! | `logs/<topic>/head` | [`Head`]: the epoch of the last commit, the next entry id, bytes committed |
//! | `logs/<topic>/objects/<first-entry, 20 digits>` | [`ObjectRef`]: where entries `first..=last` lie |
//!
//! Both are written by the same fenced transaction, so the refs of a topic always cover exactly
//! the ids `0..head.next_entry` (or, once manifests exist, from the manifest's end).

use serde::{Deserialize, Serialize};

/// `logs/<topic>/head`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The bundle epoch of the owner that wrote the last commit.
    pub epoch: u64,
    /// The id the next entry of the topic gets.
    pub next_entry: u64,
    /// Bytes of records committed so far (sum of the refs' lengths).
    pub committed_bytes: u64,
}

/// `logs/<topic>/objects/<first-entry>`: one topic's batch in one data object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    /// The data object's key in the object store.
    pub object: String,
    /// Offset and length of the topic's records in the object.
    pub offset: u64,
    pub length: u64,
    pub first_entry: u64,
    pub last_entry: u64,
    /// The bundle epoch the batch was committed under: the ledger id of its positions.
    pub epoch: u64,
}

impl ObjectRef {
    pub fn entry_count(&self) -> u64 {
        self.last_entry - self.first_entry + 1
    }
}

pub fn head_key(topic: &str) -> String {
    format!("logs/{topic}/head")
}

pub fn objects_prefix(topic: &str) -> String {
    format!("logs/{topic}/objects/")
}

/// Zero-padded so that the keys of a topic list in entry order.
pub fn object_ref_key(topic: &str, first_entry: u64) -> String {
    format!("{}{first_entry:020}", objects_prefix(topic))
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

pub fn decode<T: for<'a> Deserialize<'a>>(
    key: &str,
    bytes: &[u8],
) -> std::result::Result<T, String> {
    serde_json::from_slice(bytes).map_err(|error| format!("{key} holds bad data: {error}"))
}
