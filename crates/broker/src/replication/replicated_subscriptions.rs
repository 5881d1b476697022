//! Which subscriptions are replicated. As in Pulsar, the mark is the cursor property
//! `pulsar.replicated.subscription`, set by a consumer that subscribes with
//! `replicate_subscription_state` or through the admin API, and kept with the cursor.

use std::collections::BTreeMap;

use meridian_storage::CursorState;

/// The cursor property that marks a replicated subscription (Pulsar's name).
pub const REPLICATED_PROPERTY: &str = "pulsar.replicated.subscription";

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
