//! Storage configuration: every limit the engine enforces, with its default.

use std::time::Duration;

/// When an append is reported successful.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// The default: an append succeeds only after its bytes, and every byte before them, are
    /// fsynced. Concurrent appends share one fsync (group commit).
    Fsync,
    /// RELAXED, not durable: an append succeeds once its bytes are written to the operating
    /// system; fsync runs every `fsync_interval`. A machine crash (not a process crash) can lose
    /// acknowledged appends from the last interval.
    RelaxedWriteOnly { fsync_interval: Duration },
}

/// How much acknowledged data a log keeps. `None` means unlimited. As in Pulsar, a segment
/// every cursor has passed is deleted once it is older than `time` **or** the log stays at
/// least `size_bytes` large without it (so at least `size_bytes` are always kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub time: Option<Duration>,
    pub size_bytes: Option<u64>,
}

impl Default for Retention {
    /// Pulsar's default: acknowledged data is not retained.
    fn default() -> Self {
        Retention {
            time: Some(Duration::ZERO),
            size_bytes: Some(0),
        }
    }
}

/// The most `entry_wal_group_wait` and `entry_wal_group_idle` may be: an hour.
pub const ENTRY_WAL_GROUP_LIMIT_MAX: Duration = Duration::from_secs(3600);

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub flush_policy: FlushPolicy,
    /// A segment is sealed and a new one started when the next record would exceed this size.
    pub segment_max_bytes: u64,
    /// Largest entry accepted by `append`. Pulsar's default maximum message size is 5 MiB,
    /// and a frame may carry 10 KiB of padding beyond it.
    pub entry_max_bytes: usize,
    /// Total bytes of recent entries kept in memory across all logs.
    pub cache_max_bytes: u64,
    /// Bytes a single log may hold that are appended but not yet flushed; appends beyond it
    /// fail with `TooManyPendingBytes` (back-pressure).
    pub pending_max_bytes_per_log: u64,
    /// Threads that write and fsync. Each log has at most one flush in flight; more threads let
    /// more logs fsync in parallel.
    pub flush_threads: usize,
    /// How often changed cursor state is made durable (one cursor WAL write and fsync for all
    /// logs). A crash can redeliver the acknowledgements of at most this long plus two
    /// persistence passes (see `docs/durability.md`).
    pub cursor_persist_interval: Duration,
    /// Individually acknowledged ranges persisted per cursor; ranges beyond it are kept in
    /// memory but redelivered after a crash.
    pub cursor_max_persisted_ranges: usize,
    /// Individually acknowledged ranges a cursor holds in memory. An acknowledgement that
    /// would start one more range is refused (`TooManyAcknowledgedRanges`, the entry stays
    /// unacknowledged and is delivered again); the broker stops dispatching new entries to a
    /// subscription before it gets there.
    pub cursor_max_ranges: usize,
    /// How often retention and trimming run.
    pub trim_interval: Duration,
    /// Trimmed segment files a log keeps to write its next segments into instead of deleting
    /// them (0: delete every trimmed segment). Overwriting a file that already has its blocks
    /// spares each fdatasync the journal commit of a growing file and trimming the removal of
    /// a large file (both stall appends on ext4); each kept file holds up to `segment_max_bytes`
    /// of disk until it is reused, or until the log closes.
    pub recycled_segments_max: usize,
    /// Under the `Fsync` policy: a flush thread that finds several logs waiting makes their
    /// batches durable together, with one write and one fsync of the engine's entry
    /// write-ahead log, instead of one fsync per log (their segments are fsynced at
    /// checkpoints). A log alone is flushed with its own fsync either way.
    pub entry_wal: bool,
    /// How long a group of the entry WAL may wait for more logs' batches before its write and
    /// fsync, counted from its oldest batch (a group of 512 KiB goes at once; zero: no wait;
    /// no wait either with one flush thread, which no other could help fill the group).
    /// Fewer, larger groups cost less CPU per message when many logs are written at once, at
    /// up to this much more latency for their receipts. A log written alone keeps its
    /// segment's own fsync and never waits, unless a group of several logs' batches went
    /// through the WAL within the last `entry_wal_group_wait` (other logs are being written:
    /// it joins the next group). At most an hour.
    /// A bookie's `journalMaxGroupWaitMSec` plays the same part.
    pub entry_wal_group_wait: Duration,
    /// A waiting group of the entry WAL is written once no batch has joined it for this long,
    /// even before `entry_wal_group_wait` has passed: when the producers have sent all they
    /// may and await these receipts, waiting longer only delays them. Zero: no wait. At most
    /// an hour.
    pub entry_wal_group_idle: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            flush_policy: FlushPolicy::Fsync,
            segment_max_bytes: 128 * 1024 * 1024,
            entry_max_bytes: 5 * 1024 * 1024 + 10 * 1024,
            cache_max_bytes: 256 * 1024 * 1024,
            pending_max_bytes_per_log: 64 * 1024 * 1024,
            flush_threads: 4,
            cursor_persist_interval: Duration::from_millis(200),
            cursor_max_persisted_ranges: 100_000,
            cursor_max_ranges: 100_000,
            trim_interval: Duration::from_secs(1),
            recycled_segments_max: 2,
            entry_wal: true,
            entry_wal_group_wait: Duration::from_millis(1),
            entry_wal_group_idle: Duration::from_micros(250),
        }
    }
}

impl StorageConfig {
    /// Checks the settings for values the engine cannot work with, naming the offending key.
    pub fn validate(&self) -> Result<(), String> {
        let smallest_segment = crate::format::HEADER_LEN
            + crate::format::RECORD_FRAMING_LEN
            + crate::log::ENTRY_HEADER_LEN
            + self.entry_max_bytes as u64;
        if self.segment_max_bytes < smallest_segment {
            return Err(format!(
                "segment_max_bytes ({}) must hold at least one entry of entry_max_bytes ({}): minimum {smallest_segment}",
                self.segment_max_bytes, self.entry_max_bytes
            ));
        }
        if self.segment_max_bytes > u32::MAX as u64 {
            return Err(format!(
                "segment_max_bytes ({}) must be below 4 GiB",
                self.segment_max_bytes
            ));
        }
        if self.entry_wal_group_wait > ENTRY_WAL_GROUP_LIMIT_MAX {
            return Err("entry_wal_group_wait must be at most an hour".into());
        }
        if self.entry_wal_group_idle > ENTRY_WAL_GROUP_LIMIT_MAX {
            return Err("entry_wal_group_idle must be at most an hour".into());
        }
        if self.flush_threads == 0 {
            return Err("flush_threads must be at least 1".into());
        }
        if self.pending_max_bytes_per_log < self.entry_max_bytes as u64 {
            return Err("pending_max_bytes_per_log must be at least entry_max_bytes".into());
        }
        if self.cursor_max_ranges == 0 {
            return Err("cursor_max_ranges must be at least 1".into());
        }
        if self.cursor_persist_interval.is_zero() {
            return Err("cursor_persist_interval must be positive".into());
        }
        if self.trim_interval.is_zero() {
            return Err("trim_interval must be positive".into());
        }
        if let FlushPolicy::RelaxedWriteOnly { fsync_interval } = self.flush_policy {
            if fsync_interval.is_zero() {
                return Err("flush_policy relaxed fsync_interval must be positive".into());
            }
        }
        Ok(())
    }
}
