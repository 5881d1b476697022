//! Which subscriptions are replicated. As in Pulsar, the mark is the cursor property
//! `pulsar.replicated.subscription`, set by a consumer that subscribes with
//! `replicate_subscription_state` or through the admin API, and kept with the cursor.

use std::collections::BTreeMap;

use meridian_storage::{CursorState, Position};

use super::origin_acks::OriginProgress;
use super::subscription_sync::{SyncedAcks, SYNCED_PROPERTY_PREFIX};

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

/// Whether `state` (this cluster's, about to be sent) only repeats what `held` (a state the
/// destination sent, as kept here) says: it carries no newer reset, and every entry it covers,
/// whole or in part, `held` covers at least as far. The destination's acknowledgements hold
/// everything it ever sent (they only grow, and a reset there comes with a newer `reset_at`,
/// after which it ignores states like this one), so applying `state` there would change
/// nothing: typically the echo of the destination's own state, translated back. Positions are
/// compared as ranges of the position order, so an entry the destination never stored inside
/// its range can only make this answer no (and the state is sent, as before).
pub fn only_repeats(state: &SyncedAcks, held: &SyncedAcks) -> bool {
    if state.reset_at > held.reset_at {
        return false;
    }
    state.acks.origins.iter().all(|(origin, progress)| {
        let held = held.acks.origins.get(origin);
        if held.is_some_and(|held| plainly_covers(held, progress)) {
            return true;
        }
        let covered = held.map(covered_spans).unwrap_or_default();
        let within = |(start, end): (u128, u128)| {
            let at = covered.partition_point(|(from, _)| *from <= start);
            start >= end || (at > 0 && end <= covered[at - 1].1)
        };
        covered_spans(progress).into_iter().all(within)
            && progress.batches.iter().all(|(position, words)| {
                let whole = within((order(*position), order(*position).saturating_add(1)));
                // Bits set: messages not acknowledged; held's must all be set in `state` too.
                let held_words = held.and_then(|held| {
                    let at = held
                        .batches
                        .binary_search_by(|(start, _)| start.cmp(position));
                    at.ok().map(|at| &held.batches[at].1)
                });
                let in_part = held_words.is_some_and(|held_words| {
                    held_words.len() == words.len()
                        && held_words
                            .iter()
                            .zip(words)
                            .all(|(held, ours)| held & !ours == 0)
                });
                whole || in_part
            })
    })
}

/// A quick test that `held` covers everything `progress` does, without building spans: its
/// acknowledged stretch holds `progress`'s, and each range of `progress` lies in that stretch or
/// in one range of `held` (found by a binary search, then checked, so that ranges out of order
/// can only make the answer no). The usual case, a sender's state against its previous one or
/// an echo against the state it echoes, passes; `false` means only "not shown here" (the caller
/// then compares span by span).
fn plainly_covers(held: &OriginProgress, progress: &OriginProgress) -> bool {
    let stretch = |progress: &OriginProgress| match (progress.stored_from, progress.acked_below) {
        (Some(from), Some(below)) if from < below => Some((from, below)),
        _ => None,
    };
    let held_stretch = stretch(held);
    let in_stretch = |start: Position, last: Position| {
        held_stretch.is_some_and(|(from, below)| from <= start && last < below)
    };
    progress.batches.is_empty()
        && stretch(progress).is_none_or(|(from, below)| {
            held_stretch
                .is_some_and(|(held_from, held_below)| held_from <= from && below <= held_below)
        })
        && progress.ranges.iter().all(|&(start, last)| {
            in_stretch(start, last) || {
                let at = held.ranges.partition_point(|(from, _)| *from <= start);
                at > 0 && {
                    let (from, to) = held.ranges[at - 1];
                    from <= start && last <= to
                }
            }
        })
}

/// A position's place in the position order, as a number (the next entry id is one more).
fn order(position: Position) -> u128 {
    (u128::from(position.ledger_id) << 64) | u128::from(position.entry_id)
}

