//! The storage engine: the registry of open logs and the threads that serve them.
//!
//! Threads, all named `meridian-storage-*`:
//! - `flush-N` (`flush_threads` of them) take logs with pending appends from a queue, write and
//!   fsync one batch, and complete its appends; a log with more batches queues itself again at
//!   the back, so busy logs take turns with quiet ones. A log is queued at most once at a time.
//! - `maintenance` persists changed cursors every `cursor_persist_interval` (one cursor WAL
//!   record per changed log, one fsync for all: `cursor_wal.rs`), runs trimming every
//!   `trim_interval`, and fsyncs under the relaxed flush policy.
//! - `checkpoint`, started by `maintenance` once the cursor WAL holds
//!   `CURSOR_WAL_CHECKPOINT_BYTES`: writes the WAL's bytes into the journals (with up to
//!   `CHECKPOINT_PARALLELISM` short-lived helper threads) and removes the WAL file.
//!
//! On disk: `<root>/logs/<encoded log name>/` per log (see `docs/storage-format.md`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::config::{FlushPolicy, StorageConfig};
use crate::cursor::UnwrittenJournalBytes;
use crate::cursor_wal::{CursorWal, WalRecord};
use crate::entry_wal::{self, DeferredReplay, EntryWal, GroupCommit};
use crate::error::{Result, StorageError};
use crate::io::Io;
use crate::log::{AfterFlush, Log};

/// Longest encoded log name accepted: it must fit a file name (255 bytes on common file systems).
pub const ENCODED_LOG_NAME_MAX_BYTES: usize = 250;

/// What every log of an engine shares.
pub(crate) struct Shared {
    pub(crate) io: Arc<dyn Io>,
    pub(crate) config: StorageConfig,
    /// Bytes held by all logs' entry caches together.
    pub(crate) cache_used_bytes: AtomicU64,
    /// Every ledger id a deleted log used is at or below this: new ledgers start above it, so
    /// a log deleted and created again never reuses a position of its earlier life (which
    /// other clusters may remember as an origin position). Persisted in `ledger-floor`.
    pub(crate) ledger_floor: AtomicU64,
    /// Held while the floor is raised and persisted, so that concurrent deletes never persist
    /// a lower floor over a higher one.
    ledger_floor_update: Mutex<()>,
    flush_queue: FlushQueue,
    /// The cursor write-ahead log of every persistence pass.
    cursor_wal: Mutex<CursorWal>,
    /// The entry write-ahead log that groups of logs are flushed through (`None`: disabled,
    /// or the relaxed policy).
    pub(crate) entry_wal: Option<GroupCommit>,
    /// Logs whose entry WAL replay failed at start (a full disk, damage), by directory name:
    /// tried again when the log opens, which fails until it succeeds.
    entry_replay_deferred: Mutex<HashMap<String, DeferredReplay>>,
    /// A log was closed while its journal still had bytes only the WAL holds (its last write
    /// failed): the WAL files up to this sequence are kept until the next start replays them.
    pub(crate) cursor_wal_pinned: AtomicU64,
    /// Journal bytes the cursor WAL made durable for a log that closed before they could be
    /// written into its journal (the write at close failed), by journal path: written into the
    /// journal before it is read again, when the log is opened again in this run (the WAL
    /// files that hold them are only replayed at the next start).
    pub(crate) unwritten_journal_bytes: Mutex<HashMap<PathBuf, UnwrittenJournalBytes>>,
    /// Every log opened and not yet done closing, by address: what a checkpoint must write
    /// the WAL's bytes for. Not the registry: a log leaves it before its close writes its
    /// journal, and a checkpoint in between must not remove the WAL file that close needs.
    live_logs: Mutex<HashMap<usize, Weak<Log>>>,
}

impl Shared {
    /// Keeps the cursor WAL files written so far until the next start (a closed log's journal
    /// lacks bytes only they hold).
    pub(crate) fn pin_cursor_wal(&self) {
        let sequence = self
            .cursor_wal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .sequence();
        self.cursor_wal_pinned.fetch_max(sequence, Ordering::SeqCst);
    }

    pub(crate) fn register_live_log(&self, log: &Arc<Log>) {
        self.live_logs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(Arc::as_ptr(log) as usize, Arc::downgrade(log));
    }

    /// Removes the recycled segment files every open log keeps, and the entry WAL's: the disk
    /// is full, and appends need the space more than rolls need the files.
    pub(crate) fn release_free_files(&self) {
        for log in self.live_logs() {
            log.remove_free_files();
        }
        if let Some(wal) = &self.entry_wal {
            wal.release_free_files(self.io.as_ref());
        }
    }

