//! A read-only summary of a log from its files, without opening it: for stats of topics that
//! are not loaded (a partitioned topic's stats must not open every partition).
//!
//! Nothing is written, locked or registered, and no file stays open. A segment followed by
//! another of its ledger is summed from its name and size; the last segment of each ledger, and
//! one a cursor's mark-delete position falls inside, are walked record by record (framing and
//! entry id only, bodies skipped, checksums not verified). The cursor journal is decoded as an
//! open would. A torn tail ends the walk where an open would
//! truncate it. If the log is opened or written meanwhile, the summary is that of some moment
//! during the walk, which is all stats promise.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::cursor::{decode_record as decode_journal_record, CursorState};
use crate::error::{Result, StorageError};
use crate::format::{decode_record, HEADER_LEN, RECORD_FRAMING_LEN, SALTED_FORMAT_VERSION};
use crate::position::Position;

/// What a log's files hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClosedLogSummary {
    /// Entries in its segments.
    pub entries: u64,
    /// Bytes of its segment files.
    pub storage_bytes: u64,
    /// Each cursor's state and backlog, by name.
    pub cursors: BTreeMap<String, ClosedCursorSummary>,
}

/// One cursor of a log that is not open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClosedCursorSummary {
    pub state: CursorState,
    /// Entries after the mark-delete position that are not acknowledged.
    pub backlog_entries: u64,
    /// Bytes of the entries after the mark-delete position, framing included.
    pub backlog_bytes: u64,
}

/// The summary of log `name` under the storage root `root` (see [`crate::Storage::root`]);
/// `None` if it has no directory.
pub fn summarize_closed_log(root: &Path, name: &str) -> Result<Option<ClosedLogSummary>> {
    let directory = root.join("logs").join(crate::engine::encode_name(name));
    let listing = match std::fs::read_dir(&directory) {
        Ok(listing) => listing,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(StorageError::io("list directory", &directory, error)),
    };
    let mut segments: Vec<(u64, u64, std::path::PathBuf)> = Vec::new();
    for item in listing {
        let item = item.map_err(|error| StorageError::io("list directory", &directory, error))?;
        let file_name = item.file_name();
        let Some(stem) = file_name.to_str().and_then(|n| n.strip_suffix(".segment")) else {
            continue;
        };
        let Some((ledger, first)) = stem.split_once('-') else {
            continue;
        };
        if let (Ok(ledger), Ok(first)) = (ledger.parse::<u64>(), first.parse::<u64>()) {
            segments.push((ledger, first, item.path()));
        }
    }
    segments.sort();

    let mut summary = ClosedLogSummary::default();
    // The last entry the files hold.
    let mut last_entry: Option<Position> = None;
    for (name, state) in read_journal(&directory.join("cursors.journal"))? {
        summary.cursors.insert(
            name,
            ClosedCursorSummary {
                state,
                ..ClosedCursorSummary::default()
            },
        );
    }
    for (index, (ledger, first, path)) in segments.iter().enumerate() {
        // A segment followed by another of its ledger holds the entries up to that one's
        // first, and nothing but records after its header: it is walked only if a cursor's
        // mark-delete position falls inside it. The last segment of a ledger is walked to
        // count its entries (and to stop at a seal or a torn tail).
        let next_first = segments
            .get(index + 1)
            .filter(|next| next.0 == *ledger)
            .map(|next| next.1);
        let cut_by_a_cursor = |last: Position| {
            summary.cursors.values().any(|cursor| {
                cursor
                    .state
                    .mark_delete
                    .is_some_and(|mark| mark >= Position::new(*ledger, *first) && mark < last)
            })
        };
        match next_first {
            Some(next_first)
                if next_first > *first
                    && !cut_by_a_cursor(Position::new(*ledger, next_first - 1)) =>
            {
                let length = match std::fs::metadata(path) {
                    Ok(metadata) => metadata.len(),
                    // Trimmed meanwhile.
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(error) => return Err(StorageError::io("stat", path, error)),
                };
                let count = next_first - first;
                let records = length.saturating_sub(HEADER_LEN);
                summary.entries += count;
                last_entry = Some(Position::new(*ledger, next_first - 1));
                summary.storage_bytes += length;
                for cursor in summary.cursors.values_mut() {
                    let first_position = Position::new(*ledger, *first);
                    if cursor
                        .state
                        .mark_delete
                        .is_none_or(|mark| mark < first_position)
                    {
                        cursor.backlog_entries += count;
                        cursor.backlog_bytes += records;
                    }
                }
            }
            _ => {
                // Only the log's newest segment file can hold bytes of a recycled file's
                // earlier life (after a crash): every older one was cut to its records.
                let newest = index + 1 == segments.len();
                let walked = (*ledger, *first, newest);
                let (bytes, _) = walk_segment(path, walked, |position, record_len| {
                    summary.entries += 1;
                    last_entry = Some(position);
                    for cursor in summary.cursors.values_mut() {
                        if cursor.state.mark_delete.is_none_or(|mark| position > mark) {
                            cursor.backlog_entries += 1;
                            cursor.backlog_bytes += record_len;
                        }
                    }
                })?;
                summary.storage_bytes += bytes;
            }
        }
    }
    for cursor in summary.cursors.values_mut() {
        // As an open log counts: the entries after the mark-delete position less those
        // acknowledged individually, of the entries that exist (an open drops the
        // acknowledgements of entries after the last one: lost in a power cut in relaxed mode).
        cursor.state.acknowledged.remove_after(last_entry);
        cursor.backlog_entries = cursor
            .backlog_entries
            .saturating_sub(cursor.state.acknowledged.position_count());
    }
    Ok(Some(summary))
}

