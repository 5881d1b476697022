//! What a remote still has to store, for stats: `replicationBacklog` (the entries after the
//! replication cursor's mark-delete position that the replicator will send, not those it will
//! skip: entries that came from another cluster, entries whose replication list leaves the
//! remote out, markers) and `replicationDelayInSeconds` (the age of the oldest of them).
//!
//! Telling the two apart needs each entry's metadata, so [`BacklogIndex`] scans the log once,
//! incrementally, and keeps one bit per entry ("the remote gets it") in groups of consecutive
//! entries. Each count (the replicator's backlog task runs one when entries are appended or
//! the cursor moves; stats read its result) drops the groups the cursor has passed, scans what
//! was appended since the last count (at most [`SCAN_MAX_ENTRIES`] / [`SCAN_MAX_BYTES`] per
//! count, so one count after a restart behind a large backlog stays short: until the scan has
//! caught up, the part not scanned yet counts every entry), and counts bits. The index holds at
//! most [`MAX_GROUPS`] groups (512 Ki entries in 88 KiB per replicator); beyond that, entries
//! count as in the plain backlog too.

use std::collections::VecDeque;

use meridian_storage::{Log, Position};
use meridian_wire::MessageMetadata;

/// Entries per group (one bit each).
const GROUP_ENTRIES: u64 = 512;
/// Groups the index keeps at most.
pub const MAX_GROUPS: usize = 1_024;
/// Entries a count scans at most.
pub const SCAN_MAX_ENTRIES: usize = 20_000;
/// Bytes a count reads at most.
pub const SCAN_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Bytes one read of a count asks for at most.
const READ_BYTES: usize = 1024 * 1024;

/// Whether an entry with this metadata is sent to `remote` (the replicator's rule): produced
/// here (no `replicated_from`), not a marker, and `replicate_to` empty or naming the remote.
pub(crate) fn meant_for(metadata: &MessageMetadata, remote: &str) -> bool {
    metadata.replicated_from.is_none()
        && metadata.marker_type.is_none()
        && (metadata.replicate_to.is_empty()
            || metadata.replicate_to.iter().any(|name| name == remote))
}

/// Consecutive entries of one ledger, `first_entry_id ..= first_entry_id + len - 1`.
struct Group {
    ledger_id: u64,
    first_entry_id: u64,
    len: u64,
    /// Bit `i`: the remote gets entry `first_entry_id + i`.
    meant: [u64; (GROUP_ENTRIES / 64) as usize],
}

impl Group {
    fn last(&self) -> Position {
        Position::new(self.ledger_id, self.first_entry_id + self.len - 1)
    }

    /// The entries after `after` (all of them for `None` or a position before the group):
    /// how many the remote gets, and the first of them.
    fn meant_after(&self, after: Option<Position>) -> (u64, Option<Position>) {
        let from = match after {
            Some(after)
                if after.ledger_id == self.ledger_id && after.entry_id >= self.first_entry_id =>
            {
                after.entry_id - self.first_entry_id + 1
            }
            Some(after) if after >= self.last() => self.len,
            _ => 0,
        };
        let mut count = 0;
        let mut first = None;
        for index in from..self.len {
            if self.meant[(index / 64) as usize] & (1 << (index % 64)) != 0 {
                count += 1;
                first.get_or_insert(Position::new(self.ledger_id, self.first_entry_id + index));
            }
        }
        (count, first)
    }

    /// Adds the entry that follows the group, if it does and there is room.
    fn push(&mut self, position: Position, meant: bool) -> bool {
        if position.ledger_id != self.ledger_id
            || position.entry_id != self.first_entry_id + self.len
            || self.len == GROUP_ENTRIES
        {
            return false;
        }
        if meant {
            self.meant[(self.len / 64) as usize] |= 1 << (self.len % 64);
        }
        self.len += 1;
        true
    }
}

/// What a remote still has to store, as of the replication cursor's mark-delete position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoteBacklog {
    /// Entries the remote still has to store.
    pub entries: u64,
    /// Publish time of the oldest of them (`None`: none).
    pub oldest_publish_time_ms: Option<u64>,
    /// The scan has not reached the end of the log yet (this call's bound).
    pub scanning: bool,
}

