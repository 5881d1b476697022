//! Measures the object-store log's append latency (append until committed in etcd) and
//! throughput with 1 KiB entries from N topics, each keeping a window of appends in flight.
//!
//! ```text
//! MERIDIAN_S3_ACCESS_KEY_ID=... MERIDIAN_S3_SECRET_ACCESS_KEY=... \
//!   cargo run --release -p meridian-objlog --example append_latency -- \
//!   etcd://127.0.0.1:2379 s3://bucket/prefix http://127.0.0.1:8333 [topics] [window] [seconds]
//! ```
//!
//! Defaults: 4 topics, 16 appends in flight per topic, 10 s. The bucket is created if missing.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use meridian_etcd::{Acquire, ClientOptions, Cluster, SessionOptions};
use meridian_objlog::{ObjectLog, ObjectLogConfig, PendingAppend};
use meridian_objstore::{Credentials, ObjectStore, S3Config};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let [etcd, storage, endpoint, rest @ ..] = arguments.as_slice() else {
        return Err(
            "usage: append_latency etcd://host:port s3://bucket/prefix http://endpoint \
                    [topics] [window] [seconds]"
                .into(),
        );
    };
    let number = |index: usize, default: u64| -> Result<u64, std::num::ParseIntError> {
        rest.get(index).map_or(Ok(default), |text| text.parse())
    };
    let topics = number(0, 4)? as usize;
    let window = number(1, 16)? as usize;
    let seconds = number(2, 10)?;

    let config = S3Config::new(
        storage,
        endpoint,
        "us-east-1",
        true,
        Credentials::from_env()?,
    )?;
    let store = Arc::new(ObjectStore::new(&config)?);
    store.create_bucket()?;
    let run = format!("bench-{}", std::process::id());
    let cluster = Cluster::connect(etcd, &run, ClientOptions::default())?;
    let session = Arc::new(cluster.start_session(&run, b"bench", SessionOptions::default())?);
    let bundle = "bench/ns/0x00000000_0xffffffff";
    let Acquire::Acquired(ownership) = session.try_acquire(bundle)? else {
        return Err("the bench bundle is owned already".into());
    };
    let engine = ObjectLog::start(
        ObjectLogConfig::new(&run),
        cluster.clone(),
        session.clone(),
        store,
    )?;

    let payload = Bytes::from(vec![0x5au8; 1024]);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let threads: Vec<_> = (0..topics)
        .map(|index| {
            let log = engine.open_topic(&format!("persistent://bench/ns/t-{index}"), &ownership);
            let payload = payload.clone();
            std::thread::spawn(move || -> Result<Histogram<u64>, String> {
                let log = log.map_err(|error| error.to_string())?;
                let mut latencies = Histogram::<u64>::new(3).map_err(|error| error.to_string())?;
                let mut in_flight: VecDeque<(Instant, PendingAppend)> = VecDeque::new();
                let mut settle = |(sent, append): (Instant, PendingAppend)| {
                    append.wait().map_err(|error| error.to_string())?;
                    latencies
                        .record(sent.elapsed().as_micros() as u64)
                        .map_err(|error| error.to_string())
                };
                while Instant::now() < deadline {
                    if in_flight.len() >= window {
                        if let Some(oldest) = in_flight.pop_front() {
                            settle(oldest)?;
                        }
                    }
                    let append = log
                        .append(payload.clone(), 0)
                        .map_err(|error| error.to_string())?;
                    in_flight.push_back((Instant::now(), append));
                }
                for pending in in_flight {
                    settle(pending)?;
                }
                Ok(latencies)
            })
        })
        .collect();
    let started = Instant::now();
    let mut all = Histogram::<u64>::new(3)?;
    for thread in threads {
        let latencies = thread.join().map_err(|_| "a topic thread panicked")??;
        all.add(&latencies)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let count = all.len();
    println!(
        "{topics} topics x window {window}, 1 KiB entries, {seconds} s: {count} appends, \
         {:.0} entries/s, {:.1} MB/s; append-to-commit p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        count as f64 / elapsed,
        count as f64 * 1024.0 / elapsed / 1e6,
        all.value_at_quantile(0.5) as f64 / 1000.0,
        all.value_at_quantile(0.99) as f64 / 1000.0,
        all.max() as f64 / 1000.0,
    );
    engine.close();
    Ok(())
}
