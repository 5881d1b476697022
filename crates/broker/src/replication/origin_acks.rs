//! A subscription's acknowledgements in *origin coordinates*: the form in which one cluster
//! tells another exactly what its consumers have acknowledged.
//!
//! Positions differ between clusters, but every entry of a replicated topic has an origin: the
//! cluster that first stored it and its position there (a local entry is its own origin; a
//! replicated one carries `replicated_from` and the origin position). Replication sends each
//! origin's entries in order and the remote refuses gaps, so in every cluster the entries of one
//! origin appear in the order of their origin positions. That makes a per-origin description
//! exact:
//!
//! - `acked_below`: every entry of this origin that the sender stores with an origin position
//!   below this bound is acknowledged;
//! - `ranges`: the acknowledged origin positions at or beyond the bound, as inclusive ranges
//!   (out-of-order acknowledgements: Shared and Key_Shared subscriptions, negative acks).
//!
//! The receiver acknowledges an entry of its own when the sender's state covers the entry's
//! origin position *and* the entry reached the sender at all (a message whose `replicate_to`
//! left the sender out was never offered to the sender's consumers). Entries the receiver has
//! not received yet are covered when they arrive.

use std::collections::BTreeMap;

use meridian_storage::Position;
use serde::{Deserialize, Serialize};

/// What one cluster's subscription has acknowledged, per origin cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginAcks {
    pub origins: BTreeMap<String, OriginProgress>,
}

/// The acknowledged entries of one origin cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginProgress {
    /// Every entry of this origin with an origin position below this one is acknowledged.
    #[serde(rename = "ackedBelow", with = "position_text::option")]
    pub acked_below: Option<Position>,
    /// Acknowledged origin positions at or beyond `acked_below`: ascending, disjoint, inclusive.
    #[serde(with = "position_text::ranges")]
    pub ranges: Vec<(Position, Position)>,
    /// The oldest origin position of this origin the sender stores: `acked_below` speaks only
    /// for entries from here on, since entries before it may never have reached the sender
    /// (replication to it started later). `None`: unknown, and `acked_below` covers nothing.
    #[serde(
        rename = "storedFrom",
        default,
        skip_serializing_if = "Option::is_none",
        with = "position_text::option"
    )]
    pub stored_from: Option<Position>,
    /// Entries of this origin acknowledged in part (batch-index acknowledgements): origin
    /// position and the batch's `ack_set` words (bit set: message not acknowledged), ascending.
    /// Batches are replicated whole, so the same words mean the same messages everywhere.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "position_text::batches"
    )]
    pub batches: Vec<(Position, Vec<u64>)>,
}

impl OriginAcks {
    /// Whether the sender acknowledged the entry of `origin` at `position`. `reached_sender`
    /// says whether that entry was meant for the sender at all (its replication list allows the
    /// sender); an entry the sender never had is never covered.
    pub fn covers(&self, origin: &str, position: Position, reached_sender: bool) -> bool {
        if !reached_sender {
            return false;
        }
        let Some(progress) = self.origins.get(origin) else {
            return false;
        };
        let stored = progress.stored_from.is_some_and(|from| from <= position);
        if stored && progress.acked_below.is_some_and(|bound| position < bound) {
            return true;
        }
        // The last range starting at or before the position is the only one that can hold it.
        let after = progress
            .ranges
            .partition_point(|(start, _)| *start <= position);
        after > 0 && position <= progress.ranges[after - 1].1
    }

    /// The sender's partial acknowledgement of the batch entry of `origin` at `position`
    /// (`ack_set` words), if it acknowledged some of its messages and not all.
    pub fn partial(
        &self,
        origin: &str,
        position: Position,
        reached_sender: bool,
    ) -> Option<&[u64]> {
        if !reached_sender {
            return None;
        }
        let batches = &self.origins.get(origin)?.batches;
        let index = batches
            .binary_search_by(|(start, _)| start.cmp(&position))
            .ok()?;
        Some(&batches[index].1)
    }

