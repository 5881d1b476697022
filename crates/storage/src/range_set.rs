//! A compact set of log positions: the individually acknowledged entries of a cursor.
//!
//! Positions are kept as closed ranges of entry ids within one ledger, so a million
//! acknowledgements in any order cost memory proportional to the number of *gaps* between them,
//! not to their count. Ranges never span ledgers (the set does not know where ledgers end);
//! that costs at most one extra range per ledger.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::Position;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// Start of each range → last entry id of that range (inclusive), same ledger.
    ranges: BTreeMap<Position, u64>,
}

impl RangeSet {
    pub fn new() -> Self {
        RangeSet::default()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Number of disjoint ranges.
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    /// Number of positions in the set.
    pub fn position_count(&self) -> u64 {
        self.ranges
            .iter()
            .map(|(start, last)| last - start.entry_id + 1)
            .sum()
    }

    pub fn contains(&self, position: Position) -> bool {
        match self.ranges.range(..=position).next_back() {
            Some((start, last)) => {
                start.ledger_id == position.ledger_id && position.entry_id <= *last
            }
            None => false,
        }
    }

    /// Adds one position; returns whether it was new.
    ///
    /// Called for every individual acknowledgement, so it looks at the ranges on either side
    /// once and changes at most two of them, allocating nothing beyond the map's own nodes.
    pub fn insert(&mut self, position: Position) -> bool {
        let (ledger, entry) = (position.ledger_id, position.entry_id);
        // The range starting at or before the position, if in its ledger: holds it, or ends
        // right before it (and takes it).
        let mut extends_previous = false;
        if let Some((start, last)) = self.ranges.range_mut(..=position).next_back() {
            if start.ledger_id == ledger {
                if entry <= *last {
                    return false;
                }
                extends_previous = *last + 1 == entry;
            }
        }
        // The range starting right after it, which joins it.
        let next = Position::new(ledger, entry.saturating_add(1));
        let joins_next = entry < u64::MAX && self.ranges.contains_key(&next);
        match (extends_previous, joins_next) {
            (true, joins_next) => {
                let last = if joins_next {
                    self.ranges.remove(&next).unwrap_or(entry)
                } else {
                    entry
                };
                if let Some((_, previous_last)) = self.ranges.range_mut(..position).next_back() {
                    *previous_last = last;
                }
            }
            (false, true) => {
                let last = self.ranges.remove(&next).unwrap_or(entry);
                self.ranges.insert(position, last);
            }
            (false, false) => {
                self.ranges.insert(position, entry);
            }
        }
        true
    }

    /// Adds entries `first..=last` of `ledger_id`, merging with overlapping or adjacent ranges.
    /// Allocates nothing beyond a new range's node: the replicated-subscription sync fills one
    /// hole of a long acknowledged tail per call, about one call per message it applies.
    pub fn insert_range(&mut self, ledger_id: u64, first: u64, last: u64) {
        debug_assert!(first <= last, "empty range {first}..={last}");
        // A range that starts before `first` and reaches it (or touches it) absorbs the new one.
        let (start, mut merged_last) = match self
            .ranges
            .range(..=Position::new(ledger_id, first))
            .next_back()
        {
            Some((start, end))
                if start.ledger_id == ledger_id && end.saturating_add(1) >= first =>
            {
                if *end >= last {
                    return;
                }
                (*start, last)
            }
            _ => (Position::new(ledger_id, first), last),
        };
        // Ranges that start inside the new one or right after it are absorbed too.
        loop {
            let upper = Position::new(ledger_id, merged_last.saturating_add(1));
            let Some((&next, &end)) = self
                .ranges
                .range((Bound::Excluded(start), Bound::Included(upper)))
                .next()
            else {
                break;
            };
            self.ranges.remove(&next);
            merged_last = merged_last.max(end);
        }
        self.ranges.insert(start, merged_last);
    }

    /// Removes every position `<= position`.
    pub fn remove_up_to(&mut self, position: Position) {
        let covered: Vec<(Position, u64)> = self
            .ranges
            .range(..=position)
            .map(|(start, end)| (*start, *end))
            .collect();
        for (start, end) in covered {
            self.ranges.remove(&start);
            if start.ledger_id == position.ledger_id && end > position.entry_id {
                self.ranges.insert(
                    Position::new(position.ledger_id, position.entry_id + 1),
                    end,
                );
            }
        }
    }

    /// Removes every position `> position` (all of them for `None`).
    pub fn remove_after(&mut self, position: Option<Position>) {
        let Some(position) = position else {
            self.ranges.clear();
            return;
        };
        let _ = self.ranges.split_off(&Position::new(
            position.ledger_id,
            position.entry_id.saturating_add(1),
        ));
        if let Some((start, end)) = self
            .ranges
            .range(..=position)
            .next_back()
            .map(|(start, end)| (*start, *end))
        {
            if start.ledger_id == position.ledger_id && end > position.entry_id {
                self.ranges.insert(start, position.entry_id);
            }
        }
    }

    /// The range containing `position`, as (first position, last entry id).
    pub fn range_containing(&self, position: Position) -> Option<(Position, u64)> {
        let (start, last) = self.ranges.range(..=position).next_back()?;
        (start.ledger_id == position.ledger_id && position.entry_id <= *last)
            .then_some((*start, *last))
    }

    /// The last position of the last range.
    pub fn last(&self) -> Option<Position> {
        self.ranges
            .last_key_value()
            .map(|(start, last)| Position::new(start.ledger_id, *last))
    }

    /// Ranges in order, as (ledger id, first entry id, last entry id).
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.ranges
            .iter()
            .map(|(start, last)| (start.ledger_id, start.entry_id, *last))
    }