/// The scanned part of a replicator's backlog (see the module comment).
#[derive(Default)]
pub(crate) struct BacklogIndex {
    groups: VecDeque<Group>,
    /// The last entry scanned (`None`: nothing yet).
    scanned_to: Option<Position>,
}

impl BacklogIndex {
    /// What `remote` still has to store of `log` after `mark_delete` (the cursor's position;
    /// `None`: before everything).
    pub(crate) fn remote_backlog(
        &mut self,
        log: &Log,
        remote: &str,
        mark_delete: Option<Position>,
    ) -> RemoteBacklog {
        // Groups the cursor has passed are done with; a cursor moved back before what was
        // scanned (an admin reset) means scanning again from there.
        while self
            .groups
            .front()
            .is_some_and(|group| mark_delete.is_some_and(|position| group.last() <= position))
        {
            self.groups.pop_front();
        }
        let expected_start = match mark_delete {
            Some(position) => log.next_position(position),
            None => log.first_position().unwrap_or(Position::new(0, 0)),
        };
        let moved_back = self.groups.front().is_some_and(|group| {
            expected_start < Position::new(group.ledger_id, group.first_entry_id)
        });
        if moved_back {
            self.groups.clear();
        }
        if self.groups.is_empty() {
            // Scanning starts (again) right after the cursor.
            self.scanned_to = mark_delete;
        }
        let scanning = !self.scan(log, remote);

        let mut backlog = RemoteBacklog {
            scanning,
            ..RemoteBacklog::default()
        };
        let mut oldest = None;
        for group in &self.groups {
            let (count, first) = group.meant_after(mark_delete);
            backlog.entries += count;
            if oldest.is_none() {
                oldest = first;
            }
        }
        // What is not scanned yet counts every entry (its oldest one gives the delay).
        let unscanned_from = self.scanned_to.max(mark_delete);
        let unscanned = log.entries_after(unscanned_from);
        backlog.entries += unscanned;
        if oldest.is_none() && unscanned > 0 {
            oldest = Some(match unscanned_from {
                Some(position) => log.next_position(position),
                None => Position::new(0, 0),
            });
        }
        backlog.oldest_publish_time_ms = oldest.and_then(|position| {
            log.read_from(position, 1, 1)
                .ok()
                .and_then(|entries| entries.into_iter().next())
                .map(|entry| entry.publish_time_ms)
        });
        backlog
    }