/// The origin positions `progress` covers whole, as half-open spans of [`order`]: ascending,
/// disjoint and not touching.
fn covered_spans(progress: &OriginProgress) -> Vec<(u128, u128)> {
    let mut spans: Vec<(u128, u128)> = progress
        .ranges
        .iter()
        .map(|(start, end)| (order(*start), order(*end).saturating_add(1)))
        .collect();
    if let (Some(from), Some(below)) = (progress.stored_from, progress.acked_below) {
        spans.push((order(from), order(below)));
    }
    spans.retain(|(start, end)| start < end);
    spans.sort_unstable();
    let mut merged: Vec<(u128, u128)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::origin_acks::OriginAcks;

    fn state(cluster: &str, origins: &[(&str, OriginProgress)]) -> SyncedAcks {
        SyncedAcks {
            cluster: cluster.to_string(),
            acks: OriginAcks {
                origins: origins
                    .iter()
                    .map(|(origin, progress)| (origin.to_string(), progress.clone()))
                    .collect(),
            },
            reset_at: None,
            seq: Some(1),
        }
    }

    /// (ledger, entry)
    type At = (u64, u64);

    /// a's entries from 3:0 stored, acknowledged below `below` and in `ranges`.
    fn progress(below: At, ranges: &[(At, At)]) -> OriginProgress {
        let position = |(ledger, entry): (u64, u64)| Position::new(ledger, entry);
        OriginProgress {
            acked_below: Some(position(below)),
            stored_from: Some(Position::new(3, 0)),
            ranges: ranges
                .iter()
                .map(|(start, end)| (position(*start), position(*end)))
                .collect(),
            batches: Vec::new(),
        }
    }

    proptest::proptest! {
        /// The quick test never says "covered" where spans say otherwise, on any ranges (in
        /// order or not, touching, overlapping, across ledgers).
        #[test]
        fn the_quick_covering_test_agrees_with_spans(
            held_from in 0u64..6,
            held_below in 0u64..30,
            held_ranges in proptest::collection::vec((0u64..2, 0u64..30, 0u64..6), 0..6),
            from in 0u64..6,
            below in 0u64..30,
            ranges in proptest::collection::vec((0u64..2, 0u64..30, 0u64..6), 0..6),
        ) {
            let make = |from: u64, below: u64, ranges: &[(u64, u64, u64)]| OriginProgress {
                stored_from: Some(Position::new(3, from)),
                acked_below: Some(Position::new(3 + below / 20, below % 20)),
                ranges: ranges
                    .iter()
                    .map(|&(ledger, start, length)| {
                        (Position::new(3 + ledger, start), Position::new(3 + ledger, start + length))
                    })
                    .collect(),
                batches: Vec::new(),
            };
            let held = make(held_from, held_below, &held_ranges);
            let progress = make(from, below, &ranges);
            if plainly_covers(&held, &progress) {
                let covered = covered_spans(&held);
                let within = |(start, end): (u128, u128)| {
                    let at = covered.partition_point(|(from, _)| *from <= start);
                    start >= end || (at > 0 && end <= covered[at - 1].1)
                };
                proptest::prop_assert!(
                    covered_spans(&progress).into_iter().all(within),
                    "quick says covered: {held:?} {progress:?}"
                );
            }
        }
    }

    #[test]
    fn a_state_made_of_the_destinations_acknowledgements_only_repeats_them() {
        // What a sent: below 3:10, 3:12..=3:20 and 4:0..=4:5 (ledger 3 ends at 3:20).
        let held = state(
            "a",
            &[(
                "a",
                progress((3, 10), &[((3, 12), (3, 20)), ((4, 0), (4, 5))]),
            )],
        );
        // b's translation of an older state of a's: less, and the same.
        let older = state("b", &[("a", progress((3, 8), &[((3, 12), (3, 15))]))]);
        assert!(only_repeats(&older, &held));
        let same = state(
            "b",
            &[(
                "a",
                progress((3, 10), &[((3, 12), (3, 20)), ((4, 0), (4, 5))]),
            )],
        );
        assert!(only_repeats(&same, &held));
        // A range across the ledger boundary where a's ranges meet: still covered as far as a's.
        let across = state("b", &[("a", progress((3, 10), &[((3, 12), (4, 5))]))]);
        assert!(!only_repeats(&across, &held), "3:21.. are not a's");
        let held_across = state("a", &[("a", progress((3, 10), &[((3, 12), (4, 5))]))]);
        assert!(only_repeats(&same, &held_across));
        // Empty, and covering nothing: nothing to add.
        assert!(only_repeats(&state("b", &[]), &held));
    }

    #[test]
    fn a_state_with_anything_the_destination_did_not_acknowledge_is_sent() {
        let held = state("a", &[("a", progress((3, 10), &[((3, 12), (3, 20))]))]);
        // b's consumers acknowledged 3:11 after a failover (the gap), or beyond a's last range,
        // or moved the bound past it.
        for acked_on_b in [
            progress((3, 10), &[((3, 11), (3, 11))]),
            progress((3, 10), &[((3, 12), (3, 21))]),
            progress((3, 12), &[]),
        ] {
            let ours = state("b", &[("a", acked_on_b.clone())]);
            assert!(!only_repeats(&ours, &held), "{acked_on_b:?}");
        }
        // Entries of an origin the destination's state does not speak of (a third cluster's).
        let third = state(
            "b",
            &[("a", progress((3, 10), &[])), ("c", progress((3, 1), &[]))],
        );
        assert!(!only_repeats(&third, &held));
        // A bound the destination's state does not vouch for (it stores a's entries from 3:5).
        let mut later = held.clone();
        later.acks.origins.get_mut("a").expect("a").stored_from = Some(Position::new(3, 5));
        let ours = state("b", &[("a", progress((3, 10), &[]))]);
        assert!(!only_repeats(&ours, &later));
        // A reset here the destination has not seen.
        let mut reset = state("b", &[]);
        reset.reset_at = Some(5);
        assert!(!only_repeats(&reset, &held));
    }

    #[test]
    fn batches_acknowledged_in_part_repeat_only_what_the_destination_acknowledged() {
        let mut held = state("a", &[("a", progress((3, 10), &[]))]);
        // a acknowledged the batch at 3:10 but for messages 0 and 1 (bits set: unacknowledged).
        held.acks.origins.get_mut("a").expect("a").batches =
            vec![(Position::new(3, 10), vec![0b11])];
        let with_batch = |words: u64, at: u64| {
            let mut ours = state("b", &[("a", progress((3, 10), &[]))]);
            ours.acks.origins.get_mut("a").expect("a").batches =
                vec![(Position::new(3, at), vec![words])];
            ours
        };
        assert!(only_repeats(&with_batch(0b11, 10), &held));
        assert!(
            only_repeats(&with_batch(0b111, 10), &held),
            "less acknowledged"
        );
        assert!(
            !only_repeats(&with_batch(0b01, 10), &held),
            "message 1 acknowledged on b"
        );
        assert!(
            only_repeats(&with_batch(0b01, 5), &held),
            "a acknowledged 3:5 whole"
        );
        assert!(
            !only_repeats(&with_batch(0b01, 11), &held),
            "a has nothing of 3:11"
        );
    }
}
