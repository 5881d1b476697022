//! Positions in a log: Pulsar's `(ledgerId, entryId)` pair.

use std::fmt;

/// Where an entry lives in a log. Ordering is lexicographic on `(ledger_id, entry_id)`, which
/// is the order entries were appended in: every open of a log starts a new, larger ledger id,
/// and entry ids start at 0 in each ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub ledger_id: u64,
    pub entry_id: u64,
}

impl Position {
    pub const fn new(ledger_id: u64, entry_id: u64) -> Self {
        Position {
            ledger_id,
            entry_id,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}:{}", self.ledger_id, self.entry_id)
    }
}