    /// [`RangeSet::iter`] from the range holding or following `position` on: the ranges with
    /// a position at or after it, found without walking the ones before.
    pub fn iter_from(&self, position: Position) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        let from = match self.ranges.range(..=position).next_back() {
            Some((start, last))
                if start.ledger_id == position.ledger_id && *last >= position.entry_id =>
            {
                *start
            }
            _ => position,
        };
        self.ranges
            .range(from..)
            .map(|(start, last)| (start.ledger_id, start.entry_id, *last))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Operation {
        Insert(u64, u64),
        InsertRange(u64, u64, u64),
        RemoveUpTo(u64, u64),
    }

    fn operation() -> impl Strategy<Value = Operation> {
        prop_oneof![
            6 => (0..3u64, 0..60u64).prop_map(|(ledger, entry)| Operation::Insert(ledger, entry)),
            2 => (0..3u64, 0..60u64, 0..8u64)
                .prop_map(|(ledger, first, length)| Operation::InsertRange(ledger, first, first + length)),
            1 => (0..3u64, 0..60u64).prop_map(|(ledger, entry)| Operation::RemoveUpTo(ledger, entry)),
        ]
    }

    proptest! {
        /// The set behaves exactly like a plain set of positions, and stays canonical: ranges
        /// are disjoint, non-adjacent within a ledger, and never empty.
        #[test]
        fn matches_a_plain_set(operations in prop::collection::vec(operation(), 0..200)) {
            let mut set = RangeSet::new();
            let mut model: BTreeSet<Position> = BTreeSet::new();
            for operation in operations {
                match operation {
                    Operation::Insert(ledger, entry) => {
                        let position = Position::new(ledger, entry);
                        prop_assert_eq!(set.insert(position), model.insert(position));
                    }
                    Operation::InsertRange(ledger, first, last) => {
                        set.insert_range(ledger, first, last);
                        model.extend((first..=last).map(|entry| Position::new(ledger, entry)));
                    }
                    Operation::RemoveUpTo(ledger, entry) => {
                        let bound = Position::new(ledger, entry);
                        set.remove_up_to(bound);
                        model.retain(|position| *position > bound);
                    }
                }
                prop_assert_eq!(set.position_count(), model.len() as u64);
                for ledger in 0..3 {
                    for entry in 0..70 {
                        let position = Position::new(ledger, entry);
                        prop_assert_eq!(set.contains(position), model.contains(&position));
                    }
                }
                let ranges: Vec<_> = set.iter().collect();
                for ledger in 0..3 {
                    for entry in 0..70 {
                        let from = Position::new(ledger, entry);
                        let expected: Vec<_> = ranges
                            .iter()
                            .copied()
                            .filter(|(range_ledger, _, last)| Position::new(*range_ledger, *last) >= from)
                            .collect();
                        prop_assert_eq!(set.iter_from(from).collect::<Vec<_>>(), expected);
                    }
                }
                for pair in ranges.windows(2) {
                    let ((ledger_a, _, last_a), (ledger_b, first_b, _)) = (pair[0], pair[1]);
                    prop_assert!(ledger_a < ledger_b || last_a + 1 < first_b, "not canonical: {:?}", ranges);
                }
            }
        }
    }

    #[test]
    fn a_million_out_of_order_acks_collapse() {
        let mut set = RangeSet::new();
        // Acknowledge the odd entries, then the even ones, in reverse order.
        for entry in (0..1_000_000u64).rev().filter(|entry| entry % 2 == 1) {
            set.insert(Position::new(1, entry));
        }
        assert_eq!(set.range_count(), 500_000);
        for entry in (0..1_000_000u64).rev().filter(|entry| entry % 2 == 0) {
            set.insert(Position::new(1, entry));
        }
        assert_eq!(set.range_count(), 1);
        assert_eq!(set.position_count(), 1_000_000);
    }
}
