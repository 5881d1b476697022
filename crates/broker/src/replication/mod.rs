//! Cross-cluster features. Geo-replication's replicator itself is `crate::replicator`; here
//! are what it and the receiving side share:
//!
//! - [`chain`]: the metadata of a replicated entry and the chain the remote checks;
//! - [`remote`]: remote clusters, the clients replicators share, remote topic preparation;
//! - `memory`: the one memory bound of all replicators.

pub mod chain;
pub(crate) mod memory;
pub mod remote;