    /// How many acknowledged ranges beyond the bounds the state holds (its size on the wire).
    pub fn range_count(&self) -> usize {
        self.origins
            .values()
            .map(|progress| progress.ranges.len())
            .sum()
    }
}

/// Builds [`OriginAcks`] from a walk over a subscription's entries.
///
/// Give it, per origin, the origin position of its last entry at or before the mark-delete
/// position ([`OriginAcksBuilder::new`]), then every entry after the mark-delete position in log
/// order with its origin and whether it is acknowledged ([`OriginAcksBuilder::entry`]), at least
/// up to the last individually acknowledged entry. Everything after the walk is taken as
/// unacknowledged, and an origin the builder never hears of is not acknowledged at all: a
/// missing piece of input can only cost a redelivery, never a lost message.
#[derive(Debug, Clone, Default)]
pub struct OriginAcksBuilder {
    origins: BTreeMap<String, Walk>,
}

#[derive(Debug, Clone, Default)]
struct Walk {
    /// The bound below which everything is acknowledged, while no unacknowledged entry has
    /// been met; fixed at the first unacknowledged entry.
    acked_below: Option<Position>,
    met_unacknowledged: bool,
    ranges: Vec<(Position, Position)>,
    /// Whether the previous entry of this origin in the walk was acknowledged (and so ends the
    /// last range).
    previous_acknowledged: bool,
    batches: Vec<(Position, Vec<u64>)>,
}

impl OriginAcksBuilder {
    /// `through_mark_delete`: per origin, the origin position of its last entry at or before
    /// the subscription's mark-delete position.
    pub fn new(through_mark_delete: &BTreeMap<String, Position>) -> OriginAcksBuilder {
        let origins = through_mark_delete
            .iter()
            .map(|(origin, position)| {
                let walk = Walk {
                    acked_below: Some(just_after(*position)),
                    ..Walk::default()
                };
                (origin.clone(), walk)
            })
            .collect();
        OriginAcksBuilder { origins }
    }

    /// The next entry after the mark-delete position, in log order.
    pub fn entry(&mut self, origin: &str, position: Position, acknowledged: bool) {
        self.entry_in_part(origin, position, acknowledged, None);
    }

    /// [`OriginAcksBuilder::entry`] for an entry whose batch may be acknowledged in part
    /// (`partial`: its `ack_set` words); such an entry counts as unacknowledged.
    pub fn entry_in_part(
        &mut self,
        origin: &str,
        position: Position,
        acknowledged: bool,
        partial: Option<&[u64]>,
    ) {
        let acknowledged = match partial {
            Some(words) if !acknowledged => {
                self.walk(origin).batches.push((position, words.to_vec()));
                false
            }
            _ => acknowledged,
        };
        self.span(origin, position, position, acknowledged);
    }

    /// The next entries after the mark-delete position, in log order: consecutive entries of
    /// `origin` at origin positions `first..=last`, all acknowledged or all not. The same as
    /// [`OriginAcksBuilder::entry`] for each of them, at the cost of one.
    pub fn span(&mut self, origin: &str, first: Position, last: Position, acknowledged: bool) {
        let walk = self.walk(origin);
        match (acknowledged, walk.met_unacknowledged) {
            (true, false) => walk.acked_below = Some(just_after(last)),
            (true, true) => match walk.ranges.last_mut() {
                Some(range) if walk.previous_acknowledged => range.1 = last,
                _ => walk.ranges.push((first, last)),
            },
            (false, _) => {
                if !walk.met_unacknowledged {
                    walk.met_unacknowledged = true;
                    walk.acked_below = Some(first);
                }
            }
        }
        walk.previous_acknowledged = acknowledged;
    }

    fn walk(&mut self, origin: &str) -> &mut Walk {
        if !self.origins.contains_key(origin) {
            self.origins.insert(origin.to_string(), Walk::default());
        }
        self.origins.get_mut(origin).expect("inserted above")
    }

