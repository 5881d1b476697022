//! Message ids: where a message sits in a topic.

use std::cmp::Ordering;
use std::fmt;

use meridian_wire::MessageIdData;

/// The position of one message: `(ledger_id, entry_id)` is the stored entry,
/// `batch_index` the message inside a batch entry (-1 for an entry holding one
/// message) and `partition` the partition of a partitioned topic (-1 for a
/// topic that is not partitioned).
///
/// Ids order as Pulsar orders them: by ledger and entry compared as *signed*
/// 64-bit numbers (so [`MessageId::EARLIEST`], which is -1/-1 on the wire,
/// sorts first and [`MessageId::LATEST`] last), then partition, then batch
/// index. Only ids of the same partition are meaningful to compare.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageId {
    /// Ledger of the entry, as a wire `u64` (-1 is `u64::MAX`).
    pub ledger_id: u64,
    /// Entry within the ledger, as a wire `u64` (-1 is `u64::MAX`).
    pub entry_id: u64,
    /// Partition index, or -1 for a topic that is not partitioned.
    pub partition: i32,
    /// Index within a batch entry, or -1 when the entry is not a batch.
    pub batch_index: i32,
}

impl MessageId {
    /// Before the first message: ledger -1, entry -1.
    pub const EARLIEST: MessageId = MessageId {
        ledger_id: u64::MAX,
        entry_id: u64::MAX,
        partition: -1,
        batch_index: -1,
    };

    /// After the last message: ledger and entry `i64::MAX`.
    pub const LATEST: MessageId = MessageId {
        ledger_id: i64::MAX as u64,
        entry_id: i64::MAX as u64,
        partition: -1,
        batch_index: -1,
    };

    /// The id of a whole entry of a topic that is not partitioned.
    pub fn new(ledger_id: u64, entry_id: u64) -> MessageId {
        MessageId {
            ledger_id,
            entry_id,
            partition: -1,
            batch_index: -1,
        }
    }

    /// Whether this is the [`MessageId::EARLIEST`] sentinel (any partition).
    pub fn is_earliest(&self) -> bool {
        self.ledger_id == u64::MAX && self.entry_id == u64::MAX
    }

    /// Whether this is the [`MessageId::LATEST`] sentinel (any partition).
    pub fn is_latest(&self) -> bool {
        self.ledger_id == i64::MAX as u64 && self.entry_id == i64::MAX as u64
    }

    /// The same id with another partition index.
    pub fn with_partition(self, partition: i32) -> MessageId {
        MessageId { partition, ..self }
    }

    /// The same id with another batch index.
    pub fn with_batch_index(self, batch_index: i32) -> MessageId {
        MessageId {
            batch_index,
            ..self
        }
    }

    /// Reads a wire id. The broker may leave `partition` out; the caller then
    /// supplies the partition it knows the message came from.
    pub fn from_data(data: &MessageIdData, partition: i32) -> MessageId {
        MessageId {
            ledger_id: data.ledger_id,
            entry_id: data.entry_id,
            partition: data
                .partition
                .filter(|index| *index >= 0)
                .unwrap_or(partition),
            batch_index: data.batch_index(),
        }
    }

    /// The wire form: ledger, entry, and partition/batch index when set.
    pub fn to_data(&self) -> MessageIdData {
        MessageIdData {
            ledger_id: self.ledger_id,
            entry_id: self.entry_id,
            partition: (self.partition >= 0).then_some(self.partition),
            batch_index: (self.batch_index >= 0).then_some(self.batch_index),
            ..MessageIdData::default()
        }
    }

    /// The wire form of the whole entry (no batch index), as acks and
    /// redelivery requests name entries.
    pub(crate) fn entry_data(&self) -> MessageIdData {
        MessageIdData {
            ledger_id: self.ledger_id,
            entry_id: self.entry_id,
            ..MessageIdData::default()
        }
    }

    /// `(ledger, entry)` as signed numbers: the stored entry, ordered.
    pub(crate) fn entry_key(&self) -> (i64, i64) {
        (self.ledger_id as i64, self.entry_id as i64)
    }

    /// Compares positions within one partition, ignoring the partition index
    /// (a user's start id may carry -1 where delivered ids carry the index).
    /// A batch index of -1 (a whole entry) sorts before index 0 of the same
    /// entry.
    pub(crate) fn position_cmp(&self, other: &MessageId) -> Ordering {
        self.entry_key()
            .cmp(&other.entry_key())
            .then(self.batch_index.cmp(&other.batch_index))
    }
}

impl Ord for MessageId {
    fn cmp(&self, other: &Self) -> Ordering {
        self.entry_key()
            .cmp(&other.entry_key())
            .then(self.partition.cmp(&other.partition))
            .then(self.batch_index.cmp(&other.batch_index))
    }
}

impl PartialOrd for MessageId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for MessageId {
    /// `ledger:entry:partition:batch_index` with signed numbers, as Pulsar prints ids.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{}:{}:{}:{}",
            self.ledger_id as i64, self.entry_id as i64, self.partition, self.batch_index
        )
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "MessageId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinels_order_around_every_real_id() {
        let id = MessageId::new(7, 3);
        assert!(MessageId::EARLIEST < id);
        assert!(id < MessageId::LATEST);
        assert!(MessageId::EARLIEST < MessageId::new(0, 0));
        assert!(MessageId::EARLIEST.is_earliest());
        assert!(MessageId::LATEST.is_latest());
        assert_eq!(MessageId::EARLIEST.to_data().ledger_id, u64::MAX);
        assert_eq!(MessageId::LATEST.to_data().entry_id, i64::MAX as u64);
    }

    #[test]
    fn ids_order_by_ledger_entry_then_batch_index() {
        let a = MessageId::new(1, 9).with_batch_index(2);
        let b = MessageId::new(2, 0);
        let c = MessageId::new(2, 0).with_batch_index(0);
        assert!(a < b);
        assert!(b < c);
        assert_eq!(
            MessageId::new(2, 0)
                .with_partition(3)
                .position_cmp(&MessageId::new(2, 0)),
            Ordering::Equal
        );
    }

    #[test]
    fn wire_round_trip_keeps_partition_and_batch_index() {
        let id = MessageId::new(5, 6).with_partition(2).with_batch_index(4);
        assert_eq!(MessageId::from_data(&id.to_data(), -1), id);
        let entry = MessageId::new(5, 6);
        assert_eq!(
            MessageId::from_data(&entry.to_data(), 1),
            entry.with_partition(1)
        );
        assert_eq!(format!("{}", MessageId::EARLIEST), "-1:-1:-1:-1");
    }
}
