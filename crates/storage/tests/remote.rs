//! The log-store seam: a log with a remote side acknowledges an append only once the remote
//! committed it, and a failed remote commit poisons the log (cluster mode's object-store log
//! sits behind this seam; here a remote whose commits the test releases or fails).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use bytes::Bytes;
use meridian_storage::{Position, RemoteCommit, RemoteLog, Storage, StorageConfig, StorageError};

/// A remote whose commits complete when the test sends their outcome, in order.
struct GatedRemote {
    appended: Mutex<Vec<(u64, Bytes)>>,
    senders: Mutex<Vec<mpsc::Sender<Result<(), String>>>>,
    waited: Arc<AtomicUsize>,
}

struct GatedCommit {
    outcome: mpsc::Receiver<Result<(), String>>,
    /// Counts the commits a flush thread waits on.
    waited: Arc<AtomicUsize>,
}

impl RemoteCommit for GatedCommit {
    fn wait(self: Box<Self>) -> meridian_storage::Result<()> {
        self.waited.fetch_add(1, Ordering::SeqCst);
        match self.outcome.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(cause)) => Err(StorageError::remote("t", false, cause)),
            Err(_) => Err(StorageError::remote("t", false, "gate dropped")),
        }
    }
}

impl GatedRemote {
    fn new() -> Arc<GatedRemote> {
        Arc::new(GatedRemote {
            appended: Mutex::new(Vec::new()),
            senders: Mutex::new(Vec::new()),
            waited: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Completes the oldest commit not completed yet.
    fn complete_next(&self, outcome: Result<(), String>) {
        let sender = self.senders.lock().expect("lock").remove(0);
        sender.send(outcome).expect("a commit waits");
    }
}

impl RemoteLog for GatedRemote {
    fn append(
        &self,
        entry_id: u64,
        data: Bytes,
        _publish_time_ms: u64,
    ) -> meridian_storage::Result<Box<dyn RemoteCommit>> {
        self.appended.lock().expect("lock").push((entry_id, data));
        let (sender, receiver) = mpsc::channel();
        self.senders.lock().expect("lock").push(sender);
        Ok(Box::new(GatedCommit {
            outcome: receiver,
            waited: self.waited.clone(),
        }))
    }
}

/// Bytes in the log's files: grows when a flush has written a batch.
fn files_bytes(log: &meridian_storage::Log) -> u64 {
    std::fs::read_dir(log.directory())
        .expect("list")
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| entry.metadata().ok())
        .map(|metadata| metadata.len())
        .sum()
}

fn open() -> (tempfile::TempDir, Storage) {
    let directory = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(directory.path(), StorageConfig::default()).expect("open");
    (directory, storage)
}

#[test]
fn an_append_is_durable_only_once_the_remote_committed_it() {
    let (_directory, storage) = open();
    let log = storage.open_log("t").expect("log");
    let local = log.append(Bytes::from_static(b"local"), 1).expect("append");
    let first = local.wait().expect("durable locally");
    let remote = GatedRemote::new();
    log.attach_remote(remote.clone()).expect("attach");

    let written_before = files_bytes(&log);
    let pending = log
        .append(Bytes::from_static(b"remote"), 2)
        .expect("append");
    let position = pending.position();
    assert_eq!(position, Position::new(first.ledger_id, first.entry_id + 1));
    // The flush thread writes it locally, then waits on the remote: until the remote commits,
    // the entry is neither readable nor acknowledged. (A log that did not wait would make it
    // durable instead: the loop ends either way.)
    while remote.waited.load(Ordering::SeqCst) == 0 && log.last_position() == Some(first) {
        std::thread::yield_now();
    }
    assert_eq!(remote.waited.load(Ordering::SeqCst), 1);
    assert!(files_bytes(&log) > written_before, "written locally first");
    let mut durable = log.watch_durable();
    assert_eq!(log.last_position(), Some(first));
    assert_eq!(log.read_from(position, 10, 1 << 20).expect("read"), vec![]);

    remote.complete_next(Ok(()));
    assert_eq!(pending.wait().expect("committed"), position);
    assert_eq!(*durable.borrow_and_update(), Some(position));
    assert_eq!(
        log.read(position).expect("read").data,
        Bytes::from_static(b"remote")
    );
    // The remote was told the local entry id, and got the entry byte-exact.
    assert_eq!(
        *remote.appended.lock().expect("lock"),
        vec![(position.entry_id, Bytes::from_static(b"remote"))]
    );
}

#[test]
fn a_failed_remote_commit_poisons_the_log_and_nothing_after_it_is_acknowledged() {
    let (_directory, storage) = open();
    let log = storage.open_log("t").expect("log");
    let remote = GatedRemote::new();
    log.attach_remote(remote.clone()).expect("attach");
    let committed = log.append(Bytes::from_static(b"a"), 1).expect("append");
    remote.complete_next(Ok(()));
    let committed = committed.wait().expect("committed");

    let failed = log.append(Bytes::from_static(b"b"), 2).expect("append");
    remote.complete_next(Err("store down".to_string()));
    match failed.wait() {
        Err(StorageError::Remote { cause, .. }) => assert!(cause.contains("store down")),
        other => panic!("expected the remote failure, got {other:?}"),
    }
    // Poisoned: later appends are refused, and only the committed entry is readable.
    assert!(matches!(
        log.append(Bytes::from_static(b"c"), 3),
        Err(StorageError::Remote { .. })
    ));
    assert_eq!(log.last_position(), Some(committed));
    let entries = log.read_from(committed, 10, 1 << 20).expect("read");
    assert_eq!(entries.len(), 1);
}

/// A remote that commits every entry at once and records what trimming told it.
#[derive(Default)]
struct TrimmedRemote {
    trimmed_before: Mutex<Vec<u64>>,
}

struct Committed;

impl RemoteCommit for Committed {
    fn wait(self: Box<Self>) -> meridian_storage::Result<()> {
        Ok(())
    }
}

impl RemoteLog for TrimmedRemote {
    fn append(
        &self,
        _entry_id: u64,
        _data: Bytes,
        _publish_time_ms: u64,
    ) -> meridian_storage::Result<Box<dyn RemoteCommit>> {
        Ok(Box::new(Committed))
    }

    fn trim_before(&self, entry_id: u64) {
        self.trimmed_before.lock().expect("lock").push(entry_id);
    }
}

#[test]
fn a_copy_starts_at_the_remotes_first_entry_and_tells_the_remote_what_it_trimmed() {
    let directory = tempfile::tempdir().expect("tempdir");
    let config = StorageConfig {
        segment_max_bytes: 4096,
        entry_max_bytes: 1024,
        ..StorageConfig::default()
    };
    let storage = Storage::open(directory.path(), config).expect("open");
    let log = storage.open_log("t").expect("log");
    // A new owner's copy of a log trimmed before entry 100 numbers its entries from 100.
    log.start_at(100).expect("start at 100");
    let remote = Arc::new(TrimmedRemote::default());
    log.attach_remote(remote.clone()).expect("attach");
    let positions: Vec<Position> = (0..20)
        .map(|index| {
            log.append(Bytes::from(vec![b'x'; 900]), index)
                .expect("append")
                .wait()
                .expect("durable")
        })
        .collect();
    assert_eq!(positions[0].entry_id, 100);
    assert_eq!(positions[19].entry_id, 119);
    assert!(
        log.start_at(0).is_err(),
        "only an empty log starts elsewhere"
    );

    // Every segment but the newest expires; the remote hears where the log now starts.
    log.set_retention(meridian_storage::Retention {
        time: Some(std::time::Duration::ZERO),
        size_bytes: None,
    });
    assert!(log.trim().expect("trim") > 0);
    let first = log.first_position().expect("entries are left").entry_id;
    assert!(
        first > 100,
        "segments were trimmed: the log starts at {first}"
    );
    assert_eq!(*remote.trimmed_before.lock().expect("lock"), vec![first]);
    assert_eq!(
        log.read_from(Position::new(positions[0].ledger_id, 0), 100, 1 << 20)
            .expect("read")[0]
            .position
            .entry_id,
        first
    );
}
