//! A real process appending under load is killed with SIGKILL; every append it reported as
//! durable must be readable afterwards, in order, exactly once.
//!
//! The test binary plays both roles: run normally it is the parent; started by the parent with
//! `MERIDIAN_KILL9_CHILD_DIR` set, the same test function becomes the child that appends until
//! it is killed, printing one `ACK writer sequence ledger entry` line per durable append.
//!
//! What this test cannot see: a missing or misplaced fsync. SIGKILL ends the process but not the
//! machine, and the operating system's page cache keeps every byte the process wrote, synced
//! or not. Power cuts, which lose unsynced bytes and directory entries, are simulated instead
//! with `SimIo` (`tests/faults.rs`, `tests/crash_loop.rs`).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use bytes::Bytes;
use meridian_storage::{Position, Storage, StorageConfig};

const CHILD_ENV: &str = "MERIDIAN_KILL9_CHILD_DIR";
const LOG: &str = "persistent://public/default/kill9";
const WRITERS: u64 = 8;

fn config() -> StorageConfig {
    StorageConfig {
        // Small segments so that kills also land around segment rolls.
        segment_max_bytes: 256 * 1024,
        entry_max_bytes: 4096,
        // The log has no cursor, so the default retention would trim every entry once durable;
        // this test is about durability, not retention.
        trim_interval: std::time::Duration::from_secs(3600),
        ..StorageConfig::default()
    }
}

fn payload(writer: u64, sequence: u64) -> Bytes {
    let mut bytes = format!("{writer}:{sequence}:").into_bytes();
    bytes.resize(64 + ((writer * 131 + sequence * 17) % 2000) as usize, b'k');
    Bytes::from(bytes)
}

fn run_child(directory: &str) {
    let storage = Storage::open(directory, config()).expect("child: open");
    let log = storage.open_log(LOG).expect("child: log");
    let stdout = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let log = log.clone();
            let stdout = stdout.clone();
            std::thread::spawn(move || {
                for sequence in 0.. {
                    let position = log
                        .append(payload(writer, sequence), sequence)
                        .expect("child: append")
                        .wait()
                        .expect("child: durable");
                    let mut out = stdout.lock().expect("child: stdout");
                    writeln!(
                        out,
                        "ACK {writer} {sequence} {} {}",
                        position.ledger_id, position.entry_id
                    )
                    .expect("child: print");
                    out.flush().expect("child: flush");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().expect("child: writer");
    }
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_append() {
    if let Ok(directory) = std::env::var(CHILD_ENV) {
        run_child(&directory);
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let directory = root.path().to_str().expect("utf-8 path").to_string();
    // writer → sequence → acknowledged position, over all rounds.
    let mut acknowledged: HashMap<(u64, u64), Position> = HashMap::new();
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "sigkill_under_load_loses_no_acknowledged_append",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &directory)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut round_acks = 0;
        let target = 3_000 + round * 1_000;
        // Read acknowledgements until enough arrived, then kill -9 in the middle of the load.
        for line in lines.by_ref() {
            let line = line.expect("line");
            if record_ack(&line, round, &mut acknowledged) {
                round_acks += 1;
            }
            if round_acks >= target {
                break;
            }
        }
        child.kill().expect("SIGKILL");
        // Lines the child printed before it died are acknowledgements too.
        for line in lines.map_while(Result::ok) {
            if record_ack(&line, round, &mut acknowledged) {
                round_acks += 1;
            }
        }
        child.wait().expect("reap");
        assert!(
            round_acks >= target,
            "child acknowledged only {round_acks} appends"
        );
        verify(&directory, &acknowledged);
    }
}

/// Records one `ACK` line; writer ids are made unique per round.
fn record_ack(line: &str, round: u64, acknowledged: &mut HashMap<(u64, u64), Position>) -> bool {
    let fields: Vec<u64> = line
        .strip_prefix("ACK ")
        .map(|rest| {
            rest.split(' ')
                .filter_map(|field| field.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let [writer, sequence, ledger, entry] = fields[..] else {
        return false;
    };
    acknowledged.insert(
        (round * 100 + writer, sequence),
        Position::new(ledger, entry),
    );
    true
}

fn verify(directory: &str, acknowledged: &HashMap<(u64, u64), Position>) {
    let storage = Storage::open(directory, config()).expect("reopen after kill");
    let log = storage.open_log(LOG).expect("log");
    let entries = match log.first_position() {
        Some(first) => log.read_from(first, usize::MAX, usize::MAX).expect("read"),
        None => Vec::new(),
    };
    let round_of_ledger: HashMap<u64, u64> = {
        let mut ledgers: Vec<u64> = acknowledged
            .values()
            .map(|position| position.ledger_id)
            .collect();
        ledgers.sort_unstable();
        ledgers.dedup();
        ledgers
            .iter()
            .enumerate()
            .map(|(round, ledger)| (*ledger, round as u64))
            .collect()
    };
    let mut seen = HashSet::new();
    let mut last_sequence: HashMap<u64, u64> = HashMap::new();
    let mut found: HashMap<Position, (u64, u64)> = HashMap::new();
    for entry in &entries {
        let text = String::from_utf8_lossy(&entry.data);
        let mut fields = text.split(':');
        let writer: u64 = fields
            .next()
            .and_then(|field| field.parse().ok())
            .expect("writer");
        let sequence: u64 = fields
            .next()
            .and_then(|field| field.parse().ok())
            .expect("sequence");
        assert_eq!(
            entry.data,
            payload(writer, sequence),
            "entry at {} byte-exact",
            entry.position
        );
        let round = round_of_ledger
            .get(&entry.position.ledger_id)
            .copied()
            .unwrap_or(u64::MAX);
        let writer = round.saturating_mul(100).saturating_add(writer);
        assert!(
            seen.insert((writer, sequence)),
            "{writer}:{sequence} stored twice"
        );
        if let Some(previous) = last_sequence.insert(writer, sequence) {
            assert_eq!(
                previous + 1,
                sequence,
                "writer {writer}: {previous} then {sequence}"
            );
        }
        found.insert(entry.position, (writer, sequence));
    }
    for ((writer, sequence), position) in acknowledged {
        assert_eq!(
            found.get(position),
            Some(&(*writer, *sequence)),
            "acknowledged {writer}:{sequence} at {position} missing after kill -9"
        );
    }
    storage.close().expect("close");
}
