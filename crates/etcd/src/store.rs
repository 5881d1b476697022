//! [`EtcdStore`]: `meridian_metadata::MetadataStore` on etcd, under one key prefix.
//!
//! - A version is the key's etcd `mod_revision` (it grows on every write, as the trait asks,
//!   but by the whole store's revision, not by one).
//! - `put`/`delete` with an expected version are one transaction each: compare the key's
//!   `mod_revision` (0 for `Absent`), and on failure read the key back in the same transaction to
//!   report the version found.
//! - `watch` is fed by one background thread per store that watches the prefix and resumes from
//!   the revision after the last event it delivered whenever the stream ends or breaks (etcd
//!   restart, endpoint change, the periodic re-open), so a reconnect loses no change. Changes go
//!   to a bounded broadcast channel; a receiver that falls behind sees `Lagged`, as with the
//!   embedded store. Unlike the embedded store, a change is delivered after `put` returns (when
//!   etcd's watch reports it), so a receiver created just after a write may still see it.
//! - If etcd compacted away revisions the watch had not seen yet (only with compaction enabled,
//!   and only after a long disconnection), the changes in that gap cannot be replayed: the thread
//!   logs the gap, sends a [`Change`] with an empty key (changes missed: listeners read again what
//!   they keep, as after `Lagged`) and goes on from the compaction revision.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meridian_metadata::{Change, ExpectedVersion, MetadataError, MetadataStore, Versioned};
use tokio::sync::broadcast;

use crate::client::{Client, Compare, Op, WatchMessage};
use crate::EtcdError;

/// Changes buffered per watcher before it starts missing them (it then sees `Lagged`).
const WATCH_BUFFER: usize = 1024;
/// Keys read per request when listing children.
const LIST_PAGE: usize = 1000;
/// Pause before re-opening a watch that failed, so a down etcd is not hammered.
const WATCH_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// The etcd metadata store. Keys of the trait (`/tenants/public`) live under `prefix`
/// (`/meridian/<cluster>/admin/tenants/public`).
pub struct EtcdStore {
    client: Arc<Client>,
    /// The etcd key prefix without a trailing slash.
    prefix: String,
    changes: broadcast::Sender<Change>,
    /// Tells the watch thread to stop (it notices within `watch_reconnect_interval`).
    stopping: Arc<AtomicBool>,
}

fn store_error(operation: &'static str, error: EtcdError) -> MetadataError {
    MetadataError::Store {
        operation,
        message: error.to_string(),
    }
}

impl EtcdStore {
    /// Opens the store under `prefix` and starts its watch thread from etcd's current revision
    /// (so the first request must reach etcd).
    pub fn open(client: Arc<Client>, prefix: &str) -> crate::Result<Arc<EtcdStore>> {
        let prefix = prefix.trim_end_matches('/').to_string();
        let start = client.revision()? + 1;
        let (changes, _) = broadcast::channel(WATCH_BUFFER);
        let stopping = Arc::new(AtomicBool::new(false));
        let store = Arc::new(EtcdStore {
            client: client.clone(),
            prefix: prefix.clone(),
            changes: changes.clone(),
            stopping: stopping.clone(),
        });
        std::thread::Builder::new()
            .name("etcd-metadata-watch".to_string())
            .spawn(move || watch_loop(&client, &prefix, start, &changes, &stopping))
            .map_err(|error| EtcdError::Config(format!("starting the watch thread: {error}")))?;
        Ok(store)
    }

