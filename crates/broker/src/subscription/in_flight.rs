//! The entries a subscription has delivered and not yet seen acknowledged, by position.
//!
//! Entries go out mostly in log order and are acknowledged mostly in the same order, one
//! insertion and one removal per delivered entry. A `BTreeMap` does that with node allocations
//! and rebalancing; here the entries sit in a sorted ring buffer: a new entry is pushed at the
//! back, an acknowledged one leaves a hole that is dropped once it reaches the front. Holes
//! behind an entry that stays unacknowledged are squeezed out once they outnumber the entries,
//! so the buffer holds at most about twice what is in flight. The rare entry that goes out
//! between two in flight (a Key_Shared entry held back while later ones went out) waits in a
//! small ordered map beside the buffer, so that it never shifts the buffer's middle.

use std::collections::{BTreeMap, VecDeque};

use meridian_storage::Position;

/// Holes kept before the buffer is squeezed, beyond one per entry in flight.
const SLACK: usize = 64;

/// Slots of room the buffer keeps whatever it holds; beyond that, room for four times what it
/// holds at most (a burst's buffer is given back once the burst is acknowledged).
const ROOM_KEPT: usize = 1024;

pub(super) struct InFlight<V> {
    /// Sorted by position; `None` is a hole. The front is never a hole.
    slots: VecDeque<(Position, Option<V>)>,
    /// Entries in `slots` that are not holes.
    live: usize,
    /// Entries inserted between two slots, keyed apart from them.
    between: BTreeMap<Position, V>,
}

impl<V> Default for InFlight<V> {
    fn default() -> Self {
        InFlight {
            slots: VecDeque::new(),
            live: 0,
            between: BTreeMap::new(),
        }
    }
}

