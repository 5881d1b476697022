//! Cross-cluster features beyond moving entries: which subscriptions are replicated
//! ([`replicated_subscriptions`]) and the form in which clusters exchange a subscription's
//! acknowledgements ([`origin_acks`]).

pub mod origin_acks;
pub mod replicated_subscriptions;
pub mod subscription_sync;
