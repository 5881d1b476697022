//! What can go wrong talking to the object store, sorted by what a caller does about it.

use thiserror::Error;

/// An object-store operation failed. Every variant names the bucket and key (or prefix) involved.
///
/// | variant | caller's move |
/// |---|---|
/// | [`NotFound`](ObjectStoreError::NotFound) | the object (or the bucket) does not exist: not retryable |
/// | [`Unavailable`](ObjectStoreError::Unavailable) | the store could not answer (connection refused or reset, timeout, HTTP 5xx, 429 slow-down): retry later |
/// | [`Denied`](ObjectStoreError::Denied) | the store refused the credentials or the permission (HTTP 401/403): fix the configuration |
/// | [`Invalid`](ObjectStoreError::Invalid) | the request or the response made no sense (bad key, bad range, oversized or unparsable response, other 4xx): a bug or a misconfiguration |
/// | [`Corrupt`](ObjectStoreError::Corrupt) | an object was read whole but its bytes fail their checks (truncated, bad checksum): never serve them |
#[derive(Debug, Error)]
pub enum ObjectStoreError {
    #[error("object store: s3://{bucket}/{key} not found ({detail})")]
    NotFound {
        bucket: String,
        key: String,
        detail: String,
    },
    #[error("object store unavailable: {operation} s3://{bucket}/{key}: {detail}")]
    Unavailable {
        operation: &'static str,
        bucket: String,
        key: String,
        detail: String,
    },
    #[error("object store denied {operation} s3://{bucket}/{key}: {detail}")]
    Denied {
        operation: &'static str,
        bucket: String,
        key: String,
        detail: String,
    },
    #[error("object store: invalid {operation} s3://{bucket}/{key}: {detail}")]
    Invalid {
        operation: &'static str,
        bucket: String,
        key: String,
        detail: String,
    },
    #[error("corrupt data object s3://{bucket}/{key}: {detail}")]
    Corrupt {
        bucket: String,
        key: String,
        detail: String,
    },
}

impl ObjectStoreError {
    /// True when the same request may succeed later without any change (only `Unavailable`).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ObjectStoreError::Unavailable { .. })
    }
}

/// A setting of the object-store configuration is missing or wrong; the message names it.
#[derive(Debug, Error)]
#[error("object store configuration: {setting}: {detail}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub detail: String,
}

impl ConfigError {
    pub(crate) fn new(setting: &'static str, detail: impl Into<String>) -> ConfigError {
        ConfigError {
            setting,
            detail: detail.into(),
        }
    }
}

pub type Result<T, E = ObjectStoreError> = std::result::Result<T, E>;