    fn etcd_key(&self, key: &str) -> String {
        if key.starts_with('/') {
            format!("{}{key}", self.prefix)
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn compare(etcd_key: &str, expected: ExpectedVersion) -> Vec<Compare> {
        match expected {
            ExpectedVersion::Any => Vec::new(),
            ExpectedVersion::Absent => vec![Compare::Absent(etcd_key.to_string())],
            ExpectedVersion::Exactly(version) => {
                vec![Compare::ModRevision(etcd_key.to_string(), version)]
            }
        }
    }

    /// Runs `op` on `key` if its version matches `expected`; returns the revision after.
    fn conditional(
        &self,
        operation: &'static str,
        key: &str,
        op: Op,
        expected: ExpectedVersion,
    ) -> meridian_metadata::Result<u64> {
        let etcd_key = self.etcd_key(key);
        let result = self
            .client
            .txn(
                &Self::compare(&etcd_key, expected),
                &[op],
                &[Op::Get(etcd_key.clone())],
            )
            .map_err(|error| store_error(operation, error))?;
        if result.succeeded {
            return Ok(result.revision);
        }
        let found = result
            .reads
            .first()
            .and_then(|kv| kv.as_ref().map(|kv| kv.mod_revision));
        Err(MetadataError::BadVersion {
            key: key.to_string(),
            expected,
            found,
        })
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
    }
}

impl MetadataStore for EtcdStore {
    fn get(&self, key: &str) -> meridian_metadata::Result<Option<Versioned>> {
        let found = self
            .client
            .get(&self.etcd_key(key))
            .map_err(|error| store_error("get", error))?;
        Ok(found.map(|kv| Versioned {
            value: kv.value,
            version: kv.mod_revision,
        }))
    }

    fn put(
        &self,
        key: &str,
        value: &[u8],
        expected: ExpectedVersion,
    ) -> meridian_metadata::Result<u64> {
        let op = Op::Put {
            key: self.etcd_key(key),
            value: value.to_vec(),
            lease: 0,
        };
        self.conditional("put", key, op, expected)
    }

    fn delete(&self, key: &str, expected: ExpectedVersion) -> meridian_metadata::Result<()> {
        let op = Op::Delete(self.etcd_key(key));
        self.conditional("delete", key, op, expected).map(|_| ())
    }

    fn children(&self, parent: &str) -> meridian_metadata::Result<Vec<String>> {
        let prefix = format!("{}/", self.etcd_key(parent).trim_end_matches('/'));
        let mut names: Vec<String> = Vec::new();
        self.client
            .scan_prefix(&prefix, LIST_PAGE, true, |page| {
                for kv in page {
                    let Some(rest) = kv.key.strip_prefix(&prefix) else {
                        continue;
                    };
                    let child = rest.split('/').next().unwrap_or(rest);
                    if names.last().map(String::as_str) != Some(child) {
                        names.push(child.to_string());
                    }
                }
            })
            .map_err(|error| store_error("list", error))?;
        Ok(names)
    }

    fn watch(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}

/// The watch thread: streams changes under `prefix` from revision `start` into `changes` until
/// `stopping`, re-opening the etcd watch from the revision after the last event delivered.
fn watch_loop(
    client: &Client,
    prefix: &str,
    mut start: u64,
    changes: &broadcast::Sender<Change>,
    stopping: &AtomicBool,
) {
    let watched = format!("{prefix}/");
    while !stopping.load(Ordering::Relaxed) {
        let outcome = client.watch_prefix(&watched, start, |message| {
            match message {
                WatchMessage::Events(events) => {
                    for event in events {
                        start = start.max(event.revision + 1);
                        let Some(key) = event.key.strip_prefix(prefix) else {
                            continue;
                        };
                        // No receiver is not an error: changes are only for those listening.
                        let _ = changes.send(Change {
                            key: key.to_string(),
                            version: (!event.deleted).then_some(event.revision),
                        });
                    }
                }
                WatchMessage::Compacted { compact_revision } => {
                    tracing::warn!(
                        prefix,
                        from = start,
                        to = compact_revision,
                        "etcd compacted revisions the metadata watch had not seen; listeners \
                         read their metadata again"
                    );
                    let _ = changes.send(Change {
                        key: Change::MISSED.to_string(),
                        version: None,
                    });
                    start = compact_revision;
                }
            }
            !stopping.load(Ordering::Relaxed)
        });
        if let Err(error) = outcome {
            tracing::warn!(prefix, resume_from = start, %error, "etcd metadata watch interrupted");
            std::thread::sleep(WATCH_RETRY_PAUSE);
        }
    }
}
