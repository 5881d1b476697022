//! How one log's load affects the others, and how cursor persistence scales with the number of
//! logs. Each case prints one Markdown table row for `docs/BENCHMARKS.md`.
//!
//! Run: `cargo bench -p meridian-storage --bench scale`
//! Options (environment): `MERIDIAN_BENCH_DIR` (default `target/bench-scale`, on the disk to
//! measure), `MERIDIAN_BENCH_SECONDS` (starvation case, default 5), `MERIDIAN_BENCH_RECOVERY_MB`
//! (size of the log recovered in the recovery case, default 512), `MERIDIAN_BENCH_LOGS` (logs of
//! the persistence case, default 10000), `MERIDIAN_BENCH_CASES` (comma-separated case names to
//! run, default all).
//!
//! Cases:
//! - **starvation**: as many busy logs as flush threads, each with 32 async appenders of 64 KiB
//!   entries, and one quiet log whose single appender appends 1 KiB and awaits it, in a loop.
//!   Reported: the quiet log's append latency (p50, p99, max).
//! - **recovery**: a large log of 4 KiB entries is opened (recovered: every record read and
//!   checksummed; its files are in the page cache, so this is the CPU-bound best case) on one
//!   thread; meanwhile another thread opens a small log. Reported: both durations.
//! - **persistence**: N logs, each with a durable cursor whose acknowledgement changed.
//!   Reported: the duration of one pass that persists every cursor (what the maintenance thread
//!   does every `cursor_persist_interval`), then of 40 more passes (every cursor changed before
//!   each) with a checkpoint of the cursor WAL running alongside two stretches of them, and of
//!   those checkpoints.
//! - **bound**: N logs (`MERIDIAN_BENCH_LOGS`), each with a durable cursor, under the default
//!   maintenance (persistence every 200 ms, WAL checkpoints in the background); one thread
//!   acknowledges on every log's cursor in a loop (all of them change between two passes),
//!   another appends an entry to one log, acknowledges it on a probe cursor and waits until
//!   that acknowledgement is durable (`Log::persisted_mark_delete_position`), 60 times.
//!   Reported: the time from the acknowledgement to its durability (p50, p99, max): the bound
//!   of what a crash can redeliver.
//! - **snapshot**: one log whose cursor has 100,000 acknowledged ranges is persisted in a loop
//!   (each time after one more acknowledgement); meanwhile another thread makes a call that
//!   takes the log's lock (`Log::last_position`) every 100 µs. Reported: that call's latency
//!   (p50, p99, max): how long the persisting holds the log's lock.
//! - **descriptors**: a log of 256 segments of 1 MiB is written, the engine reopened and the
//!   whole log read. Reported: the process's open file descriptors (`/proc/self/fd`) before the
//!   engine opens, and after each step.
//! - **index**: a log of `MERIDIAN_BENCH_INDEX_ENTRIES` (default 2,000,000) entries of 100 bytes
//!   is written, the engine reopened and the log opened (recovered). Reported: the memory its
//!   segment indexes hold (`LogStats::index_bytes`), and the process's resident memory
//!   (`VmRSS`) growth from before the reopen to after the log is open.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian_storage::{InitialPosition, Storage, StorageConfig};

fn environment<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// The defaults, with the maintenance thread's cursor persistence and trimming out of the way
/// (it wakes at the shorter of the two intervals): the cases drive those themselves, and a log
/// without cursors would otherwise be trimmed away under the default retention.
fn quiet_maintenance() -> StorageConfig {
    StorageConfig {
        cursor_persist_interval: Duration::from_secs(3600),
        trim_interval: Duration::from_secs(3600),
        ..StorageConfig::default()
    }
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

fn milliseconds(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1e3)
}

