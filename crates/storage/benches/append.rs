//! Durable append throughput of the storage engine, next to the machine's raw rate for
//! sequential writes with fsync at the same batch size, measured in the same run.
//!
//! Run: `cargo bench -p meridian-storage --bench append`
//! Options (environment): `MERIDIAN_BENCH_DIR` (default `target/bench-append`, must be on the
//! disk you want to measure, not tmpfs), `MERIDIAN_BENCH_SECONDS` (per case, default 5).
//!
//! For every (entry size, appenders) case: N async tasks (on a two-thread tokio runtime) each
//! append and await durability in a loop, under the default policy (fsync before success). The engine reports how many bytes it
//! flushed per fsync; the raw baseline then writes batches of exactly that size to a plain file
//! with `write` + `fdatasync` in a loop. The ratio is engine payload bandwidth / raw bandwidth.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian_storage::{Storage, StorageConfig};

struct EngineResult {
    appends_per_second: f64,
    megabytes_per_second: f64,
    bytes_per_fsync: u64,
    cpu_microseconds_per_append: f64,
}

/// User + system CPU time of this process, from /proc (in clock ticks of 10 ms).
fn cpu_time() -> Duration {
    let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|field| field.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn run_engine(directory: &Path, entry_size: usize, appenders: usize, seconds: f64) -> EngineResult {
    let _ = fs::remove_dir_all(directory);
    let storage = Storage::open(directory, StorageConfig::default()).expect("open storage");
    let log = storage.open_log("bench").expect("open log");
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let appended = Arc::new(AtomicU64::new(0));
    let payload = Bytes::from(vec![0x5Au8; entry_size]);
    // Appenders are async tasks on a two-thread runtime, the way the broker's connections
    // append: each awaits its append's durability before the next one.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let tasks: Vec<_> = (0..appenders)
        .map(|_| {
            let (log, stop, measuring, appended, payload) = (
                log.clone(),
                stop.clone(),
                measuring.clone(),
                appended.clone(),
                payload.clone(),
            );
            runtime.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    log.append(payload.clone(), 0)
                        .expect("append")
                        .await
                        .expect("durable");
                    if measuring.load(Ordering::Relaxed) {
                        appended.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    // Warm-up.
    std::thread::sleep(Duration::from_millis(500));
    let stats_before = log.stats();
    let cpu_before = cpu_time();
    let started = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs_f64(seconds));
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_time().saturating_sub(cpu_before);
    let stats_after = log.stats();
    stop.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        for task in tasks {
            task.await.expect("appender");
        }
    });
    storage.close().expect("close");
    let _ = fs::remove_dir_all(directory);
    let count = appended.load(Ordering::Relaxed);
    let flushes = (stats_after.flushes - stats_before.flushes).max(1);
    let flushed = stats_after.bytes_flushed - stats_before.bytes_flushed;
    EngineResult {
        appends_per_second: count as f64 / elapsed,
        megabytes_per_second: (count * entry_size as u64) as f64 / elapsed / 1e6,
        bytes_per_fsync: flushed / flushes,
        cpu_microseconds_per_append: cpu.as_secs_f64() * 1e6 / count.max(1) as f64,
    }
}

/// Raw sequential write + fdatasync bandwidth with `batch_bytes` per fsync, in MB/s.
fn run_raw(directory: &Path, batch_bytes: u64, seconds: f64) -> f64 {
    fs::create_dir_all(directory).expect("bench directory");
    let path = directory.join("raw-write-fsync");
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .expect("raw file");
    let batch = vec![0xA5u8; batch_bytes.max(1) as usize];
    let started = Instant::now();
    let mut written = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        file.write_all(&batch).expect("write");
        file.sync_data().expect("fdatasync");
        written += batch.len() as u64;
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(file);
    let _ = fs::remove_file(&path);
    written as f64 / elapsed / 1e6
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument filters nothing here.
    let seconds: f64 = std::env::var("MERIDIAN_BENCH_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(5.0);
    let directory = std::env::var("MERIDIAN_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("target/bench-append"));
    println!(
        "# storage append benchmark: {seconds} s per case, data in {}",
        directory.display()
    );
    println!();
    println!("| entry | appenders | appends/s | payload MB/s | bytes per fsync | raw write+fsync MB/s at that batch | ratio | CPU µs/append |");
    println!("|---|---|---|---|---|---|---|---|");
    for entry_size in [1024usize, 64 * 1024] {
        for appenders in [1usize, 8, 64] {
            let engine = run_engine(&directory.join("engine"), entry_size, appenders, seconds);
            let raw = run_raw(&directory, engine.bytes_per_fsync, seconds);
            println!(
                "| {} KiB | {appenders} | {:.0} | {:.1} | {} | {:.1} | {:.0}% | {:.1} |",
                entry_size / 1024,
                engine.appends_per_second,
                engine.megabytes_per_second,
                engine.bytes_per_fsync,
                raw,
                100.0 * engine.megabytes_per_second / raw,
                engine.cpu_microseconds_per_append,
            );
        }
    }
}
