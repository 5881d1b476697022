//! The encodings of a replicated subscription's state ([`SyncedAcks`]).
//!
//! - **JSON**, `{"cluster": …, "acks": {"origins": {…}}, "resetAt": …, "seq": …}` with positions
//!   as `"ledger:entry"` text: the body of the HTTP endpoint, the REPLICATED_SUBSCRIPTION_STATE
//!   command's state for a broker that takes nothing else, and what brokers stored before the
//!   compact form existed.
//! - **Compact**, a `MeridianSubscriptionState` protobuf message (`crates/wire/proto`): the
//!   same content with positions as varints and the acknowledged ranges as packed numbers, each
//!   position written against the one before it (in a subscription's state most ranges lie in
//!   one ledger, a few entries apart: two or three bytes a position instead of a dozen). Sent
//!   on the binary protocol to a broker that announces version
//!   [`meridian_wire::SUBSCRIPTION_STATE_COMPACT_VERSION`] of the state encoding.
//!
//! A receiver stores a state it got compact as the JSON form whose `acks` is the base64 text of
//! the compact message as it came ([`stored_text`]): still JSON, so the cursor property keeps its
//! `seq` readable where it always was, nothing is encoded again to store it, and decoding it
//! costs a base64 pass and a protobuf decode instead of parsing every position's text. [`SyncedAcks`] decodes both forms of `acks`
//! (an object or a string), so states stored before, and an HTTP post of either, still load.

use std::collections::BTreeMap;

use base64::Engine;
use meridian_storage::Position;
use meridian_wire::proto::{
    MeridianBatchAcks, MeridianOriginAcks, MeridianOriginProgress, MeridianPosition,
    MeridianSubscriptionState,
};
use prost::Message;
use serde::Deserializer;

use super::origin_acks::{OriginAcks, OriginProgress};
use super::subscription_sync::SyncedAcks;

/// The compact form of `state`.
pub fn encode_compact(state: &SyncedAcks) -> Vec<u8> {
    MeridianSubscriptionState {
        cluster: state.cluster.clone(),
        seq: state.seq,
        reset_at: state.reset_at,
        acks: acks_to_proto(&state.acks),
    }
    .encode_to_vec()
}

/// Decodes a state's compact form, and gives the text to store for it ([`stored_text`]).
/// Refuses (with the reason) bytes that are no such message and content the JSON form refuses
/// too: ranges out of order or overlapping, batches out of order, an origin named twice.
pub fn decode_compact(bytes: &[u8]) -> Result<(SyncedAcks, String), String> {
    let message = MeridianSubscriptionState::decode(bytes).map_err(|error| error.to_string())?;
    let acks = acks_from_proto(&message.acks)?;
    let text = stored_text(&message.cluster, (message.reset_at, message.seq), bytes);
    let state = SyncedAcks {
        cluster: message.cluster,
        acks,
        reset_at: message.reset_at,
        seq: message.seq,
    };
    Ok((state, text))
}

/// The JSON form of a state that came compact (`compact`: the message's bytes as received),
/// with `acks` as the base64 text of those bytes: what a receiver stores. Nothing is encoded
/// again, and base64 text needs no JSON escaping.
fn stored_text(
    cluster: &str,
    (reset_at, seq): (Option<u64>, Option<u64>),
    compact: &[u8],
) -> String {
    use std::fmt::Write;
    let mut text = String::with_capacity(compact.len() / 3 * 4 + cluster.len() + 80);
    text.push_str("{\"cluster\":");
    // A string alone: serializing cannot fail.
    text.push_str(&serde_json::to_string(cluster).unwrap_or_default());
    text.push_str(",\"acks\":\"");
    base64::engine::general_purpose::STANDARD.encode_string(compact, &mut text);
    text.push('"');
    if let Some(reset_at) = reset_at {
        let _ = write!(text, ",\"resetAt\":{reset_at}");
    }
    if let Some(seq) = seq {
        let _ = write!(text, ",\"seq\":{seq}");
    }
    text.push('}');
    text
}

/// Decodes a state's `acks` in either JSON form: the object, or the base64 text of a state's
/// compact form, whose acknowledgements it takes (as [`stored_text`] writes it).
pub fn deserialize_acks<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<OriginAcks, D::Error> {
    struct AcksVisitor;
    impl<'de> serde::de::Visitor<'de> for AcksVisitor {
        type Value = OriginAcks;
        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter
                .write_str("acknowledgements: an object, or the base64 text of the compact form")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<OriginAcks, A::Error> {
            serde::Deserialize::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<OriginAcks, E> {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|error| E::custom(format!("compact acknowledgements: {error}")))?;
            let state = MeridianSubscriptionState::decode(bytes.as_slice())
                .map_err(|error| E::custom(format!("compact acknowledgements: {error}")))?;
            acks_from_proto(&state.acks).map_err(E::custom)
        }
    }
    deserializer.deserialize_any(AcksVisitor)
}

fn position_to_proto(position: Position) -> MeridianPosition {
    MeridianPosition {
        ledger_id: position.ledger_id,
        entry_id: position.entry_id,
    }
}