fn starvation(directory: &Path, seconds: f64) {
    let _ = fs::remove_dir_all(directory);
    let config = StorageConfig::default();
    let busy_logs = config.flush_threads;
    let storage = Storage::open(directory, config).expect("open storage");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let stop = Arc::new(AtomicBool::new(false));
    let payload = Bytes::from(vec![0x5Au8; 64 * 1024]);
    let mut tasks = Vec::new();
    for index in 0..busy_logs {
        let log = storage.open_log(&format!("busy-{index}")).expect("log");
        for _ in 0..32 {
            let (log, stop, payload) = (log.clone(), stop.clone(), payload.clone());
            tasks.push(runtime.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    log.append(payload.clone(), 0)
                        .expect("append")
                        .await
                        .expect("durable");
                }
            }));
        }
    }
    let quiet = storage.open_log("quiet").expect("log");
    // Warm-up: the busy logs reach their steady state.
    std::thread::sleep(Duration::from_millis(500));
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < seconds {
        let append_started = Instant::now();
        quiet
            .append(Bytes::from_static(&[1u8; 1024]), 0)
            .expect("append")
            .wait()
            .expect("durable");
        latencies.push(append_started.elapsed());
        std::thread::sleep(Duration::from_millis(2));
    }
    stop.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        for task in tasks {
            task.await.expect("appender");
        }
    });
    storage.close().expect("close");
    let _ = fs::remove_dir_all(directory);
    latencies.sort();
    println!(
        "| starvation | {busy_logs} busy logs × 32 appenders of 64 KiB, 1 quiet log | quiet append p50 {} ms, p99 {} ms, max {} ms ({} appends) |",
        milliseconds(percentile(&latencies, 0.5)),
        milliseconds(percentile(&latencies, 0.99)),
        milliseconds(latencies.last().copied().unwrap_or_default()),
        latencies.len()
    );
}

fn recovery(directory: &Path, megabytes: u64) {
    let _ = fs::remove_dir_all(directory);
    {
        let storage = Storage::open(directory, StorageConfig::default()).expect("open storage");
        let log = storage.open_log("large").expect("log");
        // 4 KiB entries, in waves within the log's limit of bytes waiting to be flushed.
        let payload = Bytes::from(vec![0x33u8; 4096]);
        for _ in 0..megabytes.div_ceil(4) {
            let pending: Vec<_> = (0..1024)
                .map(|_| log.append(payload.clone(), 0).expect("append"))
                .collect();
            for append in pending {
                append.wait().expect("durable");
            }
        }
        storage.open_log("small").expect("log");
        storage.open_log("alone").expect("log");
        storage.close().expect("close");
    }
    let storage = Arc::new(Storage::open(directory, StorageConfig::default()).expect("open"));
    // What opening a small log costs when nothing else is being opened.
    let started = Instant::now();
    storage.open_log("alone").expect("log alone");
    let alone = started.elapsed();
    let large = {
        let storage = storage.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            storage.open_log("large").expect("large log");
            started.elapsed()
        })
    };
    // Give the large open a head start so that it holds whatever it holds.
    std::thread::sleep(Duration::from_millis(20));
    let started = Instant::now();
    storage.open_log("small").expect("small log");
    let small = started.elapsed();
    let large = large.join().expect("large open");
    drop(storage);
    let _ = fs::remove_dir_all(directory);
    println!(
        "| recovery | a {megabytes} MiB log recovers while a small log is opened | large open {} ms; small open {} ms (alone: {} ms) |",
        milliseconds(large),
        milliseconds(small),
        milliseconds(alone)
    );
}

