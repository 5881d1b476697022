//! Cross-cluster features beyond moving entries: today the form in which clusters exchange a
//! subscription's acknowledgements ([`origin_acks`]), the base of replicated subscriptions.

pub mod origin_acks;