fn position_from_proto(position: &MeridianPosition) -> Position {
    Position::new(position.ledger_id, position.entry_id)
}

fn acks_to_proto(acks: &OriginAcks) -> MeridianOriginAcks {
    let origins = acks
        .origins
        .iter()
        .map(|(cluster, progress)| {
            let mut ranges = Vec::with_capacity(progress.ranges.len() * 4);
            let mut previous = Position::new(0, 0);
            for (start, end) in &progress.ranges {
                for position in [*start, *end] {
                    let (ledgers, entries) = delta(previous, position);
                    ranges.push(ledgers);
                    ranges.push(entries);
                    previous = position;
                }
            }
            MeridianOriginProgress {
                cluster: cluster.clone(),
                acked_below: progress.acked_below.map(position_to_proto),
                stored_from: progress.stored_from.map(position_to_proto),
                ranges,
                batches: progress
                    .batches
                    .iter()
                    .map(|(position, words)| MeridianBatchAcks {
                        position: position_to_proto(*position),
                        ack_set: words.clone(),
                    })
                    .collect(),
            }
        })
        .collect();
    MeridianOriginAcks { origins }
}

/// `position` written against `previous` (which is not after it): the ledgers between them,
/// and the entries between them in the same ledger or else `position`'s entry id.
fn delta(previous: Position, position: Position) -> (u64, u64) {
    let ledgers = position.ledger_id.wrapping_sub(previous.ledger_id);
    if ledgers == 0 {
        (0, position.entry_id.wrapping_sub(previous.entry_id))
    } else {
        (ledgers, position.entry_id)
    }
}

/// The inverse of [`delta`]; `None` where the numbers overflow a position.
fn undelta(previous: Position, (ledgers, entries): (u64, u64)) -> Option<Position> {
    if ledgers == 0 {
        Some(Position::new(
            previous.ledger_id,
            previous.entry_id.checked_add(entries)?,
        ))
    } else {
        Some(Position::new(
            previous.ledger_id.checked_add(ledgers)?,
            entries,
        ))
    }
}