fn persistence(directory: &Path, logs: usize) {
    let _ = fs::remove_dir_all(directory);
    let storage = Storage::open(directory, quiet_maintenance()).expect("open storage");
    let mut opened = Vec::with_capacity(logs);
    for index in 0..logs {
        let log = storage.open_log(&format!("topic-{index}")).expect("log");
        let position = log
            .append(Bytes::from_static(b"entry"), 0)
            .expect("append")
            .wait()
            .expect("durable");
        log.open_cursor("sub", InitialPosition::Earliest)
            .expect("cursor");
        log.acknowledge_cumulative("sub", position).expect("ack");
        opened.push(log);
    }
    let started = Instant::now();
    storage.persist_cursors();
    let pass = started.elapsed();
    // Sustained: 40 more passes, every cursor changed before each; a checkpoint of the cursor
    // WAL (what the engine starts in the background every 16 MiB of WAL) runs alongside
    // passes 10 and 30.
    let mut passes = Vec::new();
    let mut checkpoints = Vec::new();
    std::thread::scope(|scope| {
        let mut checkpoint = None;
        for round in 0..40 {
            if round == 10 || round == 30 {
                let storage = &storage;
                checkpoint = Some(scope.spawn(move || {
                    let started = Instant::now();
                    storage.checkpoint_cursors().expect("checkpoint");
                    started.elapsed()
                }));
            }
            for log in &opened {
                let position = log.last_position().expect("entry");
                log.acknowledge_cumulative("sub", position).expect("ack");
            }
            let started = Instant::now();
            storage.persist_cursors();
            passes.push(started.elapsed());
            if round == 20 || round == 39 {
                if let Some(running) = checkpoint.take() {
                    checkpoints.push(running.join().expect("checkpoint"));
                }
            }
        }
    });
    passes.sort();
    drop(opened);
    storage.close().expect("close");
    let _ = fs::remove_dir_all(directory);
    println!(
        "| persistence | {logs} logs, one changed cursor each | one pass {} ms; 40 more passes: p50 {} ms, max {} ms, with two checkpoints alongside taking {} and {} ms |",
        milliseconds(pass),
        milliseconds(percentile(&passes, 0.5)),
        milliseconds(passes.last().copied().unwrap_or_default()),
        milliseconds(checkpoints.first().copied().unwrap_or_default()),
        milliseconds(checkpoints.get(1).copied().unwrap_or_default()),
    );
}

fn bound(directory: &Path, logs: usize) {
    let _ = fs::remove_dir_all(directory);
    let config = StorageConfig {
        // Nothing to trim: every log keeps its entries.
        trim_interval: Duration::from_secs(3600),
        ..StorageConfig::default()
    };
    let storage = Storage::open(directory, config).expect("open storage");
    let mut opened = Vec::with_capacity(logs);
    for index in 0..logs {
        let log = storage.open_log(&format!("topic-{index}")).expect("log");
        log.append(Bytes::from_static(b"entry"), 0)
            .expect("append")
            .wait()
            .expect("durable");
        log.open_cursor("sub", InitialPosition::Earliest)
            .expect("cursor");
        opened.push(log);
    }
    let probe = opened[0].clone();
    probe
        .open_cursor("probe", InitialPosition::Earliest)
        .expect("cursor");
    let stop = AtomicBool::new(false);
    let mut latencies = Vec::new();
    let mut sweeps = 0u64;
    std::thread::scope(|scope| {
        let churn = scope.spawn(|| {
            let mut sweeps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for log in &opened {
                    let position = log.last_position().expect("entry");
                    log.acknowledge_cumulative("sub", position).expect("ack");
                }
                sweeps += 1;
            }
            sweeps
        });
        // Let the passes reach their steady state.
        std::thread::sleep(Duration::from_secs(2));
        for _ in 0..60 {
            let position = probe
                .append(Bytes::from_static(b"probe"), 0)
                .expect("append")
                .wait()
                .expect("durable");
            let acknowledged = Instant::now();
            probe
                .acknowledge_cumulative("probe", position)
                .expect("ack");
            while probe.persisted_mark_delete_position("probe").flatten() < Some(position) {
                std::thread::sleep(Duration::from_millis(1));
            }
            latencies.push(acknowledged.elapsed());
            // Spread the probes over the persistence cycle.
            std::thread::sleep(Duration::from_millis(37));
        }
        stop.store(true, Ordering::Relaxed);
        sweeps = churn.join().expect("churn");
    });
    drop(probe);
    drop(opened);
    storage.close().expect("close");
    let _ = fs::remove_dir_all(directory);
    latencies.sort();
    println!(
        "| bound | {logs} logs, every cursor changing ({sweeps} sweeps over all of them), default 200 ms persistence | acknowledgement durable after p50 {} ms, p99 {} ms, max {} ms ({} probes) |",
        milliseconds(percentile(&latencies, 0.5)),
        milliseconds(percentile(&latencies, 0.99)),
        milliseconds(latencies.last().copied().unwrap_or_default()),
        latencies.len()
    );
}