    /// The state. `stored_from`: per origin, the oldest origin position of it the sender
    /// stores (see [`OriginProgress::stored_from`]).
    pub fn finish(self, stored_from: &BTreeMap<String, Position>) -> OriginAcks {
        let origins = self
            .origins
            .into_iter()
            .map(|(origin, walk)| {
                let progress = OriginProgress {
                    acked_below: walk.acked_below,
                    ranges: walk.ranges,
                    stored_from: stored_from.get(&origin).copied(),
                    batches: walk.batches,
                };
                (origin, progress)
            })
            .collect();
        OriginAcks { origins }
    }
}

/// The smallest position after `position` in the order of positions (an exclusive bound that
/// admits `position`; it need not exist in any log).
fn just_after(position: Position) -> Position {
    Position::new(position.ledger_id, position.entry_id.saturating_add(1))
}

/// Positions as Pulsar writes them in JSON: `"ledger:entry"`. A state is decoded at every post
/// a cluster receives (ten a second per replicated subscription at the default interval), so
/// positions are parsed straight from the JSON text and written without building strings.
mod position_text {

    use std::fmt;

    use meridian_storage::Position;
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserialize, Deserializer, Serializer};

    fn parse<E: Error>(text: &str) -> Result<Position, E> {
        let malformed = || E::custom(format!("position {text:?} is not ledger:entry"));
        // Decimal digits only, at least one, no overflow: what `u64::from_str` takes without
        // a sign.
        let number = |digits: &[u8]| {
            if digits.is_empty() {
                return None;
            }
            digits.iter().try_fold(0u64, |value, digit| {
                let digit = digit.checked_sub(b'0').filter(|digit| *digit <= 9)?;
                value.checked_mul(10)?.checked_add(u64::from(digit))
            })
        };
        let bytes = text.as_bytes();
        let colon = bytes
            .iter()
            .position(|byte| *byte == b':')
            .ok_or_else(malformed)?;
        let ledger = number(&bytes[..colon]).ok_or_else(malformed)?;
        let entry = number(&bytes[colon + 1..]).ok_or_else(malformed)?;
        Ok(Position::new(ledger, entry))
    }

    /// One position, decoded from its text where the input lends it (JSON without escapes).
    struct Text(Position);

    impl<'de> Deserialize<'de> for Text {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Text, D::Error> {
            struct TextVisitor;
            impl Visitor<'_> for TextVisitor {
                type Value = Text;
                fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                    formatter.write_str("a position as \"ledger:entry\"")
                }
                fn visit_str<E: Error>(self, text: &str) -> Result<Text, E> {
                    parse(text).map(Text)
                }
            }
            deserializer.deserialize_str(TextVisitor)
        }
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(
            value: &Option<Position>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match value {
                Some(position) => serializer.collect_str(position),
                None => serializer.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Position>, D::Error> {
            Ok(Option::<Text>::deserialize(deserializer)?.map(|Text(position)| position))
        }
    }

    /// A sequence, decoded element by element into a vector of at most `limit` reserved
    /// entries up front (the length comes from the input).
    fn decode_seq<'de, D, T, U>(
        deserializer: D,
        convert: impl Fn(T) -> U,
    ) -> Result<Vec<U>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        struct SeqVisitor<T, F>(F, std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>, U, F: Fn(T) -> U> Visitor<'de> for SeqVisitor<T, F> {
            type Value = Vec<U>;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a sequence")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<U>, A::Error> {
                let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(value) = seq.next_element::<T>()? {
                    values.push((self.0)(value));
                }
                Ok(values)
            }
        }
        deserializer.deserialize_seq(SeqVisitor(convert, std::marker::PhantomData))
    }

    pub mod batches {
        use super::*;

        pub fn serialize<S: Serializer>(
            batches: &[(Position, Vec<u64>)],
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            serializer.collect_seq(
                batches
                    .iter()
                    .map(|(position, words)| (position.to_string(), words)),
            )
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Vec<(Position, Vec<u64>)>, D::Error> {
            let batches = decode_seq(deserializer, |(Text(position), words): (Text, Vec<u64>)| {
                (position, words)
            })?;
            if !batches.windows(2).all(|pair| pair[0].0 < pair[1].0) {
                return Err(D::Error::custom("batches must be ascending"));
            }
            Ok(batches)
        }
    }

    pub mod ranges {
        use super::*;

        pub fn serialize<S: Serializer>(
            ranges: &[(Position, Position)],
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            serializer.collect_seq(ranges.iter().map(|(start, end)| Pair(*start, *end)))
        }

        /// A range as `["ledger:entry", "ledger:entry"]`, written without building strings.
        struct Pair(Position, Position);

        impl serde::Serialize for Pair {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeTuple;
                let mut tuple = serializer.serialize_tuple(2)?;
                tuple.serialize_element(&Display(self.0))?;
                tuple.serialize_element(&Display(self.1))?;
                tuple.end()
            }
        }

        struct Display(Position);

        impl serde::Serialize for Display {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(&self.0)
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Vec<(Position, Position)>, D::Error> {
            let ranges = decode_seq(deserializer, |[Text(start), Text(end)]: [Text; 2]| {
                (start, end)
            })?;
            let ordered = ranges.iter().all(|(start, end)| start <= end)
                && ranges.windows(2).all(|pair| pair[0].1 < pair[1].0);
            if !ordered {
                return Err(D::Error::custom(
                    "ranges must be ascending, disjoint and each start at or before its end",
                ));
            }
            Ok(ranges)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ledger: u64, entry: u64) -> Position {
        Position::new(ledger, entry)
    }

    /// One cluster's log: (origin cluster, origin position, acknowledged) in log order.
    fn walk(
        through_mark_delete: &[(&str, Position)],
        entries: &[(&str, Position, bool)],
    ) -> OriginAcks {
        let base = through_mark_delete
            .iter()
            .map(|(origin, position)| (origin.to_string(), *position))
            .collect();
        let mut builder = OriginAcksBuilder::new(&base);
        for (origin, position, acknowledged) in entries {
            builder.entry(origin, *position, *acknowledged);
        }
        let stored_from = ["a", "b", "c"]
            .iter()
            .map(|origin| (origin.to_string(), at(0, 0)))
            .collect();
        builder.finish(&stored_from)
    }

    #[test]
    fn out_of_order_acknowledgements_translate_exactly() {
        // Cluster a's log: its own entries interleaved with entries from b.
        let acks = walk(
            &[("a", at(1, 4)), ("b", at(7, 2))],
            &[
                ("a", at(1, 5), true),
                ("b", at(7, 3), true),
                ("a", at(1, 6), false),
                ("b", at(7, 4), false),
                ("a", at(1, 7), true),
                ("a", at(1, 8), true),
                ("b", at(7, 5), true),
                ("a", at(1, 9), false),
                ("a", at(2, 0), true),
            ],
        );
        let covered = |origin, position| acks.covers(origin, position, true);
        // Before the mark-delete and the acknowledged prefix.
        assert!(covered("a", at(1, 0)) && covered("a", at(1, 5)));
        assert!(covered("b", at(7, 2)) && covered("b", at(7, 3)));
        // The gaps stay unacknowledged, the out-of-order acks are carried.
        assert!(!covered("a", at(1, 6)) && !covered("a", at(1, 9)));
        assert!(covered("a", at(1, 7)) && covered("a", at(1, 8)) && covered("a", at(2, 0)));
        assert!(!covered("b", at(7, 4)) && covered("b", at(7, 5)));
        // What the sender never stored yet is not acknowledged.
        assert!(!covered("a", at(2, 1)) && !covered("b", at(7, 6)));
        assert!(
            !covered("c", at(1, 0)),
            "an origin the sender knows nothing of"
        );
        assert_eq!(acks.range_count(), 3);
    }

    #[test]
    fn an_entry_that_never_reached_the_sender_is_not_covered() {
        let acks = walk(&[("a", at(1, 9))], &[]);
        assert!(acks.covers("a", at(1, 3), true));
        assert!(!acks.covers("a", at(1, 3), false));
    }

    #[test]
    fn entries_after_the_walk_are_unacknowledged() {
        // b's entries all lie before the mark-delete position; a's acknowledged after it.
        let acks = walk(
            &[("b", at(5, 8))],
            &[("a", at(3, 0), true), ("a", at(3, 1), true)],
        );
        assert!(acks.covers("a", at(3, 1), true) && !acks.covers("a", at(3, 2), true));
        assert!(acks.covers("b", at(5, 8), true) && !acks.covers("b", at(5, 9), true));
    }

    #[test]
    fn entries_before_what_the_sender_stores_are_not_covered() {
        let mut builder = OriginAcksBuilder::new(&BTreeMap::from([("b".to_string(), at(4, 9))]));
        builder.entry("b", at(5, 0), true);
        let stored_from = BTreeMap::from([("b".to_string(), at(4, 5))]);
        let acks = builder.finish(&stored_from);
        assert!(acks.covers("b", at(4, 5), true) && acks.covers("b", at(5, 0), true));
        assert!(
            !acks.covers("b", at(4, 4), true),
            "replication to the sender started after it"
        );
        let unknown = OriginAcksBuilder::new(&BTreeMap::from([("b".to_string(), at(4, 9))]))
            .finish(&BTreeMap::new());
        assert!(
            !unknown.covers("b", at(4, 9), true),
            "nothing is known stored"
        );
    }

    #[test]
    fn nothing_acknowledged_covers_nothing() {
        let acks = walk(&[], &[("a", at(1, 0), false)]);
        assert!(!acks.covers("a", at(1, 0), true));
        assert_eq!(acks.origins["a"].acked_below, Some(at(1, 0)));
    }

    #[test]
    fn the_wire_form_round_trips_and_rejects_malformed_ranges() {
        let acks = walk(
            &[("a", at(1, 1))],
            &[("a", at(1, 2), false), ("a", at(1, 3), true)],
        );
        let text = serde_json::to_string(&acks).expect("encode");
        assert_eq!(
            text,
            r#"{"origins":{"a":{"ackedBelow":"1:2","ranges":[["1:3","1:3"]],"storedFrom":"0:0"}}}"#
        );
        assert_eq!(
            serde_json::from_str::<OriginAcks>(&text).expect("decode"),
            acks
        );
        let overlapping =
            r#"{"origins":{"a":{"ackedBelow":null,"ranges":[["1:3","1:5"],["1:4","1:6"]]}}}"#;
        assert!(serde_json::from_str::<OriginAcks>(overlapping).is_err());
        let reversed = r#"{"origins":{"a":{"ackedBelow":null,"ranges":[["1:5","1:3"]]}}}"#;
        assert!(serde_json::from_str::<OriginAcks>(reversed).is_err());
        for garbage in [
            "x",
            "1",
            ":2",
            "1:",
            "1:2:3",
            "-1:2",
            "+1:2",
            "1:99999999999999999999",
        ] {
            let text = format!(r#"{{"origins":{{"a":{{"ackedBelow":"{garbage}","ranges":[]}}}}}}"#);
            assert!(
                serde_json::from_str::<OriginAcks>(&text).is_err(),
                "{garbage} was taken"
            );
        }
        // Batches keep their form, and a position written with a JSON escape still reads.
        let mut batched = acks.clone();
        batched.origins.get_mut("a").expect("origin a").batches = vec![(at(1, 4), vec![6])];
        let text = serde_json::to_string(&batched).expect("encode");
        assert!(text.ends_with(r#""batches":[["1:4",[6]]]}}}"#), "{text}");
        assert_eq!(
            serde_json::from_str::<OriginAcks>(&text).expect("decode"),
            batched
        );
        let escaped = r#"{"origins":{"a":{"ackedBelow":"1\u003a2","ranges":[["1:3","1\u003a3"]],"storedFrom":"0:0"}}}"#;
        assert_eq!(
            serde_json::from_str::<OriginAcks>(escaped).expect("decode"),
            acks
        );
    }
}
