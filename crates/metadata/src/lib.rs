//! Meridian's metadata store: cluster, tenant, namespace, partitioned-topic and schema records.
//!
//! Metadata is a tree of path-like keys (`/schemas/public/default/orders/0`), each holding opaque
//! bytes and a version that increases on every write. [`MetadataStore`] is the seam: the
//! embedded [`EmbeddedStore`] (a `redb` database file, ACID and crash-safe) is the standalone
//! default; the trait is shaped so that an etcd implementation can follow (versions map to etcd
//! mod revisions, `put` with an expected version to a transaction, watches to etcd watches).

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

const TABLE: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("metadata");
/// Changes buffered per watcher before it starts missing them (it then sees `Lagged`).
const WATCH_BUFFER: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata key {key} was changed concurrently (expected version {expected:?}, found {found:?})")]
    BadVersion {
        key: String,
        expected: ExpectedVersion,
        found: Option<u64>,
    },
    #[error("metadata key {0} does not exist")]
    NotFound(String),
    #[error("metadata store failure on {operation}: {message}")]
    Store {
        operation: &'static str,
        message: String,
    },
}

pub type Result<T, E = MetadataError> = std::result::Result<T, E>;

/// A condition on the current version of a key, checked atomically with a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    Any,
    /// The key must not exist.
    Absent,
    Exactly(u64),
}

/// A value with its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub version: u64,
}

/// A change notification: `key` was written (`Some(version)`) or deleted (`None`). An empty
/// `key` ([`Change::MISSED`]) says that changes were missed and cannot be told one by one (etcd
/// compacted them away before a watch that was cut off saw them): a listener reads again what
/// it keeps, as after `Lagged`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub version: Option<u64>,
}

impl Change {
    /// The key of a change that stands for changes missed.
    pub const MISSED: &'static str = "";

    /// Whether this stands for changes missed rather than one change.
    pub fn is_missed(&self) -> bool {
        self.key == Self::MISSED
    }
}

/// Versioned key-value metadata with prefix listing and change notifications.
pub trait MetadataStore: Send + Sync {
    fn get(&self, key: &str) -> Result<Option<Versioned>>;
    /// Writes `value` if the key's current version matches; returns the new version.
    fn put(&self, key: &str, value: &[u8], expected: ExpectedVersion) -> Result<u64>;
    /// Deletes the key if its current version matches. Deleting a missing key with
    /// `ExpectedVersion::Any` is not an error.
    fn delete(&self, key: &str, expected: ExpectedVersion) -> Result<()>;
    /// Names of the direct children of `parent` (`/a` has child `b` if `/a/b` or `/a/b/...` exists).
    fn children(&self, parent: &str) -> Result<Vec<String>>;
    /// Every change from now on.
    fn watch(&self) -> broadcast::Receiver<Change>;
}

/// The embedded store: one `redb` file.
pub struct EmbeddedStore {
    database: Database,
    changes: broadcast::Sender<Change>,
}

fn store_error(operation: &'static str) -> impl Fn(&dyn std::fmt::Display) -> MetadataError {
    move |error| MetadataError::Store {
        operation,
        message: error.to_string(),
    }
}

impl EmbeddedStore {
    /// Opens or creates the store file at `path`.
    pub fn open(path: &Path) -> Result<Arc<EmbeddedStore>> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|error| store_error("create directory")(&error))?;
        }
        let database = Database::create(path).map_err(|error| store_error("open")(&error))?;
        let transaction = database
            .begin_write()
            .map_err(|error| store_error("open")(&error))?;
        transaction
            .open_table(TABLE)
            .map_err(|error| store_error("open table")(&error))?;
        transaction
            .commit()
            .map_err(|error| store_error("open")(&error))?;
        let (changes, _) = broadcast::channel(WATCH_BUFFER);
        Ok(Arc::new(EmbeddedStore { database, changes }))
    }

    fn check(key: &str, expected: ExpectedVersion, found: Option<u64>) -> Result<()> {
        let matches = match expected {
            ExpectedVersion::Any => true,
            ExpectedVersion::Absent => found.is_none(),
            ExpectedVersion::Exactly(version) => found == Some(version),
        };
        if matches {
            Ok(())
        } else {
            Err(MetadataError::BadVersion {
                key: key.to_string(),
                expected,
                found,
            })
        }
    }
}