    pub(crate) fn unregister_live_log(&self, log: &Log) {
        self.live_logs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&(log as *const Log as usize));
    }

    /// The logs a checkpoint writes the WAL's bytes for. One dropped without being closed
    /// left its bytes in the WAL only: the files written so far are kept until the next start.
    fn live_logs(&self) -> Vec<Arc<Log>> {
        let mut dropped = false;
        let logs = {
            let mut live = self
                .live_logs
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut logs = Vec::with_capacity(live.len());
            live.retain(|_, log| match log.upgrade() {
                Some(log) => {
                    logs.push(log);
                    true
                }
                None => {
                    dropped = true;
                    false
                }
            });
            logs
        };
        if dropped {
            self.pin_cursor_wal();
            // Its segments may hold bytes only the entry WAL made durable.
            if let Some(wal) = &self.entry_wal {
                wal.pin();
            }
        }
        logs
    }

    /// Has `log`'s pending batch flushed: by the WAL group's leader if one is waiting for its
    /// group to fill (it writes the batch into its segment when it wakes up, and the batch
    /// joins the group as if a flush thread had handed it over, with no thread woken for it),
    /// otherwise by a flush thread. A batch flushed whole (a new segment, a remote log) always
    /// goes to a flush thread: the leader must not hold its group for that.
    pub(crate) fn schedule_flush(&self, log: Arc<Log>, flush: ScheduledFlush) {
        let log = match &self.entry_wal {
            Some(wal) if !flush.whole && !self.flush_queue.is_paused() => {
                match wal.absorb(log, flush.bytes) {
                    Ok(()) => return,
                    Err(log) => log,
                }
            }
            _ => log,
        };
        self.flush_queue.push(Some(log));
    }
}

/// What the append that makes a log need a flush tells [`Shared::schedule_flush`].
pub(crate) struct ScheduledFlush {
    /// The bytes appended.
    pub(crate) bytes: u64,
    /// The batch is flushed whole, with an fsync of its own (see `Log::flush_unsynced`).
    pub(crate) whole: bool,
}

/// Logs waiting for a flush thread (`None` tells one thread to stop). A log is in it at most
/// once at a time, so it holds at most one item per open log. A flush thread that finds it
/// empty sleeps at once: a channel that spins and yields before sleeping costs a few context
/// switches per flush on a busy machine, and a flush thread waits for the disk anyway.
#[derive(Default)]
struct FlushQueue {
    logs: Mutex<QueuedLogs>,
    ready: Condvar,
    /// `QueuedLogs::paused`, readable without the lock.
    paused: AtomicBool,
}

#[derive(Default)]
struct QueuedLogs {
    logs: std::collections::VecDeque<Option<Arc<Log>>>,
    /// Set by [`Storage::pause_flushes`]: nothing is popped until it is cleared.
    paused: bool,
}

impl FlushQueue {
    fn push(&self, item: Option<Arc<Log>>) {
        self.push_quietly(item);
        self.ready.notify_one();
    }

    /// Queues an item without waking a thread: only for a flush thread about to `pop`.
    fn push_quietly(&self, item: Option<Arc<Log>>) {
        self.logs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .logs
            .push_back(item);
    }

    fn set_paused(&self, paused: bool) {
        let mut logs = self
            .logs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        logs.paused = paused;
        self.paused.store(paused, Ordering::SeqCst);
        drop(logs);
        self.ready.notify_all();
    }

    fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Moves logs waiting into `group` until it holds `max` (without waiting for any).
    fn pop_waiting(&self, group: &mut Vec<Arc<Log>>, max: usize) {
        let mut logs = self
            .logs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while group.len() < max {
            match logs.logs.front() {
                Some(Some(_)) => group.extend(logs.logs.pop_front().flatten()),
                // Empty, or a thread is to stop: that one is left for `pop`.
                Some(None) | None => break,
            }
        }
    }