impl<V> InFlight<V> {
    pub(super) fn len(&self) -> usize {
        self.live + self.between.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn clear(&mut self) {
        self.slots.clear();
        self.live = 0;
        self.between.clear();
    }

    fn slot(&self, position: Position) -> Option<usize> {
        // Acknowledgements in order find their entry at the front; entries about to go out
        // (looked up before they are sent) are past the back.
        match (self.slots.front(), self.slots.back()) {
            (Some((first, _)), _) if *first == position => Some(0),
            (Some((first, _)), Some((last, _))) if *first > position || *last < position => None,
            _ => self
                .slots
                .binary_search_by_key(&position, |(position, _)| *position)
                .ok(),
        }
    }

    pub(super) fn get(&self, position: Position) -> Option<&V> {
        match self.slot(position) {
            Some(index) => self.slots[index].1.as_ref(),
            None => self.between.get(&position),
        }
    }

    pub(super) fn contains(&self, position: Position) -> bool {
        self.get(position).is_some()
    }

    /// Records `value` at `position`, replacing what was there.
    pub(super) fn insert(&mut self, position: Position, value: V) {
        if let Some(held) = self.between.get_mut(&position) {
            *held = value;
            return;
        }
        if self.slots.back().is_none_or(|(last, _)| *last < position) {
            self.slots.push_back((position, Some(value)));
            self.live += 1;
            return;
        }
        match self
            .slots
            .binary_search_by_key(&position, |(position, _)| *position)
        {
            Ok(index) => {
                let slot = &mut self.slots[index].1;
                if slot.is_none() {
                    self.live += 1;
                }
                *slot = Some(value);
            }
            Err(0) => {
                self.slots.push_front((position, Some(value)));
                self.live += 1;
            }
            Err(_) => {
                self.between.insert(position, value);
            }
        }
    }

    pub(super) fn remove(&mut self, position: Position) -> Option<V> {
        let Some(index) = self.slot(position) else {
            return self.between.remove(&position);
        };
        let value = self.slots[index].1.take()?;
        self.live -= 1;
        while matches!(self.slots.front(), Some((_, None))) {
            self.slots.pop_front();
        }
        if self.slots.len() - self.live > self.live + SLACK {
            self.slots.retain(|(_, value)| value.is_some());
        }
        if self.slots.capacity() > ROOM_KEPT.max(4 * self.slots.len()) {
            self.slots.shrink_to(ROOM_KEPT.max(2 * self.slots.len()));
        }
        Some(value)
    }

    /// The first position in flight.
    pub(super) fn first(&self) -> Option<Position> {
        let in_slots = self.slots.front().map(|(position, _)| *position);
        let between = self.between.keys().next().copied();
        match (in_slots, between) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Every entry in flight, in position order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (Position, &V)> {
        let mut slots = self
            .slots
            .iter()
            .filter_map(|(position, value)| value.as_ref().map(|value| (*position, value)))
            .peekable();
        let mut between = self
            .between
            .iter()
            .map(|(position, value)| (*position, value))
            .peekable();
        std::iter::from_fn(move || match (slots.peek(), between.peek()) {
            (Some((a, _)), Some((b, _))) if b < a => between.next(),
            (Some(_), _) => slots.next(),
            (None, _) => between.next(),
        })
    }

    /// The positions in flight at or before `last`, in order.
    pub(super) fn positions_up_to(&self, last: Position) -> Vec<Position> {
        self.iter()
            .map(|(position, _)| position)
            .take_while(|position| *position <= last)
            .collect()
    }

    #[cfg(test)]
    fn slots_held(&self) -> usize {
        self.slots.len()
    }

    #[cfg(test)]
    fn room(&self) -> usize {
        self.slots.capacity()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Step {
        Insert(u64, u32),
        Remove(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        // Positions over two ledgers, so that order across a ledger boundary is exercised.
        prop_oneof![
            (0..120_u64, any::<u32>()).prop_map(|(at, value)| Step::Insert(at, value)),
            (0..120_u64).prop_map(Step::Remove),
        ]
    }

    fn position(at: u64) -> Position {
        Position::new(3 + at / 60, at % 60)
    }

    proptest! {
        /// Whatever the order of insertions and removals, it answers as an ordered map does.
        #[test]
        fn answers_as_an_ordered_map(steps in prop::collection::vec(step(), 0..400)) {
            let mut in_flight = InFlight::default();
            let mut model = BTreeMap::new();
            for step in steps {
                match step {
                    Step::Insert(at, value) => {
                        in_flight.insert(position(at), value);
                        model.insert(position(at), value);
                    }
                    Step::Remove(at) => {
                        prop_assert_eq!(in_flight.remove(position(at)), model.remove(&position(at)));
                    }
                }
                prop_assert_eq!(in_flight.len(), model.len());
                prop_assert_eq!(in_flight.is_empty(), model.is_empty());
                prop_assert_eq!(in_flight.first(), model.keys().next().copied());
                let listed: Vec<(Position, u32)> =
                    in_flight.iter().map(|(position, value)| (position, *value)).collect();
                let expected: Vec<(Position, u32)> =
                    model.iter().map(|(position, value)| (*position, *value)).collect();
                prop_assert_eq!(listed, expected);
                for at in [0, 30, 59, 60, 119] {
                    prop_assert_eq!(in_flight.get(position(at)), model.get(&position(at)));
                    prop_assert_eq!(
                        in_flight.positions_up_to(position(at)),
                        model.range(..=position(at)).map(|(position, _)| *position).collect::<Vec<_>>()
                    );
                }
            }
        }
    }

    #[test]
    fn one_entry_never_acknowledged_keeps_the_buffer_bounded() {
        // The first delivered entry stays in flight while a million after it come and go: the
        // holes behind it are squeezed out, not kept.
        let mut in_flight = InFlight::default();
        in_flight.insert(Position::new(1, 0), ());
        for entry in 1..1_000_000 {
            in_flight.insert(Position::new(1, entry), ());
            in_flight.remove(Position::new(1, entry));
            assert!(in_flight.slots_held() <= 2 * in_flight.len() + SLACK + 1);
        }
        assert_eq!(in_flight.len(), 1);
        assert_eq!(in_flight.first(), Some(Position::new(1, 0)));
    }

    #[test]
    fn the_room_a_burst_took_is_given_back_once_it_is_acknowledged() {
        let mut in_flight = InFlight::default();
        for entry in 0..100_000 {
            in_flight.insert(Position::new(1, entry), ());
        }
        assert!(in_flight.room() >= 100_000);
        // All but the last ten acknowledged, in order.
        for entry in 0..99_990 {
            in_flight.remove(Position::new(1, entry));
        }
        assert_eq!(in_flight.len(), 10);
        assert!(
            in_flight.room() <= ROOM_KEPT,
            "room for {} slots kept",
            in_flight.room()
        );
        // What is left still answers in order.
        assert_eq!(in_flight.first(), Some(Position::new(1, 99_990)));
        assert_eq!(in_flight.remove(Position::new(1, 99_999)), Some(()));
    }
}