impl MetadataStore for EmbeddedStore {
    fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let transaction = self
            .database
            .begin_read()
            .map_err(|error| store_error("get")(&error))?;
        let table = transaction
            .open_table(TABLE)
            .map_err(|error| store_error("get")(&error))?;
        let found = table.get(key).map_err(|error| store_error("get")(&error))?;
        Ok(found.map(|guard| {
            let (version, value) = guard.value();
            Versioned {
                value: value.to_vec(),
                version,
            }
        }))
    }

    fn put(&self, key: &str, value: &[u8], expected: ExpectedVersion) -> Result<u64> {
        let transaction = self
            .database
            .begin_write()
            .map_err(|error| store_error("put")(&error))?;
        let version = {
            let mut table = transaction
                .open_table(TABLE)
                .map_err(|error| store_error("put")(&error))?;
            let found = table
                .get(key)
                .map_err(|error| store_error("put")(&error))?
                .map(|guard| guard.value().0);
            Self::check(key, expected, found)?;
            let version = found.map_or(0, |version| version + 1);
            table
                .insert(key, (version, value))
                .map_err(|error| store_error("put")(&error))?;
            version
        };
        transaction
            .commit()
            .map_err(|error| store_error("put")(&error))?;
        let _ = self.changes.send(Change {
            key: key.to_string(),
            version: Some(version),
        });
        Ok(version)
    }

    fn delete(&self, key: &str, expected: ExpectedVersion) -> Result<()> {
        let transaction = self
            .database
            .begin_write()
            .map_err(|error| store_error("delete")(&error))?;
        let existed = {
            let mut table = transaction
                .open_table(TABLE)
                .map_err(|error| store_error("delete")(&error))?;
            let found = table
                .get(key)
                .map_err(|error| store_error("delete")(&error))?
                .map(|guard| guard.value().0);
            Self::check(key, expected, found)?;
            table
                .remove(key)
                .map_err(|error| store_error("delete")(&error))?;
            found.is_some()
        };
        transaction
            .commit()
            .map_err(|error| store_error("delete")(&error))?;
        if existed {
            let _ = self.changes.send(Change {
                key: key.to_string(),
                version: None,
            });
        }
        Ok(())
    }

    fn children(&self, parent: &str) -> Result<Vec<String>> {
        let prefix = format!("{}/", parent.trim_end_matches('/'));
        let transaction = self
            .database
            .begin_read()
            .map_err(|error| store_error("list")(&error))?;
        let table = transaction
            .open_table(TABLE)
            .map_err(|error| store_error("list")(&error))?;
        let mut names: Vec<String> = Vec::new();
        for item in table
            .range(prefix.as_str()..)
            .map_err(|error| store_error("list")(&error))?
        {
            let (key, _) = item.map_err(|error| store_error("list")(&error))?;
            let key = key.value();
            let Some(rest) = key.strip_prefix(&prefix) else {
                break;
            };
            let child = rest.split('/').next().unwrap_or(rest);
            if names.last().map(String::as_str) != Some(child) {
                names.push(child.to_string());
            }
        }
        Ok(names)
    }

    fn watch(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_children_and_persistence() {
        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("metadata.redb");
        {
            let store = EmbeddedStore::open(&path).expect("open");
            let mut changes = store.watch();
            assert_eq!(
                store
                    .put("/a/b", b"1", ExpectedVersion::Absent)
                    .expect("put"),
                0
            );
            assert!(matches!(
                store.put("/a/b", b"2", ExpectedVersion::Absent),
                Err(MetadataError::BadVersion { .. })
            ));
            assert_eq!(
                store
                    .put("/a/b", b"2", ExpectedVersion::Exactly(0))
                    .expect("put"),
                1
            );
            store
                .put("/a/c/d", b"3", ExpectedVersion::Any)
                .expect("put");
            store.put("/ab", b"4", ExpectedVersion::Any).expect("put");
            assert_eq!(store.children("/a").expect("children"), vec!["b", "c"]);
            assert_eq!(changes.try_recv().expect("change").key, "/a/b");
            store
                .delete("/a/c/d", ExpectedVersion::Any)
                .expect("delete");
            assert!(store.get("/a/c/d").expect("get").is_none());
        }
        let store = EmbeddedStore::open(&path).expect("reopen");
        assert_eq!(
            store.get("/a/b").expect("get"),
            Some(Versioned {
                value: b"2".to_vec(),
                version: 1
            })
        );
        assert_eq!(store.children("/a").expect("children"), vec!["b"]);
    }
}
