//! Measures the latency of writing and reading data objects on an S3-compatible store: PUTs of
//! one group commit's object, then reads of one topic's range (index, then range), as cluster
//! mode will do them. Prints p50/p99/max per object size.
//!
//! ```text
//! MERIDIAN_S3_ACCESS_KEY_ID=... MERIDIAN_S3_SECRET_ACCESS_KEY=... \
//!   cargo run --release -p meridian-objstore --example s3_latency -- \
//!   s3://bucket/prefix http://127.0.0.1:8333 [rounds]
//! ```
//!
//! The bucket must exist (it is created if the credentials may). Objects are written under
//! `<prefix>/latency/` and deleted at the end.

use std::time::{Duration, Instant};

use meridian_objstore::{
    Credentials, DataObjectBuilder, DataObjectLimits, DataObjectReader, NewEntry, ObjectStore,
    S3Config,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let [storage, endpoint, rest @ ..] = arguments.as_slice() else {
        return Err("usage: s3_latency s3://bucket/prefix http://endpoint [rounds]".into());
    };
    let rounds: usize = rest.first().map_or(Ok(200), |text| text.parse())?;
    let config = S3Config::new(
        storage,
        endpoint,
        "us-east-1",
        true,
        Credentials::from_env()?,
    )?;
    let store = ObjectStore::new(&config)?;
    store.create_bucket()?;

    // (topics, entries per topic, entry bytes): from a light commit to a full one (8 MiB).
    for (topics, entries, entry_bytes) in [
        (1, 1, 1024),
        (10, 10, 1024),
        (10, 100, 1024),
        (20, 50, 8192),
    ] {
        let payload = vec![0x5au8; entry_bytes];
        let batch: Vec<NewEntry<'_>> = (0..entries)
            .map(|i| NewEntry {
                publish_time_ms: i as u64,
                data: &payload,
            })
            .collect();
        let mut builder = DataObjectBuilder::new(DataObjectLimits::default())?;
        for topic in 0..topics {
            builder.add_topic(&format!("persistent://t/n/topic-{topic}"), 0, &batch)?;
        }
        let object = builder.finish()?;
        let mut puts = Vec::with_capacity(rounds);
        let mut reads = Vec::with_capacity(rounds);
        for round in 0..rounds {
            let key = format!("latency/{round:06}.seg");
            let started = Instant::now();
            store.put(&key, &object.bytes)?;
            puts.push(started.elapsed());
            let started = Instant::now();
            let reader = DataObjectReader::open(&store, &key)?;
            let topic = &object.index[round % object.index.len()].topic;
            let read = reader.read(topic)?.ok_or("topic missing")?;
            reads.push(started.elapsed());
            assert_eq!(read.len(), entries);
        }
        println!(
            "object {:>9} bytes ({topics} topics x {entries} entries x {entry_bytes} B): \
             PUT {}; open index + read one topic {}",
            object.bytes.len(),
            summary(&mut puts),
            summary(&mut reads)
        );
        for round in 0..rounds {
            store.delete(&format!("latency/{round:06}.seg"))?;
        }
    }
    Ok(())
}

fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |fraction: f64| {
        let index = ((samples.len() as f64 * fraction) as usize).min(samples.len() - 1);
        samples[index].as_secs_f64() * 1000.0
    };
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        at(0.50),
        at(0.99),
        at(1.0)
    )
}
