//! The front door's errors, and the one place that maps them to Pulsar's `ServerError` codes
//! and HTTP statuses.

use meridian_wire::ServerError;

/// Why a topic could not be answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    /// The topic name cannot be parsed.
    #[error("invalid topic name {topic:?}: {reason}")]
    InvalidTopic { topic: String, reason: String },

    /// A cluster whose answer decides the home did not answer (or answered something the
    /// front door cannot read). Retriable: the client looks up again.
    #[error("cluster {cluster} is unreachable ({reason}); the tenant's home cannot be decided now, retry")]
    Unreachable { cluster: String, reason: String },

    /// A migration names a cluster the front door cannot find.
    #[error("cluster {name} cannot be found: {reason}")]
    UnknownCluster { name: String, reason: String },

    /// No cluster of the set has the tenant.
    #[error("tenant {tenant} exists on none of the clusters {clusters}")]
    NoHome { tenant: String, clusters: String },

    /// The home cluster answered the forwarded request with an error.
    #[error("cluster {cluster}: {message}")]
    Home {
        cluster: String,
        code: ServerError,
        message: String,
    },

    /// A bug or a failed task in the front door itself.
    #[error("internal error: {0}")]
    Internal(String),
}

impl LookupError {
    /// The code a binary client gets. `ServiceNotReady` makes Pulsar clients look up again.
    pub fn server_error(&self) -> ServerError {
        match self {
            LookupError::InvalidTopic { .. } => ServerError::InvalidTopicName,
            LookupError::Unreachable { .. }
            | LookupError::UnknownCluster { .. }
            | LookupError::Internal(_) => ServerError::ServiceNotReady,
            LookupError::NoHome { .. } => ServerError::TopicNotFound,
            LookupError::Home { code, .. } => *code,
        }
    }

    /// The status an HTTP client gets.
    pub fn http_status(&self) -> u16 {
        match self.server_error() {
            ServerError::InvalidTopicName => 400,
            ServerError::TopicNotFound => 404,
            ServerError::AuthenticationError => 401,
            ServerError::AuthorizationError => 403,
            ServerError::NotAllowedError => 405,
            ServerError::TooManyRequests => 429,
            ServerError::ServiceNotReady => 503,
            _ => 500,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_cluster_is_retriable_for_both_kinds_of_client() {
        let error = LookupError::Unreachable {
            cluster: "http://127.0.0.1:8080".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(error.server_error(), ServerError::ServiceNotReady);
        assert_eq!(error.http_status(), 503);
        assert!(error.to_string().contains("http://127.0.0.1:8080"));
    }
}