fn acks_from_proto(acks: &MeridianOriginAcks) -> Result<OriginAcks, String> {
    let mut origins = BTreeMap::new();
    for progress in &acks.origins {
        let cluster = &progress.cluster;
        if progress.ranges.len() % 4 != 0 {
            return Err(format!(
                "origin {cluster}: {} range numbers, not four a range",
                progress.ranges.len()
            ));
        }
        let mut ranges = Vec::with_capacity(progress.ranges.len() / 4);
        let mut previous = Position::new(0, 0);
        for numbers in progress.ranges.chunks_exact(4) {
            let overflow = || format!("origin {cluster}: a range beyond the largest position");
            let start = undelta(previous, (numbers[0], numbers[1])).ok_or_else(overflow)?;
            let end = undelta(start, (numbers[2], numbers[3])).ok_or_else(overflow)?;
            // Each number only moves forward, so only a range starting where the last ended
            // (overlapping it) is out of order.
            if !ranges.is_empty() && start == previous {
                return Err(format!(
                    "origin {cluster}: ranges must be ascending and disjoint"
                ));
            }
            ranges.push((start, end));
            previous = end;
        }
        let mut batches: Vec<(Position, Vec<u64>)> = Vec::with_capacity(progress.batches.len());
        for batch in &progress.batches {
            let position = position_from_proto(&batch.position);
            if batches.last().is_some_and(|(last, _)| *last >= position) {
                return Err(format!("origin {cluster}: batches must be ascending"));
            }
            batches.push((position, batch.ack_set.clone()));
        }
        let decoded = OriginProgress {
            acked_below: progress.acked_below.as_ref().map(position_from_proto),
            ranges,
            stored_from: progress.stored_from.as_ref().map(position_from_proto),
            batches,
        };
        if origins.insert(cluster.clone(), decoded).is_some() {
            return Err(format!("origin {cluster} named twice"));
        }
    }
    Ok(OriginAcks { origins })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn position() -> impl Strategy<Value = Position> {
        // Small ledgers and entries (ranges in one ledger, a few apart) and huge ones.
        prop_oneof![
            (0..4u64, 0..50u64).prop_map(|(ledger, entry)| Position::new(ledger, entry)),
            (any::<u64>(), any::<u64>()).prop_map(|(ledger, entry)| Position::new(ledger, entry)),
        ]
    }

    /// Ascending, disjoint, inclusive ranges from any positions.
    fn ranges() -> impl Strategy<Value = Vec<(Position, Position)>> {
        prop::collection::btree_set(position(), 0..40).prop_map(|positions| {
            let positions: Vec<Position> = positions.into_iter().collect();
            positions
                .chunks_exact(2)
                .map(|pair| (pair[0], pair[1]))
                .collect()
        })
    }

    fn progress() -> impl Strategy<Value = OriginProgress> {
        (
            prop::option::of(position()),
            ranges(),
            prop::option::of(position()),
            prop::collection::btree_map(
                position(),
                prop::collection::vec(any::<u64>(), 0..3),
                0..4,
            ),
        )
            .prop_map(
                |(acked_below, ranges, stored_from, batches)| OriginProgress {
                    acked_below,
                    ranges,
                    stored_from,
                    batches: batches.into_iter().collect(),
                },
            )
    }

    fn state() -> impl Strategy<Value = SyncedAcks> {
        (
            "[a-z]{1,8}",
            prop::collection::btree_map("[a-z]{1,8}", progress(), 0..4),
            prop::option::of(any::<u64>()),
            prop::option::of(any::<u64>()),
        )
            .prop_map(|(cluster, origins, reset_at, seq)| SyncedAcks {
                cluster,
                acks: OriginAcks { origins },
                reset_at,
                seq,
            })
    }

    proptest! {
        /// Any state comes back equal from its compact form, and from the text stored for it;
        /// the JSON form of the same state decodes to it too.
        #[test]
        fn compact_and_stored_forms_round_trip(state in state()) {
            let (decoded, stored) = decode_compact(&encode_compact(&state)).expect("decode");
            prop_assert_eq!(&decoded, &state);
            let from_stored: SyncedAcks = serde_json::from_str(&stored).expect("stored text");
            prop_assert_eq!(&from_stored, &state);
            let json = serde_json::to_string(&state).expect("JSON");
            prop_assert_eq!(serde_json::from_str::<SyncedAcks>(&json).expect("JSON"), state);
        }
    }

    fn at(ledger: u64, entry: u64) -> Position {
        Position::new(ledger, entry)
    }

    fn one_origin(progress: MeridianOriginProgress) -> Vec<u8> {
        MeridianSubscriptionState {
            cluster: "a".into(),
            seq: Some(1),
            reset_at: None,
            acks: MeridianOriginAcks {
                origins: vec![progress],
            },
        }
        .encode_to_vec()
    }

    #[test]
    fn ranges_take_a_few_bytes_each() {
        let mut state = SyncedAcks {
            cluster: "a".into(),
            acks: OriginAcks::default(),
            reset_at: None,
            seq: Some(1_764_650_000_000),
        };
        // 100 ranges of two entries, three apart, in one ledger.
        let ranges = (0..100u64)
            .map(|index| {
                (
                    at(12_345, 50_000 + index * 5),
                    at(12_345, 50_001 + index * 5),
                )
            })
            .collect();
        state.acks.origins.insert(
            "a".into(),
            OriginProgress {
                acked_below: Some(at(12_345, 49_990)),
                ranges,
                stored_from: Some(at(12_000, 0)),
                batches: Vec::new(),
            },
        );
        let compact = encode_compact(&state).len();
        let json = serde_json::to_string(&state).expect("JSON").len();
        // Four one-byte numbers a range, but the first start.
        assert!(compact < 450, "{compact} bytes");
        assert!(json > 2_500, "{json} bytes");
    }

    #[test]
    fn malformed_compact_states_are_refused_with_the_reason() {
        let refused = |bytes: &[u8]| decode_compact(bytes).expect_err("refused");
        assert!(
            !refused(b"{\"cluster\":\"a\"}").is_empty(),
            "JSON is not the compact form"
        );
        let progress = |ranges: Vec<u64>| MeridianOriginProgress {
            cluster: "a".into(),
            ranges,
            ..MeridianOriginProgress::default()
        };
        assert!(refused(&one_origin(progress(vec![0, 5, 0]))).contains("four a range"));
        // 0:5..=0:7, then a range starting at 0:7 again.
        let overlapping = progress(vec![0, 5, 0, 2, 0, 0, 0, 1]);
        assert!(refused(&one_origin(overlapping)).contains("ascending and disjoint"));
        let overflowing = progress(vec![0, u64::MAX, 0, 1]);
        assert!(refused(&one_origin(overflowing)).contains("largest position"));
        let batch = |entry| MeridianBatchAcks {
            position: MeridianPosition {
                ledger_id: 1,
                entry_id: entry,
            },
            ack_set: vec![1],
        };
        let unordered = MeridianOriginProgress {
            batches: vec![batch(5), batch(5)],
            ..progress(Vec::new())
        };
        assert!(refused(&one_origin(unordered)).contains("batches must be ascending"));
        // A valid one still decodes: 0:5..=0:7 and 0:9..=0:9.
        let (state, _) =
            decode_compact(&one_origin(progress(vec![0, 5, 0, 2, 0, 2, 0, 0]))).expect("valid");
        assert_eq!(
            state.acks.origins["a"].ranges,
            vec![(at(0, 5), at(0, 7)), (at(0, 9), at(0, 9))]
        );
        // The stored text with bad base64 or bad bytes is refused by the JSON decoding.
        for acks in ["not base64!", "AAAA"] {
            let text = format!(r#"{{"cluster":"a","acks":"{acks}","seq":1}}"#);
            assert!(serde_json::from_str::<SyncedAcks>(&text).is_err(), "{acks}");
        }
    }
}
