//! Meridian's object-storage log for cluster mode (`docs/cluster.md`): an S3 client for
//! S3-compatible stores, and the data objects a broker writes, one per group commit.
//!
//! # Layout
//!
//! - [`config`]: `s3://bucket/prefix`, endpoint, region, addressing style, credentials (file or
//!   environment), timeouts and size limits.
//! - [`client`]: [`ObjectStore`], a synchronous client (SigV4 by `rusty-s3`, HTTP by `ureq`):
//!   put, get, ranged get, tail get, head, list (paginated), delete, create-bucket. Every call
//!   is bounded in time and response size; errors are sorted by what a caller does about them
//!   ([`ObjectStoreError`]).
//! - [`data_object`]: [`DataObjectBuilder`] lays out the batches of many topics, each as the
//!   local engine's checksummed records, with an index and a footer at the end;
//!   [`DataObjectReader`] fetches the index and then one topic's range with ranged GETs and
//!   checks every byte.
//!
//! This crate knows nothing of etcd, topics' commit order or the broker: it stores and fetches
//! bytes. Calls block (they are plain HTTP requests); async callers run them on a blocking
//! thread.

pub mod client;
pub mod config;
pub mod data_object;
mod error;

pub use client::{parse_s3_time_ms, ListPage, ObjectInfo, ObjectStore, ObjectSummary, ObjectTail};
pub use config::{Credentials, S3Config, S3Location};
pub use data_object::{
    data_object_key, read_topic, BuildError, DataObject, DataObjectBuilder, DataObjectLimits,
    DataObjectReader, NewEntry, ObjectEntry, TopicRange,
};
pub use error::{ConfigError, ObjectStoreError, Result};

#[cfg(test)]
mod tests {
    /// One store is shared by every thread of a broker.
    #[test]
    fn a_store_is_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<super::ObjectStore>();
    }
}