    /// The next log to flush, or `None` when the thread is to stop.
    fn pop(&self) -> Option<Arc<Log>> {
        let mut logs = self
            .logs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            if !logs.paused {
                if let Some(item) = logs.logs.pop_front() {
                    return item;
                }
            }
            logs = self
                .ready
                .wait(logs)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

struct Registry {
    logs: HashMap<String, Arc<Log>>,
    /// One lock per log name that is being opened or deleted, held across the I/O (a recovery
    /// reads every segment) instead of the registry lock, so that one long recovery never
    /// stalls the other logs. Removed once nobody holds or waits for it.
    name_locks: HashMap<String, Arc<Mutex<()>>>,
    /// Names whose `delete_log` is under way: opening one now would create a log inside the
    /// directory about to be removed, so `open_log` refuses them until the deletion is done.
    deleting: std::collections::HashSet<String>,
    stopping: bool,
}

struct Inner {
    shared: Arc<Shared>,
    root: PathBuf,
    registry: Mutex<Registry>,
    /// Wakes the maintenance thread early when stopping.
    wake: Condvar,
    /// The cursor WAL checkpoint running in the background, if any.
    checkpoint: Mutex<Option<JoinHandle<()>>>,
    /// The entry WAL checkpoint running in the background, if any.
    entry_checkpoint: Mutex<Option<JoinHandle<()>>>,
}

impl Inner {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The storage engine. Open logs with [`Storage::open_log`]; call [`Storage::close`] to stop.
pub struct Storage {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
    /// `<root>/lock`, held with an exclusive `flock` for as long as the engine lives (real file
    /// system only), so that a second engine cannot open the same data directory.
    _directory_lock: Option<std::fs::File>,
}

impl Storage {
    /// Opens the engine rooted at `root` on the real file system.
    pub fn open(root: impl Into<PathBuf>, config: StorageConfig) -> Result<Storage> {
        let root = root.into();
        let lock = lock_directory(&root)?;
        let mut storage = Storage::open_with_io(root, config, Arc::new(crate::RealIo))?;
        storage._directory_lock = Some(lock);
        Ok(storage)
    }

    /// Opens the engine rooted at `root` on the given I/O implementation.
    pub fn open_with_io(
        root: impl Into<PathBuf>,
        config: StorageConfig,
        io: Arc<dyn Io>,
    ) -> Result<Storage> {
        let root = root.into();
        config.validate().map_err(StorageError::InvalidConfig)?;
        let logs_directory = root.join("logs");
        crate::io::create_dir_durable(io.as_ref(), &logs_directory)
            .map_err(|error| StorageError::io("create directory", &logs_directory, error))?;
        remove_stale_ledger_floor_temporary(io.as_ref(), &root)?;
        remove_tombstones(io.as_ref(), &logs_directory)?;
        // Before any log opens: their segments must hold what the entry WAL made durable (also
        // when this run does not use the WAL: an earlier one may have).
        let replayed = EntryWal::recover(io.as_ref(), &root)?;
        let entry_wal = if config.entry_wal && matches!(config.flush_policy, FlushPolicy::Fsync) {
            // With one flush thread nobody could add to a group while its leader waits.
            let group_wait = if config.flush_threads > 1 {
                config.entry_wal_group_wait
            } else {
                std::time::Duration::ZERO
            };
            Some(GroupCommit::new(
                EntryWal::start(io.as_ref(), &root, replayed.next_sequence)?,
                group_wait,
                config.entry_wal_group_idle,
            ))
        } else {
            None
        };
        // Before any log opens: their journals must hold what the WAL made durable.
        let mut cursor_wal = CursorWal::recover(io.as_ref(), &root)?;
        let unwritten: HashMap<PathBuf, UnwrittenJournalBytes> =
            std::mem::take(&mut cursor_wal.unwritten)
                .into_iter()
                .collect();
        let pinned = cursor_wal.pinned;
        let ledger_floor = match read_ledger_floor(io.as_ref(), &root)? {
            Some(floor) => floor,
            None if list_is_empty(io.as_ref(), &logs_directory)? => {
                // A new storage: its ledger ids start at the current time in milliseconds, above
                // any id an earlier storage at this place (or of this cluster, rebuilt) used:
                // those grew by one per open or roll of a log since *its* start.
                let floor = crate::log::now_ms();
                write_ledger_floor(io.as_ref(), &root, floor)?;
                floor
            }
            None => 0,
        };
        let flush_threads = config.flush_threads;
        let inner = Arc::new(Inner {
            shared: Arc::new(Shared {
                io,
                config,
                cache_used_bytes: AtomicU64::new(0),
                ledger_floor: AtomicU64::new(ledger_floor),
                ledger_floor_update: Mutex::new(()),
                flush_queue: FlushQueue::default(),
                cursor_wal: Mutex::new(cursor_wal),
                entry_wal,
                entry_replay_deferred: Mutex::new(replayed.deferred),
                cursor_wal_pinned: AtomicU64::new(pinned),
                unwritten_journal_bytes: Mutex::new(unwritten),
                live_logs: Mutex::new(HashMap::new()),
            }),
            root,
            registry: Mutex::new(Registry {
                logs: HashMap::new(),
                name_locks: HashMap::new(),
                deleting: std::collections::HashSet::new(),
                stopping: false,
            }),
            wake: Condvar::new(),
            checkpoint: Mutex::new(None),
            entry_checkpoint: Mutex::new(None),
        });
        let mut threads = Vec::new();
        for index in 0..flush_threads {
            let shared = inner.shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("meridian-storage-flush-{index}"))
                .spawn(move || {
                    // Popped again right below, by this thread or one awake anyway.
                    let again = |log| shared.flush_queue.push_quietly(Some(log));
                    while let Some(log) = shared.flush_queue.pop() {
                        let Some(wal) = &shared.entry_wal else {
                            if log.flush() == AfterFlush::Again {
                                again(log);
                            }
                            continue;
                        };
                        let mut group = vec![log];
                        shared
                            .flush_queue
                            .pop_waiting(&mut group, entry_wal::GROUP_MAX_LOGS);
                        wal.flush_group(shared.io.as_ref(), group, &again);
                    }
                })
                .map_err(|error| StorageError::io("spawn flush thread", "", error))?;
            threads.push(thread);
        }
        let maintenance_inner = inner.clone();
        let thread = std::thread::Builder::new()
            .name("meridian-storage-maintenance".into())
            .spawn(move || maintenance(&maintenance_inner))
            .map_err(|error| StorageError::io("spawn maintenance thread", "", error))?;
        threads.push(thread);
        Ok(Storage {
            inner,
            threads,
            _directory_lock: None,
        })
    }

    /// Writes the entry WAL bytes whose replay failed at start into the segments of the log
    /// in `directory` (see `Shared::entry_replay_deferred`).
    fn replay_deferred(&self, directory: &Path) -> Result<()> {
        let shared = &self.inner.shared;
        let mut deferred = shared
            .entry_replay_deferred
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(name) = directory.file_name().and_then(|name| name.to_str()) else {
            return Ok(());
        };
        let Some(replay) = deferred.get_mut(name) else {
            return Ok(());
        };
        replay.retry(shared.io.as_ref(), &self.inner.root)?;
        deferred.remove(name);
        Ok(())
    }

    pub fn config(&self) -> &StorageConfig {
        &self.inner.shared.config
    }

    /// Opens the log `name`, creating it if it does not exist. Opening an open log returns the
    /// same log.
    pub fn open_log(&self, name: &str) -> Result<Arc<Log>> {
        self.open_log_with_ledger_floor(name, 0)
    }

    /// [`Storage::open_log`], with the ledger id this open starts at least `min_ledger_id` if
    /// it opens the log (cluster mode: a topic's next owner numbers its ledger above every
    /// earlier owner's, so message ids keep growing across moves).
    pub fn open_log_with_ledger_floor(&self, name: &str, min_ledger_id: u64) -> Result<Arc<Log>> {
        let directory = self.log_directory(name)?;
        if let Some(log) = self.registered_log(name)? {
            return Ok(log);
        }
        self.with_name_lock(name, || {
            // Another caller may have opened it while this one waited.
            if let Some(log) = self.registered_log(name)? {
                return Ok(log);
            }
            self.replay_deferred(&directory)?;
            let log = Log::open(
                self.inner.shared.clone(),
                name.to_string(),
                directory,
                min_ledger_id,
            )?;
            let mut registry = self.inner.registry();
            if registry.stopping {
                drop(registry);
                // The engine began to stop during the recovery; it no longer closes this log.
                log.close()?;
                return Err(StorageError::Closed {
                    log: name.to_string(),
                });
            }
            registry.logs.insert(name.to_string(), log.clone());
            Ok(log)
        })
    }

    /// The open log `name`, if it is open; an error once the engine is stopping.
    fn registered_log(&self, name: &str) -> Result<Option<Arc<Log>>> {
        let registry = self.inner.registry();
        if registry.stopping {
            return Err(StorageError::Closed {
                log: name.to_string(),
            });
        }
        if registry.deleting.contains(name) {
            return Err(StorageError::BeingDeleted {
                log: name.to_string(),
            });
        }
        Ok(registry.logs.get(name).cloned())
    }

    /// Runs `operation` holding the lock of log name `name` (not the registry lock): opening
    /// and deleting one log are serialized, other logs are not held up.
    fn with_name_lock<T>(&self, name: &str, operation: impl FnOnce() -> Result<T>) -> Result<T> {
        let lock = self
            .inner
            .registry()
            .name_locks
            .entry(name.to_string())
            .or_default()
            .clone();
        let result = {
            let _serialized = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            operation()
        };
        let mut registry = self.inner.registry();
        // Clones are only taken under the registry lock: two references are the map's and ours.
        if Arc::strong_count(&lock) == 2 {
            registry.name_locks.remove(name);
        }
        result
    }

    /// The open log `name`, if it is open.
    pub fn get_log(&self, name: &str) -> Option<Arc<Log>> {
        self.inner.registry().logs.get(name).cloned()
    }

    /// Names of every log on disk, open or not.
    pub fn log_names(&self) -> Result<Vec<String>> {
        let logs_directory = self.inner.root.join("logs");
        let names = self
            .inner
            .shared
            .io
            .list_dir(&logs_directory)
            .map_err(|error| StorageError::io("list directory", &logs_directory, error))?;
        let mut decoded: Vec<String> = names
            .iter()
            .filter(|name| !name.starts_with(TOMBSTONE_PREFIX))
            .filter_map(|name| decode_name(name))
            .collect();
        decoded.sort();
        Ok(decoded)
    }

    /// Closes the log `name` (flushing pending appends and persisting cursors). An
    /// `open_log` of the same name meanwhile waits for the close to finish: two instances of
    /// one log would recover segments being written and write the same journal.
    pub fn close_log(&self, name: &str) -> Result<()> {
        self.with_name_lock(name, || self.close_registered(name))
    }

    /// The number of callers holding or waiting for the lock of log name `name` (opens,
    /// closes, deletes under way). For tests that must know an operation is waiting.
    #[doc(hidden)]
    pub fn name_lock_users(&self, name: &str) -> usize {
        self.inner
            .registry()
            .name_locks
            .get(name)
            .map_or(0, |lock| Arc::strong_count(lock) - 1)
    }

    /// Closes the registered log `name`; the caller holds its name lock.
    fn close_registered(&self, name: &str) -> Result<()> {
        let log = self.inner.registry().logs.remove(name);
        match log {
            Some(log) => log.close(),
            None => Ok(()),
        }
    }

    /// Closes and deletes the log `name` with all its data.
    pub fn delete_log(&self, name: &str) -> Result<()> {
        let directory = self.log_directory(name)?;
        // Opens of this name are refused from now on (`BeingDeleted`), then the deletion waits
        // for an open already under way.
        let _deleting = {
            let mut registry = self.inner.registry();
            if !registry.deleting.insert(name.to_string()) {
                return Err(StorageError::BeingDeleted {
                    log: name.to_string(),
                });
            }
            DeletionUnderWay {
                inner: &self.inner,
                name,
            }
        };
        self.with_name_lock(name, || self.close_and_delete(name, directory))
    }

    fn close_and_delete(&self, name: &str, directory: PathBuf) -> Result<()> {
        self.close_registered(name)?;
        let io = &self.inner.shared.io;
        if io.exists(&directory) {
            // Raise the floor above this log's ledgers before they disappear.
            let names = io
                .list_dir(&directory)
                .map_err(|error| StorageError::io("list directory", &directory, error))?;
            let highest = names
                .iter()
                .filter_map(|name| crate::log::parse_segment_file_name(name))
                .map(|(ledger_id, _)| ledger_id)
                .max()
                .unwrap_or(0);
            self.raise_ledger_floor(highest)?;
            // Removing a directory is one removal per file, which a crash can interrupt; a
            // durable rename to a tombstone first makes the log disappear at once.
            let logs_directory = self.inner.root.join("logs");
            let tombstone = tombstone_path(&directory);
            remove_tombstone(io.as_ref(), &tombstone)?;
            io.rename(&directory, &tombstone)
                .and_then(|()| io.sync_dir(&logs_directory))
                .map_err(|error| StorageError::io("rename", &directory, error))?;
            remove_tombstone(io.as_ref(), &tombstone)?;
        }
        // Bytes a failed close left for this log's journal died with it.
        self.inner
            .shared
            .unwritten_journal_bytes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&directory.join(crate::cursor::JOURNAL_FILE));
        Ok(())
    }

    /// Raises the persisted ledger floor to `ledger_id` if it is below it.
    fn raise_ledger_floor(&self, ledger_id: u64) -> Result<()> {
        let shared = &self.inner.shared;
        let _serialized = shared
            .ledger_floor_update
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if ledger_id > shared.ledger_floor.load(Ordering::SeqCst) {
            write_ledger_floor(shared.io.as_ref(), &self.inner.root, ledger_id)?;
            shared.ledger_floor.store(ledger_id, Ordering::SeqCst);
        }
        Ok(())
    }

    fn log_directory(&self, name: &str) -> Result<PathBuf> {
        let encoded = encode_name(name);
        if name.is_empty() || encoded.len() > ENCODED_LOG_NAME_MAX_BYTES {
            return Err(StorageError::InvalidName {
                what: "log",
                name: name.chars().take(64).collect(),
                reason: "must be non-empty and at most 250 bytes once escaped for the file system",
            });
        }
        Ok(self.inner.root.join("logs").join(encoded))
    }

    /// Persists the changed cursors of every open log: the pass the maintenance thread makes
    /// every `cursor_persist_interval`. Failures are logged and retried on the next pass.
    pub fn persist_cursors(&self) {
        let logs: Vec<Arc<Log>> = self.inner.registry().logs.values().cloned().collect();
        persist_cursors_of(&self.inner.shared, &logs);
    }

    /// Writes the bytes the cursor WAL holds into the journals of the open logs, fsyncs them,
    /// and removes the WAL files that covered them: what the engine does in the background
    /// once the WAL passes `CURSOR_WAL_CHECKPOINT_BYTES`.
    pub fn checkpoint_cursors(&self) -> Result<()> {
        checkpoint_cursors(&self.inner)
    }

    /// Root directory of the engine.
    /// Makes the flush threads take no log until [`Storage::resume_flushes`]: appends made
    /// meanwhile wait, in the order they were made, so that tests can line several logs up
    /// for one flush thread.
    #[doc(hidden)]
    pub fn pause_flushes(&self) {
        self.inner.shared.flush_queue.set_paused(true);
    }

    #[doc(hidden)]
    pub fn resume_flushes(&self) {
        self.inner.shared.flush_queue.set_paused(false);
    }

    /// Whether the entry WAL group's leader is waiting for its group to fill (and would take
    /// the next log needing a flush itself), for tests that line appends up behind it.
    #[doc(hidden)]
    pub fn entry_wal_leader_gathering(&self) -> bool {
        self.inner
            .shared
            .entry_wal
            .as_ref()
            .is_some_and(|wal| wal.gathering())
    }

    /// Runs an entry WAL checkpoint now (the maintenance thread runs one once the WAL holds
    /// 64 MiB): groups from now on go to a new WAL file, every segment file the live logs hold
    /// open is fsynced, and the older WAL files are retired (up to two kept to be written over
    /// by the next files, the others removed).
    pub fn checkpoint_entries(&self) -> Result<()> {
        checkpoint_entries(&self.inner.shared)
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Closes every log and stops the engine's threads.
    pub fn close(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let logs: Vec<Arc<Log>> = {
            let mut registry = self.inner.registry();
            if registry.stopping && self.threads.is_empty() {
                return Ok(());
            }
            registry.stopping = true;
            registry.logs.drain().map(|(_, log)| log).collect()
        };
        // Paused flush threads would keep the closes below waiting.
        self.inner.shared.flush_queue.set_paused(false);
        self.inner.wake.notify_all();
        let mut first_error = None;
        for log in logs {
            if let Err(error) = log.close() {
                tracing::error!(log = %log.name(), %error, "closing log failed");
                first_error.get_or_insert(error);
            }
        }
        for _ in 0..self.inner.shared.config.flush_threads {
            self.inner.shared.flush_queue.push(None);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        let checkpoint = self
            .inner
            .checkpoint
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(checkpoint) = checkpoint {
            let _ = checkpoint.join();
        }
        let entry_checkpoint = self
            .inner
            .entry_checkpoint
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(checkpoint) = entry_checkpoint {
            let _ = checkpoint.join();
        }
        if let Some(wal) = &self.inner.shared.entry_wal {
            // Every log closed fsynced its segments; one still open (closing on another
            // thread) may need the WAL's records.
            if self.inner.shared.live_logs().is_empty() {
                if let Err(error) = wal.retire_all(self.inner.shared.io.as_ref()) {
                    tracing::warn!(%error, "could not remove the entry WAL files; the next start replays them");
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// Marks a name as being deleted for as long as it lives (see `Registry::deleting`).
struct DeletionUnderWay<'a> {
    inner: &'a Inner,
    name: &'a str,
}

impl Drop for DeletionUnderWay<'_> {
    fn drop(&mut self) {
        self.inner.registry().deleting.remove(self.name);
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn maintenance(inner: &Arc<Inner>) {
    let config = &inner.shared.config;
    let mut tick = config.cursor_persist_interval.min(config.trim_interval);
    if let FlushPolicy::RelaxedWriteOnly { fsync_interval } = config.flush_policy {
        tick = tick.min(fsync_interval);
    }
    let mut last_trim = Instant::now();
    loop {
        let logs: Vec<Arc<Log>> = {
            let registry = inner.registry();
            if registry.stopping {
                return;
            }
            let (registry, _) = inner
                .wake
                .wait_timeout(registry, tick)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if registry.stopping {
                return;
            }
            registry.logs.values().cloned().collect()
        };
        let trim_now = last_trim.elapsed() >= config.trim_interval;
        if trim_now {
            last_trim = Instant::now();
        }
        let logs: Vec<Arc<Log>> = logs.into_iter().filter(|log| !log.is_closed()).collect();
        if matches!(config.flush_policy, FlushPolicy::RelaxedWriteOnly { .. }) {
            for log in &logs {
                // A failure is logged, and poisons the log, where it happens.
                let _ = log.sync_written();
            }
        }
        persist_cursors_of(&inner.shared, &logs);
        start_checkpoint_if_due(inner);
        start_entry_checkpoint_if_due(inner);
        if trim_now {
            for log in &logs {
                log.evict_consumed_cache();
                if let Err(error) = log.trim() {
                    tracing::error!(log = %log.name(), %error, "trimming failed; will retry");
                }
            }
        }
    }
}

/// Journals written and fsynced at once when they are written directly (a checkpoint, or
/// passes after the cursor WAL failed): file systems commit concurrent fsyncs together.
const PERSIST_PARALLELISM: usize = 32;

/// Journals written and fsynced at once by a checkpoint: few, so that it leaves the passes
/// running alongside it (and everything else) most of the machine.
const CHECKPOINT_PARALLELISM: usize = 4;

/// The cursor WAL is checkpointed (its bytes written into the journals, which are fsynced,
/// and a new WAL file started) once it holds this much.
const CURSOR_WAL_CHECKPOINT_BYTES: u64 = 16 << 20;

/// Persists the changed cursors of `logs`: one record per log in the cursor WAL and one fsync
/// for all of them. A failure is logged and retried on the next pass.
fn persist_cursors_of(shared: &Shared, logs: &[Arc<Log>]) {
    // Most logs of a large engine are idle.
    let logs: Vec<&Arc<Log>> = logs.iter().filter(|log| log.cursors_changed()).collect();
    if logs.is_empty() {
        return;
    }
    let mut wal = shared
        .cursor_wal
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if wal.broken && !wal.restart(shared.io.as_ref()) {
        drop(wal);
        persist_each(&logs);
        return;
    }
    let staged: Vec<_> = logs.iter().filter_map(|log| log.stage_cursors()).collect();
    if staged.is_empty() {
        return;
    }
    let records: Vec<&WalRecord> = staged.iter().map(|staged| &staged.record).collect();
    let durable = match wal.append(&records) {
        Ok(()) => true,
        Err(error) => {
            tracing::error!(%error, "persisting cursors failed; will retry");
            false
        }
    };
    drop(records);
    for staged in staged {
        staged.settle(durable);
    }
}

/// Runs `work` on each of `logs`, up to `PERSIST_PARALLELISM` at once.
fn for_each_parallel(logs: &[&Arc<Log>], parallelism: usize, work: impl Fn(&Arc<Log>) + Sync) {
    let next = AtomicUsize::new(0);
    let run = || {
        while let Some(log) = logs.get(next.fetch_add(1, Ordering::Relaxed)) {
            work(log);
        }
    };
    let workers = logs.len().min(parallelism);
    if workers <= 1 {
        run();
        return;
    }
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(run);
        }
    });
}

/// Persists each log's cursors straight into its journal (one fsync each, several at once).
fn persist_each(logs: &[&Arc<Log>]) {
    for_each_parallel(logs, PERSIST_PARALLELISM, |log| {
        match log.persist_cursors() {
            // A log closed since the list was taken persisted its cursors when it closed.
            Ok(()) | Err(StorageError::Closed { .. }) => {}
            Err(error) => {
                tracing::error!(log = %log.name(), %error, "persisting cursors failed; will retry")
            }
        }
    });
}

/// Starts a cursor WAL checkpoint in the background once the WAL is large enough and none is
/// running.
fn start_checkpoint_if_due(inner: &Arc<Inner>) {
    let due = inner
        .shared
        .cursor_wal
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .length()
        > CURSOR_WAL_CHECKPOINT_BYTES;
    if due {
        let checkpoint_inner = inner.clone();
        start_in_background(&inner.checkpoint, "cursor WAL checkpoint", move || {
            checkpoint_cursors(&checkpoint_inner)
        });
    }
}

/// Starts an entry WAL checkpoint in the background once the WAL is large enough and none is
/// running: groups from then on go to a new WAL file, every segment file the live logs hold
/// open is fsynced, and the older WAL files are retired.
fn start_entry_checkpoint_if_due(inner: &Arc<Inner>) {
    if inner
        .shared
        .entry_wal
        .as_ref()
        .is_some_and(GroupCommit::checkpoint_due)
    {
        let shared = inner.shared.clone();
        start_in_background(&inner.entry_checkpoint, "entry WAL checkpoint", move || {
            checkpoint_entries(&shared)
        });
    }
}

/// Runs `work` on a thread of its own, kept in `slot`, unless the one there still runs (an
/// error is logged; the next call tries again).
fn start_in_background(
    slot: &Mutex<Option<JoinHandle<()>>>,
    what: &'static str,
    work: impl FnOnce() -> Result<()> + Send + 'static,
) {
    let mut running = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if running.as_ref().is_some_and(|thread| !thread.is_finished()) {
        return;
    }
    if let Some(finished) = running.take() {
        let _ = finished.join();
    }
    let name = format!("meridian-storage-{}", what.replace(' ', "-").to_lowercase());
    match std::thread::Builder::new().name(name).spawn(move || {
        if let Err(error) = work() {
            tracing::error!(%error, "{what} failed; will retry");
        }
    }) {
        Ok(thread) => *running = Some(thread),
        Err(error) => tracing::error!(%error, "could not start the {what}"),
    }
}

fn checkpoint_entries(shared: &Shared) -> Result<()> {
    let Some(wal) = &shared.entry_wal else {
        return Ok(());
    };
    let io = shared.io.as_ref();
    let previous = wal.start_checkpoint(io)?;
    // A group that wrote into the previous file wrote its segments first: fsyncing every
    // segment file held open now covers its batches, finished or not. A log that closed since
    // fsynced its own.
    let mut failed = false;
    for log in shared.live_logs() {
        // A failure pins the WAL (and is reported) where it happens.
        failed |= log.sync_for_wal().is_err();
    }
    if failed {
        return Ok(());
    }
    wal.retire(io, previous)
}

/// Passes from now on go to a new WAL file; the bytes the previous files hold are written into
/// the journals and fsynced (several at once), then those files are removed.
fn checkpoint_cursors(inner: &Inner) -> Result<()> {
    let shared = &inner.shared;
    let io = shared.io.as_ref();
    let previous = shared
        .cursor_wal
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .rotate(io)?;
    let logs = shared.live_logs();
    let logs: Vec<&Arc<Log>> = logs.iter().collect();
    let failed = AtomicUsize::new(0);
    for_each_parallel(&logs, CHECKPOINT_PARALLELISM, |log| {
        if let Err(error) = log.write_pending_cursors() {
            failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(log = %log.name(), %error, "writing cursors into the journal failed; will rewrite it");
        }
    });
    if failed.load(Ordering::Relaxed) > 0 {
        // The older files stay until a later checkpoint (or the next start) no longer needs
        // them.
        return Ok(());
    }
    let pinned = shared.cursor_wal_pinned.load(Ordering::SeqCst);
    shared
        .cursor_wal
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .retire(io, previous, pinned)
}

/// Encodes a log name as a directory name: bytes other than ASCII letters, digits, `-`, `_`
/// and `.` become `%XX` (and a leading `.` too, so no name is hidden or special).
pub(crate) fn encode_name(name: &str) -> String {
    let mut encoded = String::with_capacity(name.len());
    for (index, byte) in name.bytes().enumerate() {
        let plain = byte.is_ascii_alphanumeric()
            || byte == b'-'
            || byte == b'_'
            || (byte == b'.' && index > 0);
        if plain {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

pub(crate) fn decode_name(encoded: &str) -> Option<String> {
    let bytes = encoded.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = std::str::from_utf8(bytes.get(index + 1..index + 3)?).ok()?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

/// Creates `root` if needed and takes an exclusive, non-blocking `flock` on `root/lock`. The
/// kernel releases it when the process ends, however it ends, so no stale lock survives a
/// crash.
fn lock_directory(root: &Path) -> Result<std::fs::File> {
    crate::io::create_dir_durable(&crate::RealIo, root)
        .map_err(|error| StorageError::io("create directory", root, error))?;
    let path = root.join("lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|error| StorageError::io("open", &path, error))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(error) if error == rustix::io::Errno::WOULDBLOCK => Err(StorageError::DirectoryInUse {
            directory: root.to_path_buf(),
        }),
        Err(error) => Err(StorageError::io("lock", &path, error.into())),
    }
}

const LEDGER_FLOOR_FILE: &str = "ledger-floor";
/// A deleted log's directory is renamed to this prefix + its name before its files are removed.
/// Encoded log names never start with a `.`.
const TOMBSTONE_PREFIX: &str = ".deleted-";

/// Longest file name on common file systems (ext4, xfs, tmpfs: `NAME_MAX`).
const FILE_NAME_MAX_BYTES: usize = 255;

/// `.deleted-<encoded name>`; for a name too long for that to fit a file name, the first 200
/// bytes of the encoded name, `~` and the CRC32C of the whole name in hex. Only its prefix
/// matters to recovery, which removes every tombstone.
fn tombstone_path(log_directory: &Path) -> PathBuf {
    let name = log_directory
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tombstone = if TOMBSTONE_PREFIX.len() + name.len() <= FILE_NAME_MAX_BYTES {
        format!("{TOMBSTONE_PREFIX}{name}")
    } else {
        // Encoded names are ASCII, so any byte offset is a character boundary.
        let kept = name.get(..200).unwrap_or(&name);
        let checksum = crc32c::crc32c(name.as_bytes());
        format!("{TOMBSTONE_PREFIX}{kept}~{checksum:08x}")
    };
    crate::io::parent_dir(log_directory).join(tombstone)
}

/// Removes a deleted log's tombstone directory, if there is one, durably.
fn remove_tombstone(io: &dyn Io, tombstone: &Path) -> Result<()> {
    if !io.exists(tombstone) {
        return Ok(());
    }
    let parent = crate::io::parent_dir(tombstone);
    io.remove_dir_all(tombstone)
        .and_then(|()| io.sync_dir(&parent))
        .map_err(|error| StorageError::io("remove directory", tombstone, error))
}

/// Finishes the deletions a crash interrupted: removes every tombstone in `logs_directory`.
fn remove_tombstones(io: &dyn Io, logs_directory: &Path) -> Result<()> {
    let names = io
        .list_dir(logs_directory)
        .map_err(|error| StorageError::io("list directory", logs_directory, error))?;
    for name in names
        .iter()
        .filter(|name| name.starts_with(TOMBSTONE_PREFIX))
    {
        let tombstone = logs_directory.join(name);
        tracing::warn!(path = %tombstone.display(), "finishing the deletion of a log");
        remove_tombstone(io, &tombstone)?;
    }
    Ok(())
}

fn list_is_empty(io: &dyn Io, directory: &Path) -> Result<bool> {
    io.list_dir(directory)
        .map(|names| names.is_empty())
        .map_err(|error| StorageError::io("list directory", directory, error))
}

/// The persisted ledger floor, if one was written.
fn read_ledger_floor(io: &dyn Io, root: &Path) -> Result<Option<u64>> {
    let path = root.join(LEDGER_FLOOR_FILE);
    if !io.exists(&path) {
        return Ok(None);
    }
    let file = io
        .open(&path)
        .map_err(|error| StorageError::io("open", &path, error))?;
    let mut bytes = [0u8; 12];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|error| StorageError::io("read", &path, error))?;
    let (value, checksum) = bytes.split_at(8);
    if crc32c::crc32c(value).to_be_bytes() != checksum {
        return Err(StorageError::Corrupted {
            path: path.clone(),
            offset: 0,
            reason: "ledger floor checksum mismatch".into(),
        });
    }
    Ok(Some(u64::from_be_bytes(
        value.try_into().unwrap_or_default(),
    )))
}

fn ledger_floor_temporary(root: &Path) -> PathBuf {
    root.join(format!("{LEDGER_FLOOR_FILE}.tmp"))
}

/// Removes the temporary file of a floor update that a crash interrupted (the floor it was
/// to replace is still complete), so that the next update can create it again.
fn remove_stale_ledger_floor_temporary(io: &dyn Io, root: &Path) -> Result<()> {
    let temporary = ledger_floor_temporary(root);
    if !io.exists(&temporary) {
        return Ok(());
    }
    tracing::warn!(path = %temporary.display(), "removing an unfinished ledger floor update");
    io.remove_file(&temporary)
        .and_then(|()| io.sync_dir(root))
        .map_err(|error| StorageError::io("remove", &temporary, error))
}

/// Persists the ledger floor: a new file, fsynced, renamed over the old one. Callers serialize.
fn write_ledger_floor(io: &dyn Io, root: &Path, floor: u64) -> Result<()> {
    let path = root.join(LEDGER_FLOOR_FILE);
    let temporary = ledger_floor_temporary(root);
    // Left by an update that failed part-way.
    remove_stale_ledger_floor_temporary(io, root)?;
    let mut bytes = floor.to_be_bytes().to_vec();
    bytes.extend_from_slice(&crc32c::crc32c(&floor.to_be_bytes()).to_be_bytes());
    let file = io
        .create(&temporary)
        .map_err(|error| StorageError::io("create", &temporary, error))?;
    file.write_all_at(&bytes, 0)
        .and_then(|()| file.sync())
        .map_err(|error| StorageError::io("write", &temporary, error))?;
    io.rename(&temporary, &path)
        .and_then(|()| io.sync_dir(root))
        .map_err(|error| StorageError::io("rename", &path, error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_as_safe_file_names() {
        for name in [
            "persistent://public/default/orders-partition-3",
            ".hidden",
            "a%b",
            "ünï",
        ] {
            let encoded = encode_name(name);
            assert!(
                !encoded.contains('/') && !encoded.starts_with('.'),
                "{encoded}"
            );
            assert_eq!(decode_name(&encoded).as_deref(), Some(name));
        }
    }
}