    /// Scans the entries appended since the last scan, within this call's bounds; false if
    /// it stopped at a bound with more to scan.
    fn scan(&mut self, log: &Log, remote: &str) -> bool {
        let mut entries_left = SCAN_MAX_ENTRIES;
        let mut bytes_left = SCAN_MAX_BYTES;
        loop {
            let Some(last) = log.last_position() else {
                return true;
            };
            let from = match self.scanned_to {
                Some(position) => log.next_position(position),
                None => Position::new(0, 0),
            };
            if from > last || self.groups.len() >= MAX_GROUPS {
                // Done, or full (the rest counts every entry).
                return true;
            }
            if entries_left == 0 || bytes_left == 0 {
                return false;
            }
            // Small reads: only the metadata is wanted, and what is read is dropped at once.
            let read = match log.read_from(from, entries_left.min(256), bytes_left.min(READ_BYTES))
            {
                Ok(read) if !read.is_empty() => read,
                Ok(_) => return true,
                Err(meridian_storage::StorageError::PositionNotFound { .. }) => {
                    // Trimmed under us: go on from what is left.
                    match log.first_position() {
                        Some(first) if first > from => {
                            self.scanned_to = log.previous_position(first).or(Some(first));
                            continue;
                        }
                        _ => return true,
                    }
                }
                Err(_) => return true,
            };
            for entry in read {
                entries_left = entries_left.saturating_sub(1);
                bytes_left = bytes_left.saturating_sub(entry.data.len());
                let meant = meridian_wire::entry_parts(entry.data)
                    .map(|(metadata, _)| meant_for(&metadata, remote))
                    // The replicator skips an entry whose metadata does not decode.
                    .unwrap_or(false);
                let position = entry.position;
                self.scanned_to = Some(position);
                if self
                    .groups
                    .back_mut()
                    .is_some_and(|group| group.push(position, meant))
                {
                    continue;
                }
                if self.groups.len() == MAX_GROUPS {
                    // Full: the rest counts every entry (scanned_to stops here).
                    self.scanned_to = log.previous_position(position);
                    return true;
                }
                let mut group = Group {
                    ledger_id: position.ledger_id,
                    first_entry_id: position.entry_id,
                    len: 0,
                    meant: Default::default(),
                };
                group.push(position, meant);
                self.groups.push_back(group);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use meridian_storage::{Storage, StorageConfig};

    /// Appends an entry produced here (`None`), routed to `to`, or replicated from a cluster.
    fn append(
        log: &Arc<Log>,
        publish_time_ms: u64,
        replicated_from: Option<&str>,
        to: &[&str],
    ) -> Position {
        let metadata = MessageMetadata {
            producer_name: "p".into(),
            sequence_id: 0,
            publish_time: publish_time_ms,
            replicated_from: replicated_from.map(str::to_string),
            replicate_to: to.iter().map(|name| name.to_string()).collect(),
            ..MessageMetadata::default()
        };
        let entry = meridian_wire::encode_entry(&metadata, b"payload").expect("encodes");
        log.append(entry, publish_time_ms)
            .expect("appends")
            .wait()
            .expect("durable")
    }

    #[test]
    fn the_backlog_counts_only_entries_the_remote_gets_and_follows_the_cursor() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let storage = Storage::open(directory.path(), StorageConfig::default()).expect("opens");
        let log = storage.open_log("t").expect("log");
        let first = append(&log, 1_000, None, &[]);
        append(&log, 2_000, Some("c"), &[]);
        append(&log, 3_000, None, &["a", "c"]);
        let fourth = append(&log, 4_000, None, &["b"]);
        let mut index = BacklogIndex::default();
        let backlog = index.remote_backlog(&log, "b", None);
        assert_eq!(
            (
                backlog.entries,
                backlog.oldest_publish_time_ms,
                backlog.scanning
            ),
            (2, Some(1_000), false)
        );
        let backlog = index.remote_backlog(&log, "b", Some(first));
        assert_eq!(
            (backlog.entries, backlog.oldest_publish_time_ms),
            (1, Some(4_000))
        );
        append(&log, 5_000, None, &[]);
        let backlog = index.remote_backlog(&log, "b", Some(first));
        assert_eq!(
            (backlog.entries, backlog.oldest_publish_time_ms),
            (2, Some(4_000))
        );
        let backlog = index.remote_backlog(&log, "b", Some(fourth));
        assert_eq!(
            (backlog.entries, backlog.oldest_publish_time_ms),
            (1, Some(5_000))
        );
        // An admin moved the cursor back to the start: everything counts again.
        let backlog = index.remote_backlog(&log, "b", None);
        assert_eq!(
            (backlog.entries, backlog.oldest_publish_time_ms),
            (3, Some(1_000))
        );
        let last = log.last_position();
        let backlog = index.remote_backlog(&log, "b", last);
        assert_eq!((backlog.entries, backlog.oldest_publish_time_ms), (0, None));
    }

    #[test]
    fn a_group_counts_the_entries_meant_for_the_remote_after_a_position() {
        let mut group = Group {
            ledger_id: 7,
            first_entry_id: 10,
            len: 0,
            meant: Default::default(),
        };
        for (entry_id, meant) in [(10, true), (11, false), (12, true), (13, true)] {
            assert!(group.push(Position::new(7, entry_id), meant));
        }
        assert!(
            !group.push(Position::new(7, 15), true),
            "not the next entry"
        );
        assert!(!group.push(Position::new(8, 14), true), "another ledger");
        assert_eq!(group.meant_after(None), (3, Some(Position::new(7, 10))));
        assert_eq!(
            group.meant_after(Some(Position::new(7, 10))),
            (2, Some(Position::new(7, 12)))
        );
        assert_eq!(group.meant_after(Some(Position::new(7, 13))), (0, None));
        assert_eq!(
            group.meant_after(Some(Position::new(6, 99))),
            (3, Some(Position::new(7, 10)))
        );
        assert_eq!(group.meant_after(Some(Position::new(9, 0))), (0, None));
    }
}
