//! The broker's error type and its mapping to Pulsar's `ServerError` codes.

use meridian_wire::ServerError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid topic name {name:?}: {reason}")]
    InvalidTopicName { name: String, reason: String },
    /// A topic that does not exist (the message says why it was not created).
    #[error("{0}")]
    TopicNotFound(String),
    #[error("subscription {subscription} does not exist on {topic}")]
    SubscriptionNotFound { topic: String, subscription: String },
    #[error("{0}")]
    ConsumerBusy(String),
    #[error("{0}")]
    ProducerBusy(String),
    #[error("{0}")]
    ProducerFenced(String),
    #[error("{0}")]
    NotAllowed(String),
    #[error("{0}")]
    IncompatibleSchema(String),
    #[error("storage failure: {0}")]
    Storage(#[from] meridian_storage::StorageError),
    #[error("metadata failure: {0}")]
    Metadata(String),
    /// An admin resource (cluster, tenant, namespace, topic, subscription) does not exist.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// A request that is well-formed but not possible in the current state (HTTP 412).
    #[error("{0}")]
    PreconditionFailed(String),
    /// A request whose body or parameters are invalid (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// A request that conflicts with existing state, like deleting a non-empty tenant (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    ProducerBlockedQuotaExceededError(String),
    #[error("{0}")]
    ProducerBlockedQuotaExceededException(String),
    #[error("topic {0} is terminated")]
    TopicTerminated(String),
    #[error("broker is shutting down")]
    ShuttingDown,
    /// Loading one more topic would exceed `max_loaded_topics`; clients retry (ServiceNotReady).
    #[error("topic {topic} cannot be loaded: {limit} topics are loaded, the maximum")]
    TooManyLoadedTopics { topic: String, limit: usize },
    /// An admin request is creating or deleting the topic right now (a replicator preparing a
    /// remote topic, for one); clients retry (ServiceNotReady) and then meet the outcome.
    #[error("topic {0} is being created or deleted by an admin request; retry")]
    BeingCreatedOrDeleted(String),
    /// A topic the broker cannot serve: its log could not be opened, or a failed write or
    /// fsync poisoned it. Clients get NotAllowedError, which the official clients do not
    /// retry, so the reason reaches the application at once (see `health`).
    #[error("topic {topic} is unavailable: {reason}")]
    TopicUnavailable { topic: String, reason: String },
    /// The topic's tenant moved to another cluster (or is moving, `crate::migration`): clients
    /// retry (ServiceNotReady), look the topic up again and are redirected.
    #[error("{0}")]
    TenantMigrated(String),
    /// Cluster mode: another broker owns the topic's bundle, or this broker cannot tell (etcd
    /// out of reach, lease lost). Clients retry (ServiceNotReady): they look the topic up
    /// again and are sent to the owner.
    #[error("{0}")]
    NotServedHere(String),
    #[error("{0}")]
    Unknown(String),
}

impl From<meridian_metadata::MetadataError> for BrokerError {
    fn from(error: meridian_metadata::MetadataError) -> Self {
        BrokerError::Metadata(error.to_string())
    }
}

impl BrokerError {
    /// The one place where broker errors become Pulsar error codes.
    pub fn server_error(&self) -> ServerError {
        match self {
            BrokerError::InvalidTopicName { .. } => ServerError::InvalidTopicName,
            BrokerError::TopicNotFound(_) => ServerError::TopicNotFound,
            BrokerError::SubscriptionNotFound { .. } => ServerError::SubscriptionNotFound,
            BrokerError::ConsumerBusy(_) => ServerError::ConsumerBusy,
            BrokerError::ProducerBusy(_) => ServerError::ProducerBusy,
            BrokerError::ProducerFenced(_) => ServerError::ProducerFenced,
            BrokerError::NotAllowed(_) | BrokerError::TopicUnavailable { .. } => {
                ServerError::NotAllowedError
            }
            BrokerError::IncompatibleSchema(_) => ServerError::IncompatibleSchema,
            BrokerError::Storage(_) => ServerError::PersistenceError,
            BrokerError::Metadata(_) => ServerError::MetadataError,
            BrokerError::ShuttingDown
            | BrokerError::BeingCreatedOrDeleted(_)
            | BrokerError::TenantMigrated(_)
            | BrokerError::NotServedHere(_)
            | BrokerError::TooManyLoadedTopics { .. } => ServerError::ServiceNotReady,
            BrokerError::TopicTerminated(_) => ServerError::TopicTerminatedError,
            BrokerError::NotFound(_) => ServerError::TopicNotFound,
            BrokerError::AlreadyExists(_)
            | BrokerError::PreconditionFailed(_)
            | BrokerError::BadRequest(_)
            | BrokerError::Conflict(_) => ServerError::NotAllowedError,
            BrokerError::ProducerBlockedQuotaExceededError(_) => {
                ServerError::ProducerBlockedQuotaExceededError
            }
            BrokerError::ProducerBlockedQuotaExceededException(_) => {
                ServerError::ProducerBlockedQuotaExceededException
            }
            BrokerError::Unknown(_) => ServerError::UnknownError,
        }
    }
}

pub type Result<T, E = BrokerError> = std::result::Result<T, E>;
