//! Meridian's cluster metadata on etcd (issue 17, `docs/cluster.md`).
//!
//! Everything of one cluster lives under `/meridian/<cluster>/` in etcd:
//!
//! | key (under the cluster root) | written by |
//! |---|---|
//! | `admin/<metadata path>` | [`EtcdStore`], the `MetadataStore` the admin API uses |
//! | `brokers/<broker-id>` | [`Session::start`], on the session's lease |
//! | `owners/<bundle>` | [`Session::try_acquire`]: `{"broker_id":…,"epoch":…}` on the lease |
//! | `epochs/<bundle>` | the same transaction: the bundle's last epoch, decimal |
//!
//! # Layout
//!
//! - [`client`]: the etcd v3 client (JSON gateway over HTTP/1.1, failover between endpoints,
//!   deadlines and size limits on everything).
//! - [`store`]: [`EtcdStore`], `meridian_metadata::MetadataStore` on etcd (versions are
//!   `mod_revision`s, expected versions are transaction compares, watches are etcd watches).
//! - [`session`]: [`Session`], a broker's registration on a lease kept alive by a background
//!   thread, the lease-lost signal, and bundle ownership with epochs and fenced commits.
//!
//! # Use
//!
//! ```no_run
//! # fn main() -> Result<(), meridian_etcd::EtcdError> {
//! use std::time::Duration;
//! use meridian_etcd::{Acquire, Cluster, ClientOptions, Op, SessionOptions};
//!
//! let cluster = Cluster::connect("etcd://127.0.0.1:2379", "us-east", ClientOptions::default())?;
//! let metadata = cluster.metadata_store()?; // Arc<dyn MetadataStore> for the admin API
//! let session = cluster.start_session("broker-1", b"pulsar://host:6650", SessionOptions::default())?;
//! let mut lost = session.lost(); // tokio watch: becomes Some(reason) when the lease is gone
//! if let Acquire::Acquired(ownership) = session.try_acquire("public/default/0x00000000_0x40000000")? {
//!     // Succeeds only while this broker still owns the bundle under this epoch.
//!     let revision = session.fenced_commit(&ownership, &[], &[Op::Put {
//!         key: "logs/persistent://public/default/t/head".to_string(),
//!         value: b"{...}".to_vec(),
//!         lease: 0,
//!     }])?;
//! }
//! # Ok(()) }
//! ```
//!
//! Keys given to [`Session::fenced_commit`] (compares and operations) are relative to the cluster
//! root; the [`Client`] itself works on absolute etcd keys.

pub mod client;
pub mod session;
pub mod store;

use std::sync::Arc;

pub use client::{Client, ClientOptions, Compare, KeyValue, Op};
pub use session::{Acquire, LeaseLost, OwnerRecord, Ownership, Session, SessionOptions};
pub use store::EtcdStore;

/// What went wrong talking to etcd. Every variant names the operation.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The endpoint list or a setting is invalid.
    #[error("etcd configuration: {0}")]
    Config(String),
    /// No endpoint could serve the request; it was not applied.
    #[error("etcd {operation}: no endpoint available: {message}")]
    Unavailable {
        operation: &'static str,
        message: String,
    },
    /// A write was sent but its answer was lost (timeout, broken connection): it may or may not
    /// have been applied. Read back to find out.
    #[error("etcd {operation}: outcome unknown: {message}")]
    OutcomeUnknown {
        operation: &'static str,
        message: String,
    },
    /// etcd refused the request (gRPC status code `code`).
    #[error("etcd {operation} refused (code {code}): {message}")]
    Rejected {
        operation: &'static str,
        code: i64,
        message: String,
    },
    /// The lease the request named no longer exists (it expired or was revoked).
    #[error("etcd {operation}: the lease no longer exists (expired or revoked)")]
    LeaseNotFound { operation: &'static str },
    /// A transaction's compares did not hold (a concurrent change).
    #[error("etcd {operation}: compare failed on {key}")]
    CompareFailed {
        operation: &'static str,
        key: String,
    },
    /// A fenced commit was refused: the bundle is no longer owned by this broker under this
    /// epoch. The caller must stop serving the bundle.
    #[error("bundle {bundle}: fenced: epoch {epoch} of this broker is no longer the owner (now {current:?})")]
    Fenced {
        bundle: String,
        epoch: u64,
        current: Option<OwnerRecord>,
    },
    /// This session's lease is lost; nothing can be done on its behalf any more.
    #[error("broker {broker_id}: session lost ({reason})")]
    SessionLost {
        broker_id: String,
        reason: LeaseLost,
    },
    /// Another live session already registered this broker id.
    #[error("broker {broker_id} is already registered in etcd by another live session")]
    AlreadyRegistered { broker_id: String },
    /// A request over etcd's limits (operations per transaction, request bytes).
    #[error("etcd {operation}: too large: {message}")]
    TooLarge {
        operation: &'static str,
        message: String,
    },
    /// etcd's answer could not be understood (not JSON, bad base64, over the size limit).
    #[error("etcd {operation}: bad answer: {message}")]
    BadResponse {
        operation: &'static str,
        message: String,
    },
    /// A key holds a value this crate cannot read (e.g. an epoch that is not a number).
    #[error("etcd key {key} holds bad data: {message}")]
    BadData { key: String, message: String },
    /// A name given by the caller is not usable as a key segment.
    #[error("invalid {what} {value:?}: {message}")]
    InvalidName {
        what: &'static str,
        value: String,
        message: &'static str,
    },
}