/// The cursors of log `name` under `root` as its journal holds them (empty if it has none),
/// without walking its segments.
pub fn closed_log_cursors(root: &Path, name: &str) -> Result<BTreeMap<String, CursorState>> {
    let directory = root.join("logs").join(crate::engine::encode_name(name));
    read_journal(&directory.join("cursors.journal"))
}

/// Calls `on_entry(position, record length)` for each entry of a segment; returns the file's
/// length and the number of entries. Stops at a seal record or a torn tail.
fn walk_segment(
    path: &Path,
    (ledger_id, first_entry_id, newest): (u64, u64, bool),
    on_entry: impl FnMut(Position, u64),
) -> Result<(u64, u64)> {
    let file = match File::open(path) {
        Ok(file) => file,
        // Trimmed meanwhile.
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(error) => return Err(StorageError::io("open", path, error)),
    };
    let length = file
        .metadata()
        .map_err(|error| StorageError::io("stat", path, error))?
        .len();
    let reader = BufReader::with_capacity(64 * 1024, file);
    let walked = (ledger_id, first_entry_id, newest);
    let entries = walk_records(reader, length, walked, on_entry)
        .map_err(|error| StorageError::io("read", path, error))?;
    Ok((length, entries))
}

/// The walk of [`walk_segment`] over the records of a segment file `length` bytes long (as it
/// was when the walk began); returns the number of entries. The file may be cut shorter
/// meanwhile (an open truncating a torn tail or cutting a seal off, relaxed mode cutting unsynced
/// bytes off): its end is then taken for a torn tail, as an open would, rather than failing.
/// Checksums are not verified, except in the log's `newest` segment if it is a recycled file
/// (a salt in its header) that no seal ends: beyond its records lies its earlier life, which
/// may hold, at the very offsets, the entry ids that come next (an earlier ledger's); only the
/// checksum tells them apart. A record whose entry id does not follow the one before ends the
/// walk too.
fn walk_records<R: Read + Seek>(
    mut reader: BufReader<R>,
    length: u64,
    (ledger_id, first_entry_id, newest): (u64, u64, bool),
    mut on_entry: impl FnMut(Position, u64),
) -> std::io::Result<u64> {
    let mut header = [0u8; HEADER_LEN as usize];
    match reader.read_exact(&mut header) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(0),
        Err(error) => return Err(error),
    }
    let salt = (newest && u16::from_le_bytes([header[8], header[9]]) == SALTED_FORMAT_VERSION)
        .then(|| u32::from_le_bytes([header[12], header[13], header[14], header[15]]));
    // A clean close cut a recycled segment after its seal: nothing of its earlier life is
    // left, and its bodies need not be read.
    let salt = match salt {
        Some(salt) if ends_in_seal(&mut reader, length, salt)? => None,
        salt => salt,
    };
    let mut body = Vec::new();
    let mut offset = HEADER_LEN;
    let mut entries = 0;
    let mut head = [0u8; 16];
    while offset + RECORD_FRAMING_LEN + 8 <= length {
        match reader.read_exact(&mut head) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(error) => return Err(error),
        }
        let body_len = u64::from(u32::from_le_bytes([head[0], head[1], head[2], head[3]]));
        let entry_id = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
        let record_len = RECORD_FRAMING_LEN + body_len;
        if body_len < 16 || entry_id != first_entry_id + entries || offset + record_len > length {
            break; // a seal, or a torn tail
        }
        if let Some(salt) = salt {
            body.resize((body_len - 8) as usize, 0);
            match reader.read_exact(&mut body) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(error) => return Err(error),
            }
            let stored = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
            if crc32c::crc32c_append(crc32c::crc32c_append(salt, &head[8..16]), &body) != stored {
                break; // the file's earlier life, or a torn tail
            }
        } else {
            // Past the end is allowed: the next read finds it.
            reader.seek_relative((body_len - 8) as i64)?;
        }
        on_entry(Position::new(ledger_id, entry_id), record_len);
        entries += 1;
        offset += record_len;
    }
    Ok(entries)
}