fn snapshot(directory: &Path, seconds: f64) {
    let _ = fs::remove_dir_all(directory);
    let storage = Storage::open(directory, quiet_maintenance()).expect("open storage");
    let log = storage.open_log("acks").expect("log");
    let ledger_id = log.current_ledger_id();
    let entries = 200_002u64;
    for _ in 0..entries.div_ceil(10_000) {
        let pending: Vec<_> = (0..10_000)
            .map(|_| log.append(Bytes::from_static(b"x"), 0).expect("append"))
            .collect();
        for append in pending {
            append.wait().expect("durable");
        }
    }
    log.open_cursor("sub", InitialPosition::Earliest)
        .expect("cursor");
    let every_other: Vec<meridian_storage::Position> = (1..entries - 2)
        .step_by(2)
        .map(|entry| meridian_storage::Position::new(ledger_id, entry))
        .collect();
    log.acknowledge("sub", &every_other).expect("ack");
    let stop = Arc::new(AtomicBool::new(false));
    let persister = {
        let (log, stop) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut passes = 0u64;
            let mut toggle = false;
            while !stop.load(Ordering::Relaxed) {
                // Change the cursor so that each pass has a snapshot to write.
                let key = if toggle { "a" } else { "b" };
                toggle = !toggle;
                let mut properties = std::collections::BTreeMap::new();
                properties.insert(key.to_string(), String::new());
                log.set_cursor_properties("sub", properties)
                    .expect("properties");
                log.persist_cursors().expect("persist");
                passes += 1;
            }
            passes
        })
    };
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < seconds {
        let call_started = Instant::now();
        std::hint::black_box(log.last_position());
        latencies.push(call_started.elapsed());
        std::thread::sleep(Duration::from_micros(100));
    }
    stop.store(true, Ordering::Relaxed);
    let passes = persister.join().expect("persister");
    drop(log);
    storage.close().expect("close");
    let _ = fs::remove_dir_all(directory);
    latencies.sort();
    println!(
        "| snapshot | a cursor of 100,000 ranges persisted in a loop ({passes} passes) | log-lock call p50 {} ms, p99 {} ms, max {} ms |",
        milliseconds(percentile(&latencies, 0.5)),
        milliseconds(percentile(&latencies, 0.99)),
        milliseconds(latencies.last().copied().unwrap_or_default()),
    );
}

fn open_descriptors() -> usize {
    fs::read_dir("/proc/self/fd")
        .map(|entries| entries.count())
        .unwrap_or(0)
}

fn descriptors(directory: &Path) {
    let _ = fs::remove_dir_all(directory);
    let config = StorageConfig {
        segment_max_bytes: 1024 * 1024,
        entry_max_bytes: 64 * 1024,
        ..quiet_maintenance()
    };
    let baseline = open_descriptors();
    let written = {
        let storage = Storage::open(directory, config.clone()).expect("open storage");
        let log = storage.open_log("long").expect("log");
        let payload = Bytes::from(vec![0x44u8; 64 * 1024]);
        for _ in 0..256 {
            let pending: Vec<_> = (0..16)
                .map(|_| log.append(payload.clone(), 0).expect("append"))
                .collect();
            for append in pending {
                append.wait().expect("durable");
            }
        }
        let written = open_descriptors();
        storage.close().expect("close");
        written
    };
    let storage = Storage::open(directory, config).expect("reopen");
    let log = storage.open_log("long").expect("log");
    let segments = log.stats().segments;
    let recovered = open_descriptors();
    let first = log.first_position().expect("entries");
    let mut next = Some(first);
    while let Some(position) = next {
        let entries = log.read_from(position, 64, usize::MAX).expect("read");
        next = entries
            .last()
            .map(|entry| log.next_position(entry.position));
        if entries.len() < 64 {
            break;
        }
    }
    let read = open_descriptors();
    drop(log);
    storage.close().expect("close");
    let _ = fs::remove_dir_all(directory);
    println!(
        "| descriptors | one log of {segments} segments of 1 MiB | open fds: {baseline} before the engine; {written} after writing; {recovered} after reopening; {read} after reading it all |"
    );
}