pub type Result<T, E = EtcdError> = std::result::Result<T, E>;

/// Longest broker id, cluster name or bundle name accepted (they become etcd keys).
pub const MAX_NAME_BYTES: usize = 512;

pub(crate) fn check_name(what: &'static str, value: &str, slashes_allowed: bool) -> Result<()> {
    let message = if value.is_empty() {
        Some("it is empty")
    } else if value.len() > MAX_NAME_BYTES {
        Some("it is longer than 512 bytes")
    } else if !slashes_allowed && value.contains('/') {
        Some("it contains '/'")
    } else if value.chars().any(char::is_control) {
        Some("it contains a control character")
    } else {
        None
    };
    match message {
        Some(message) => Err(EtcdError::InvalidName {
            what,
            value: value.chars().take(64).collect(),
            message,
        }),
        None => Ok(()),
    }
}

/// One cluster's keyspace in etcd: a client and the root `/meridian/<cluster>/`.
#[derive(Clone)]
pub struct Cluster {
    client: Arc<Client>,
    root: String,
}

impl Cluster {
    /// Connects to the etcd endpoints in `url` (`etcd://h1:2379,h2:2379`) for cluster `name`,
    /// rooted at `/meridian/<name>/`, or at `/<prefix>/meridian/<name>/` when the URL ends with
    /// a key prefix (`etcd://h1:2379/<prefix>`, [`client::split_chroot`]). Does not contact
    /// etcd; the first request does.
    pub fn connect(url: &str, name: &str, options: ClientOptions) -> Result<Cluster> {
        let (_, chroot) = client::split_chroot(url)?;
        let mut cluster = Cluster::with_client(Arc::new(Client::new(url, options)?), name)?;
        if let Some(chroot) = chroot {
            cluster.root = format!("/{chroot}{}", cluster.root);
        }
        Ok(cluster)
    }

    /// The cluster `name` on an existing client.
    pub fn with_client(client: Arc<Client>, name: &str) -> Result<Cluster> {
        check_name("cluster name", name, false)?;
        Ok(Cluster {
            client,
            root: format!("/meridian/{name}/"),
        })
    }

    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    /// The root of this cluster's keys, `/meridian/<cluster>/`.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The absolute etcd key of `relative` (a key under the cluster root).
    pub fn key(&self, relative: &str) -> String {
        format!("{}{}", self.root, relative.trim_start_matches('/'))
    }

    /// The admin metadata store of this cluster (keys under `admin/`), with its watch thread
    /// started.
    pub fn metadata_store(&self) -> Result<Arc<EtcdStore>> {
        EtcdStore::open(self.client.clone(), &self.key("admin"))
    }

    /// Registers `broker_id` (value `registration`) on a new lease and keeps it alive.
    pub fn start_session(
        &self,
        broker_id: &str,
        registration: &[u8],
        options: SessionOptions,
    ) -> Result<Session> {
        Session::start(self.clone(), broker_id, registration, options)
    }

    /// The current owner of `bundle`, if any.
    pub fn owner(&self, bundle: &str) -> Result<Option<OwnerRecord>> {
        check_name("bundle", bundle, true)?;
        let key = self.key(&format!("owners/{bundle}"));
        self.client
            .get(&key)?
            .map(|kv| OwnerRecord::decode(&key, &kv.value))
            .transpose()
    }
}
