//! Measures fenced commits, metadata puts and lease renewals against a running etcd.
//!
//! `cargo run --release -p meridian-etcd --example commit_latency -- etcd://127.0.0.1:2379 2000`

use std::time::{Duration, Instant};

use meridian_etcd::{Acquire, ClientOptions, Cluster, Op, SessionOptions};
use meridian_metadata::{ExpectedVersion, MetadataStore};

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |quantile: f64| {
        let index = ((samples.len() as f64 * quantile) as usize).min(samples.len() - 1);
        samples[index].as_secs_f64() * 1000.0
    };
    println!(
        "{what}: n={} p50={:.2} ms p99={:.2} ms max={:.2} ms",
        samples.len(),
        at(0.50),
        at(0.99),
        at(1.0)
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut arguments = std::env::args().skip(1);
    let url = arguments
        .next()
        .unwrap_or_else(|| "etcd://127.0.0.1:2379".to_string());
    let count: usize = arguments.next().map_or(Ok(1000), |text| text.parse())?;
    let name = format!("bench-{}", std::process::id());
    let cluster = Cluster::connect(&url, &name, ClientOptions::default())?;
    let session = cluster.start_session("bench", b"bench", SessionOptions::default())?;
    let Acquire::Acquired(ownership) = session.try_acquire("bench/0")? else {
        return Err("the bundle is owned".into());
    };
    let value = vec![b'x'; 200];
    let mut samples = Vec::with_capacity(count);
    for entry in 0..count {
        let started = Instant::now();
        session.fenced_commit(
            &ownership,
            &[],
            &[
                Op::Put {
                    key: format!("logs/t/objects/{entry:020}"),
                    value: value.clone(),
                    lease: 0,
                },
                Op::Put {
                    key: "logs/t/head".to_string(),
                    value: value.clone(),
                    lease: 0,
                },
            ],
        )?;
        samples.push(started.elapsed());
    }
    report("fenced commit (2 puts of 200 B)", samples);

    let store = cluster.metadata_store()?;
    let mut version = store.put("/bench", &value, ExpectedVersion::Absent)?;
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        version = store.put("/bench", &value, ExpectedVersion::Exactly(version))?;
        samples.push(started.elapsed());
    }
    report("metadata put with expected version", samples);

    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        store.get("/bench")?;
        samples.push(started.elapsed());
    }
    report("metadata get", samples);
    session.close()?;
    Ok(())
}