fn resident_bytes() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| {
                    value
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map(|kilobytes| kilobytes * 1024)
        .unwrap_or(0)
}

fn index(directory: &Path, entries: u64) {
    let _ = fs::remove_dir_all(directory);
    let config = quiet_maintenance();
    let written_index = {
        let storage = Storage::open(directory, config.clone()).expect("open storage");
        let log = storage.open_log("many").expect("log");
        let payload = Bytes::from(vec![0x55u8; 100]);
        for _ in 0..entries.div_ceil(10_000) {
            let pending: Vec<_> = (0..10_000)
                .map(|_| log.append(payload.clone(), 0).expect("append"))
                .collect();
            for append in pending {
                append.wait().expect("durable");
            }
        }
        let index_bytes = log.stats().index_bytes;
        drop(log);
        storage.close().expect("close");
        index_bytes
    };
    let before = resident_bytes();
    let storage = Storage::open(directory, config).expect("reopen");
    let log = storage.open_log("many").expect("log");
    let stats = log.stats();
    let after = resident_bytes();
    drop(log);
    storage.close().expect("close");
    let _ = fs::remove_dir_all(directory);
    let per_entry = |bytes: f64| bytes / entries.div_ceil(10_000).saturating_mul(10_000) as f64;
    println!(
        "| index | one log of {} entries of 100 bytes, {} segments | index {} bytes ({:.3} per entry) after reopening, {} bytes while written; resident memory +{:.1} MiB by reopening ({:.2} bytes per entry) |",
        entries.div_ceil(10_000) * 10_000,
        stats.segments,
        stats.index_bytes,
        per_entry(stats.index_bytes as f64),
        written_index,
        after.saturating_sub(before) as f64 / (1024.0 * 1024.0),
        per_entry(after.saturating_sub(before) as f64),
    );
}

fn main() {
    let directory: PathBuf = std::env::var("MERIDIAN_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("target/bench-scale"));
    let seconds: f64 = environment("MERIDIAN_BENCH_SECONDS", 5.0);
    let megabytes: u64 = environment("MERIDIAN_BENCH_RECOVERY_MB", 512);
    let logs: usize = environment("MERIDIAN_BENCH_LOGS", 10_000);
    let cases: String = environment(
        "MERIDIAN_BENCH_CASES",
        "starvation,recovery,persistence,bound,snapshot,descriptors,index".to_string(),
    );
    let cases: Vec<&str> = cases.split(',').collect();
    println!("| case | load | result |");
    println!("|---|---|---|");
    if cases.contains(&"starvation") {
        starvation(&directory.join("starvation"), seconds);
    }
    if cases.contains(&"recovery") {
        recovery(&directory.join("recovery"), megabytes);
    }
    if cases.contains(&"persistence") {
        persistence(&directory.join("persistence"), logs);
    }
    if cases.contains(&"bound") {
        bound(&directory.join("bound"), logs);
    }
    if cases.contains(&"snapshot") {
        snapshot(&directory.join("snapshot"), seconds);
    }
    if cases.contains(&"descriptors") {
        descriptors(&directory.join("descriptors"));
    }
    if cases.contains(&"index") {
        let entries: u64 = environment("MERIDIAN_BENCH_INDEX_ENTRIES", 2_000_000);
        index(&directory.join("index"), entries);
    }
}