/// Whether the file (`length` bytes long) ends in a seal record checksummed with `salt`;
/// leaves `reader` at the first record.
fn ends_in_seal<R: Read + Seek>(
    reader: &mut BufReader<R>,
    length: u64,
    salt: u32,
) -> std::io::Result<bool> {
    let seal_len = crate::log::SEAL_RECORD_LEN;
    let Some(at) = length.checked_sub(seal_len).filter(|at| *at >= HEADER_LEN) else {
        return Ok(false);
    };
    let mut seal = [0u8; crate::log::SEAL_RECORD_LEN as usize];
    reader.seek(SeekFrom::Start(at))?;
    let read = reader.read_exact(&mut seal);
    reader.seek(SeekFrom::Start(HEADER_LEN))?;
    match read {
        Ok(()) => {}
        // Cut shorter meanwhile.
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(error) => return Err(error),
    }
    Ok(crate::log::is_seal_at(&seal, at, salt))
}

/// The cursors a journal holds (the last record of each name wins; deleted ones left out).
fn read_journal(path: &Path) -> Result<BTreeMap<String, CursorState>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(error) => return Err(StorageError::io("read", path, error)),
    };
    let mut cursors = BTreeMap::new();
    let mut offset = HEADER_LEN as usize;
    while offset < bytes.len() {
        let Ok(body) = decode_record(&bytes[offset..]) else {
            break; // a torn tail
        };
        let record_len = RECORD_FRAMING_LEN as usize + body.len();
        match decode_journal_record(body) {
            Ok((name, Some(state))) => {
                cursors.insert(name, state);
            }
            Ok((name, None)) => {
                cursors.remove(&name);
            }
            Err(_) => break,
        }
        offset += record_len;
    }
    Ok(cursors)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::{InitialPosition, Storage, StorageConfig};

    fn config() -> StorageConfig {
        StorageConfig {
            // Several segments per ledger.
            segment_max_bytes: 2 * 1024,
            entry_max_bytes: 1024,
            cursor_persist_interval: Duration::from_secs(3600),
            trim_interval: Duration::from_secs(3600),
            ..StorageConfig::default()
        }
    }

    /// The summary of a closed log equals what the open log reports, across two ledgers (two
    /// opens), several segments each, a seal, individual acknowledgements and a torn tail.
    #[test]
    fn a_closed_log_is_summarized_as_the_open_log_reports_it() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut positions = Vec::new();
        let mut record_bytes = Vec::new();
        for _ in 0..2 {
            let storage = Storage::open(root.path(), config()).expect("open");
            let log = storage.open_log("t").expect("log");
            log.open_cursor("sub", InitialPosition::Earliest)
                .expect("cursor");
            log.open_cursor("later", InitialPosition::Latest)
                .expect("cursor");
            for index in 0..30u8 {
                let append = log
                    .append(Bytes::from(vec![index; 100 + usize::from(index)]), 0)
                    .expect("append");
                positions.push(append.wait().expect("durable"));
                record_bytes.push(
                    crate::format::RECORD_FRAMING_LEN
                        + crate::log::ENTRY_HEADER_LEN
                        + 100
                        + u64::from(index),
                );
            }
            storage.close().expect("close");
        }
        let storage = Storage::open(root.path(), config()).expect("open");
        let log = storage.open_log("t").expect("log");
        let mut acks = positions[0..5].to_vec();
        acks.extend([positions[10], positions[40], positions[41]]);
        log.acknowledge("sub", &acks).expect("ack");
        let expected_sub = (
            log.backlog_entries("sub").expect("sub"),
            log.bytes_after(log.mark_delete_position("sub").expect("sub")),
        );
        let expected_later = (
            log.backlog_entries("later").expect("later"),
            log.bytes_after(log.mark_delete_position("later").expect("later")),
        );
        let entries = log.entries_after(None);
        let cursor = log.cursor("sub").expect("state");
        storage.close().expect("close");

        let segment_files = std::fs::read_dir(root.path().join("logs").join("t"))
            .expect("list")
            .filter(|item| {
                item.as_ref()
                    .is_ok_and(|item| item.path().extension().is_some_and(|ext| ext == "segment"))
            })
            .count();
        // Two ledgers of several segments each, and the third open's empty one: both ways of
        // summing a segment (by its name and size, and walked) are taken.
        assert!(segment_files >= 5, "{segment_files} segments");
        let summary = summarize_closed_log(root.path(), "t")
            .expect("summary")
            .expect("exists");
        assert_eq!(summary.entries, entries);
        assert_eq!(entries, 60);
        let sub = &summary.cursors["sub"];
        // Both count exactly: every record after the mark-delete position, framing included.
        let exact_sub: u64 = record_bytes[5..].iter().sum();
        assert_eq!((sub.backlog_entries, sub.backlog_bytes), expected_sub);
        assert_eq!(sub.backlog_bytes, exact_sub);
        assert_eq!(sub.backlog_entries, 60 - 8);
        assert_eq!(sub.state, cursor);
        let later = &summary.cursors["later"];
        assert_eq!((later.backlog_entries, later.backlog_bytes), expected_later);
        assert_eq!(later.backlog_bytes, record_bytes.iter().sum::<u64>());
        assert_eq!(later.backlog_entries, 60);
        assert_eq!(
            summarize_closed_log(root.path(), "missing").expect("ok"),
            None
        );
        assert_eq!(
            closed_log_cursors(root.path(), "t").expect("cursors")["sub"],
            cursor
        );

        // A torn record at the end of the newest segment (in place of its seal, as after a
        // crash) counts for nothing.
        let directory = root.path().join("logs").join("t");
        let mut newest: Vec<_> = std::fs::read_dir(&directory)
            .expect("list")
            .map(|item| item.expect("item").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "segment"))
            .collect();
        newest.sort();
        let newest = newest.pop().expect("a segment");
        let mut torn = std::fs::read(&newest).expect("read");
        torn.truncate(torn.len() - 24);
        torn.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, 99, 0, 0, 0, 0, 0, 0, 0, 7]);
        std::fs::write(&newest, torn).expect("write");
        let summary = summarize_closed_log(root.path(), "t")
            .expect("summary")
            .expect("exists");
        assert_eq!(summary.entries, 60);
    }

    /// A power cut in relaxed mode lost the last entries after the cursor acknowledging some of
    /// them individually was persisted: the summary counts the backlog as the open log does,
    /// without those acknowledgements (the old summary subtracted them: a backlog of 2 for 5
    /// unconsumed entries).
    #[test]
    fn acknowledgements_of_entries_lost_in_a_power_cut_do_not_hide_the_backlog() {
        let root = tempfile::tempdir().expect("tempdir");
        let payload = |index: u8| Bytes::from(vec![index; 100]);
        {
            let storage = Storage::open(root.path(), config()).expect("open");
            let log = storage.open_log("t").expect("log");
            log.open_cursor("sub", InitialPosition::Earliest)
                .expect("cursor");
            let positions: Vec<Position> = (0..10u8)
                .map(|index| {
                    log.append(payload(index), 0)
                        .expect("append")
                        .wait()
                        .expect("durable")
                })
                .collect();
            log.acknowledge("sub", &[positions[5], positions[7], positions[9]])
                .expect("ack");
            storage.close().expect("close");
        }
        // The last five records (and the seal after them) did not reach the disk.
        let directory = root.path().join("logs").join("t");
        let mut segments: Vec<_> = std::fs::read_dir(&directory)
            .expect("list")
            .map(|item| item.expect("item").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "segment"))
            .collect();
        segments.sort();
        let newest = segments.pop().expect("a segment");
        let length = std::fs::metadata(&newest).expect("stat").len();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&newest)
            .expect("open");
        file.set_len(length - 24 - 5 * (24 + 100)).expect("cut");
        drop(file);

        let summary = summarize_closed_log(root.path(), "t")
            .expect("summary")
            .expect("exists");
        assert_eq!(summary.entries, 5);
        assert_eq!(summary.cursors["sub"].backlog_entries, 5);
        let storage = Storage::open(root.path(), config()).expect("open");
        let log = storage.open_log("t").expect("log");
        assert_eq!(
            log.backlog_entries("sub"),
            Some(5),
            "as the open log counts"
        );
        assert_eq!(
            summary.cursors["sub"].state,
            log.cursor("sub").expect("state")
        );
    }

    /// A segment cut shorter while it is walked (an open truncating its torn tail or cutting
    /// its seal off, relaxed mode cutting unsynced bytes off) ends the walk as a torn tail: the
    /// stats of a partition being loaded do not fail. (The old walk failed with "failed to
    /// fill whole buffer".)
    #[test]
    fn a_segment_cut_shorter_while_walked_ends_the_walk_as_a_torn_tail() {
        let mut file = vec![0u8; HEADER_LEN as usize];
        for entry_id in 0..3u64 {
            let mut body = entry_id.to_le_bytes().to_vec();
            body.extend_from_slice(&[0; 8]);
            body.extend_from_slice(&[entry_id as u8; 100]);
            crate::format::encode_record(&mut file, &[&body]);
        }
        let full = file.len() as u64;
        let record = (full - HEADER_LEN) / 3;
        // Its length was taken with all three records; two remain, then a part of the third
        // (its header lies past the cut, then within it).
        for cut in [HEADER_LEN + 2 * record, HEADER_LEN + 2 * record + 10] {
            let reader =
                BufReader::with_capacity(16, std::io::Cursor::new(file[..cut as usize].to_vec()));
            let mut seen = Vec::new();
            let entries = walk_records(reader, full, (5, 0, true), |position, _| {
                seen.push(position)
            })
            .expect("the walk ends at the cut");
            assert_eq!(entries, 2, "cut at {cut}");
            assert_eq!(seen, vec![Position::new(5, 0), Position::new(5, 1)]);
        }
    }
}
