//! The etcd records of one topic's log (keys relative to the cluster root):
//!
//! | key | value |
//! |---|---|
//! | `logs/<topic>/head` | [`Head`]: the epoch of the last commit, the next entry id, bytes committed, the newest manifest |
//! | `logs/<topic>/objects/<first-entry, 20 digits>` | [`ObjectRef`]: where entries `first..=last` lie |
//! | `deleted/<topic>` | [`Deleted`]: where a log created again after a deletion starts |
//!
//! Both are written by the same fenced transaction. Once a topic's `objects/` keys pass the
//! manifest threshold, their refs are written to a [`Manifest`] object
//! (`manifests/<topic>/...json` in the bucket, never overwritten) and one fenced transaction
//! deletes the keys and points the head at it. Each manifest names the one before it, so a
//! topic's index is: the chain of manifests from the head's, oldest first, then the
//! `objects/` keys, together covering exactly the ids `head.first_entry..head.next_entry`
//! (`first_entry` is 0 until the log is trimmed; a chain walk stops at the first manifest that
//! ends before it).

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
    /// The newest manifest: it and the ones it chains to hold the refs of every entry before
    /// the first `objects/` key. Absent in heads written before manifests existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<ManifestRef>,
    /// The first entry still in the log: the index covers `first_entry..next_entry`; what
    /// came before was trimmed (its refs deleted, its manifests cut from the chain).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub first_entry: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// Where a [`Manifest`] is, and what it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRef {
    /// The manifest object's key in the object store.
    pub object: String,
    /// The first entry of the manifest's first ref and the last entry of its last ref.
    pub first_entry: u64,
    pub last_entry: u64,
    /// Refs in the manifest (not counting those of the manifests it chains to).
    pub refs: u64,
}

/// `manifests/<topic>/...json`: the refs of consecutive entries, moved out of etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version, [`MANIFEST_FORMAT`].
    pub format: u32,
    pub topic: String,
    /// The manifest before this one (it covers the entries before `refs[0].first_entry`).
    pub previous: Option<ManifestRef>,
    /// Refs in entry order, each following the one before without a gap.
    pub refs: Vec<ObjectRef>,
}

/// The only manifest format this engine writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

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

/// `deleted/<topic>`: [`Deleted`], written when a topic's log is deleted (with the deletion of
/// its head), so that a topic created again under the same name numbers its entries after the
/// deleted one's: its entry ids, and so its message ids and the origin positions other clusters
/// know it by, never repeat an earlier life's.
pub fn deleted_key(topic: &str) -> String {
    format!("deleted/{topic}")
}

/// The value of [`deleted_key`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// The next entry id of the deleted log: a new log of the topic starts there.
    pub next_entry: u64,
}

pub fn objects_prefix(topic: &str) -> String {
    format!("logs/{topic}/objects/")
}

/// Zero-padded so that the keys of a topic list in entry order.
pub fn object_ref_key(topic: &str, first_entry: u64) -> String {
    format!("{}{first_entry:020}", objects_prefix(topic))
}

/// The object-store prefix of everything `cluster` writes: `<cluster name>/` under the
/// storage URL's prefix, so that clusters sharing a bucket never see (nor sweep) each other's
/// objects.
pub fn cluster_prefix(cluster: &meridian_etcd::Cluster) -> String {
    // The root is `/meridian/<name>/`, and a cluster name holds no '/'.
    let name = cluster.root().trim_end_matches('/').rsplit('/').next();
    format!("{}/", name.unwrap_or_default())
}

/// The object-store prefix of the data objects of a cluster's brokers.
pub fn data_prefix(cluster_prefix: &str) -> String {
    format!("{cluster_prefix}data/")
}

/// The object-store prefix of every manifest of a cluster.
pub fn all_manifests_prefix(cluster_prefix: &str) -> String {
    format!("{cluster_prefix}manifests/")
}

/// The object-store prefix of `topic`'s manifests.
pub fn manifests_prefix(cluster_prefix: &str, topic: &str) -> String {
    format!(
        "{}{}/",
        all_manifests_prefix(cluster_prefix),
        escape_topic(topic)
    )
}

/// A new manifest's key: never one written before (the owner's epoch and the time in
/// nanoseconds follow the `(first, last)` entries it covers), so no object is overwritten.
pub fn manifest_key(
    cluster_prefix: &str,
    topic: &str,
    entries: (u64, u64),
    epoch: u64,
    nanos: u64,
) -> String {
    let (first_entry, last_entry) = entries;
    format!(
        "{}{first_entry:020}-{last_entry:020}-{epoch}-{nanos}.json",
        manifests_prefix(cluster_prefix, topic)
    )
}

/// A topic name as one path segment of an object key: bytes outside `[A-Za-z0-9._-]` as
/// `%XX` (topic names hold `/` and `:`, which some stores normalise in keys).
fn escape_topic(topic: &str) -> String {
    let mut escaped = String::with_capacity(topic.len());
    for byte in topic.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-') {
            escaped.push(byte as char);
        } else {
            escaped.push_str(&format!("%{byte:02X}"));
        }
    }
    escaped
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
