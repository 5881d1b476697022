//! Cross-cluster features: geo-replication's replicator, what it and the receiving side share,
//! and replicated subscriptions.
//!
//! - [`replicator`]: one replicator per topic (or partition) per remote cluster;
//! - [`backlog`]: what a remote still has to store (backlog and delay in stats);
//! - [`chain`]: the metadata of a replicated entry and the chain the remote checks;
//! - [`remote`]: remote clusters, the clients replicators share, remote topic preparation;
//! - `memory`: the one memory bound of all replicators;
//! - [`replicated_subscriptions`]: which subscriptions are replicated, and resets;
//! - [`origin_acks`]: the form in which clusters exchange a subscription's acknowledgements;
//! - `origin_map`: where a log's entries come from, remembered as runs for the sync task;
//! - [`origin_position`]: a message id from another cluster read as an origin position (readers);
//! - [`subscription_sync`]: the per-topic task that sends and applies them;
//! - [`state_format`]: a state's encodings (JSON, and the compact protobuf form);
//! - [`received_state`]: a state arriving from another cluster (binary command or HTTP post).
//!
//! Dependencies point one way: `topic` uses these modules; `chain`, `remote` and `memory`
//! never use `replicator`, and nothing here but `received_state` (the receiving side's entry
//! point, called by the connection and the admin API) uses `broker`.

pub mod backlog;
pub mod chain;
pub(crate) mod memory;
pub mod origin_acks;
pub(crate) mod origin_map;
pub mod origin_position;
pub mod received_state;
pub mod remote;
pub mod replicated_subscriptions;
pub mod replicator;
#[cfg(test)]
mod review_tests;
pub mod state_format;
pub mod subscription_sync;
