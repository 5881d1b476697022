//! Which subscriptions are replicated. As in Pulsar, the mark is the cursor property
//! `pulsar.replicated.subscription`, set by a consumer that subscribes with
//! `replicate_subscription_state` or through the admin API, and kept with the cursor.

use std::collections::BTreeMap;

use meridian_storage::CursorState;

use super::subscription_sync::SYNCED_PROPERTY_PREFIX;

/// The cursor property that marks a replicated subscription (Pulsar's name).
pub const REPLICATED_PROPERTY: &str = "pulsar.replicated.subscription";

/// The cursor property with the time (ms) a user last moved the subscription back here (seek,
/// reset-cursor): other clusters reset their copies when it grows.
pub const RESET_PROPERTY: &str = "meridian.reset.at";

/// Whether the cursor belongs to a replicated subscription.
pub fn is_replicated(cursor: &CursorState) -> bool {
    cursor
        .properties
        .get(REPLICATED_PROPERTY)
        .is_some_and(|value| value == "1")
}

/// Sets or clears the mark in a cursor's properties.
pub fn mark(properties: &mut BTreeMap<String, String>, replicated: bool) {
    if replicated {
        properties.insert(REPLICATED_PROPERTY.into(), "1".into());
    } else {
        properties.remove(REPLICATED_PROPERTY);
    }
}

/// When a user last moved the subscription back here (ms since the epoch), if ever.
pub fn reset_at(cursor: &CursorState) -> Option<u64> {
    cursor
        .properties
        .get(RESET_PROPERTY)
        .and_then(|value| value.parse().ok())
}

/// Records a reset made by a user here, now; the value always grows, even if the clock does not.
/// The states other clusters sent before are dropped: they describe the subscription before it
/// moved back.
pub fn note_reset(properties: &mut BTreeMap<String, String>) {
    let previous = properties
        .get(RESET_PROPERTY)
        .and_then(|value| value.parse::<u64>().ok())
        .unwrap_or(0);
    adopt_reset(properties, crate::clock::now_ms().max(previous + 1));
}

/// Records a reset (made here or in another cluster) and drops the states other clusters sent
/// before it.
pub fn adopt_reset(properties: &mut BTreeMap<String, String>, reset_at: u64) {
    properties.retain(|key, _| !key.starts_with(SYNCED_PROPERTY_PREFIX));
    properties.insert(RESET_PROPERTY.into(), reset_at.to_string());
}
