//! Meridian's broker: topics, producers, subscriptions and dispatch, de-duplication and schemas.
//!
//! The broker knows Pulsar's semantics but not sockets: connections (the `server` crate) call
//! into it and give it a bounded [`outbound::OutboundSender`] per connection for the frames it
//! sends on its own (MESSAGE, ACTIVE_CONSUMER_CHANGE, CLOSE_CONSUMER).
//!
//! # Layout
//!
//! - [`broker`]: [`Broker`], the registry of loaded topics, partitioned-topic metadata and
//!   auto-creation rules.
//! - [`topic`]: [`Topic`]: producers (names, access modes), publishing with de-duplication,
//!   subscriptions, seek, last message id.
//! - [`subscription`]: [`Subscription`] and its dispatcher task (Exclusive, Shared, Failover,
//!   Key_Shared; redelivery; delayed delivery).
//! - [`replication`]: geo-replication (the replicator, the chain the remote checks, remote
//!   clusters, the memory bound) and replicated subscriptions.
//! - [`cluster`]: cluster mode (`meridian broker` on etcd): registration, bundles, ownership,
//!   lookup answers, what happens when the lease is lost.
//! - [`peer`]: HTTP calls to another cluster's admin API with its registration's credentials.
//! - `context`: the narrow handle a topic gets from its broker, so `topic` never uses `broker`.
//! - [`stats`]: counters and Pulsar's stats shapes; uses nothing else in the crate.
//! - [`health`]: topics the broker cannot serve (log load failures, poisoned logs) and why.
//! - [`dedup`], [`schema`], [`topic_name`], [`config`], [`error`] (the one mapping of errors to
//!   Pulsar's `ServerError`).

pub mod batch_acks;
pub mod broker;
pub mod clock;
pub mod cluster;
pub mod config;
mod context;
pub mod dedup;
pub mod error;
pub mod health;
pub mod migration;
pub mod outbound;
pub mod peer;
pub mod replication;
pub mod resources;
pub mod schema;
pub mod stats;
pub mod subscription;
pub mod topic;
pub mod topic_name;

pub use broker::Broker;
pub use config::{AutoTopicCreationType, BrokerConfig};
pub use error::{BrokerError, Result};
pub use subscription::{NewConsumer, StartPosition, Subscription, SubscriptionType};
pub use topic::{
    AccessMode, NewProducer, ProducerGrant, Publish, PublishFuture, SeekTarget, Topic,
};
pub use topic_name::TopicName;
