//! The client against pulsar-lite, a third-party Rust broker that speaks the
//! Pulsar protocol: evidence that the client works with brokers other than
//! Meridian.
//!
//! This test installs nothing. It runs only when `PULSAR_LITE_BIN` names the
//! broker binary, and returns early (with a note on stderr) otherwise. To
//! enable it:
//!
//! ```text
//! python3 -m venv /tmp/plvenv
//! /tmp/plvenv/bin/pip install pulsar-lite          # PyPI; the wheel carries the binary
//! export PULSAR_LITE_BIN=$(/tmp/plvenv/bin/python -c \
//!     'import os, pulsar_lite; print(os.path.join(os.path.dirname(pulsar_lite.__file__), "bin", "pulsar-lite"))')
//! cargo test -p meridian-client --test pulsar_lite
//! ```
//!
//! The test starts the broker itself, as
//! `pulsar-lite --config <tmp>/pulsar-lite.toml --addr 127.0.0.1:<free port> --db-path <tmp>/db`,
//! with `[metrics] enabled = false` in the config file (otherwise it also
//! listens on 0.0.0.0:8080 for Prometheus), waits until the port accepts
//! TCP connections (pulsar-lite has no health endpoint), and kills it by pid
//! when done.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meridian_client::{
    Client, Compression, InitialPosition, MessageId, ProducerMessage, SubscriptionType,
};

const PATIENCE: Duration = Duration::from_secs(20);

struct PulsarLite {
    child: Child,
    port: u16,
    log_path: PathBuf,
    _directory: tempfile::TempDir,
}

impl PulsarLite {
    /// Starts pulsar-lite if `PULSAR_LITE_BIN` is set.
    fn start() -> Option<PulsarLite> {
        let Some(binary) = std::env::var_os("PULSAR_LITE_BIN") else {
            eprintln!(
                "skipping: set PULSAR_LITE_BIN to the pulsar-lite binary to run this test \
                 (see the comment at the top of tests/pulsar_lite.rs for how to install it)"
            );
            return None;
        };
        let directory = tempfile::tempdir().expect("tempdir");
        let config = directory.path().join("pulsar-lite.toml");
        std::fs::write(&config, "[metrics]\nenabled = false\n").expect("config");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|address| address.port())
            .expect("free port");
        let log_path = directory.path().join("pulsar-lite.log");
        let log = std::fs::File::create(&log_path).expect("log");
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .arg("--addr")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--db-path")
            .arg(directory.path().join("db"))
            .current_dir(directory.path())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start pulsar-lite");
        let mut broker = PulsarLite {
            child,
            port,
            log_path,
            _directory: directory,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = broker.child.try_wait() {
                panic!("pulsar-lite exited with {status}; log:\n{}", broker.log());
            }
            assert!(
                Instant::now() < deadline,
                "pulsar-lite did not listen within 30 s; log:\n{}",
                broker.log()
            );
            // Polling the port: the condition is what the loop waits for.
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(broker)
    }

    fn url(&self) -> String {
        format!("pulsar://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for PulsarLite {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The first request to a freshly started pulsar-lite, retried until it is served: pulsar-lite
/// accepts connections a moment before it serves topics (it has no readiness endpoint), and
/// meanwhile resets them.
async fn once_ready<T, E, F, Fut>(broker: &PulsarLite, what: &str, mut request: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut attempts = 0;
    loop {
        attempts += 1;
        match request().await {
            Ok(value) => return value,
            Err(error) if attempts < 20 => {
                eprintln!("{what} attempt {attempts} failed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("{what}: {error}; log:\n{}", broker.log()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_and_consume_against_pulsar_lite() {
    let Some(broker) = PulsarLite::start() else {
        return;
    };
    let client = Client::builder(broker.url())
        .operation_timeout(Duration::from_secs(10))
        .build()
        .await
        .expect("client");
    let topic = "persistent://public/default/meridian-client-compat";

    let consumer = once_ready(&broker, "subscribe", || {
        client
            .consumer(topic)
            .subscription("compat")
            .sub_type(SubscriptionType::Exclusive)
            .initial_position(InitialPosition::Earliest)
            .subscribe()
    })
    .await;

    // One producer without batching, one with batching and compression.
    let plain = client.producer(topic).create().await.expect("producer");
    let batched = client
        .producer(topic)
        .batching(5, 64 * 1024, Duration::from_millis(10))
        .compression(Compression::Lz4)
        .create()
        .await
        .expect("batching producer");
    let mut expected = Vec::new();
    for index in 0..5 {
        let payload = format!("plain {index}");
        plain
            .send_and_wait(ProducerMessage::new(payload.clone()).with_key("k"))
            .await
            .unwrap_or_else(|error| panic!("send: {error}; log:\n{}", broker.log()));
        expected.push(payload);
    }
    let mut receipts = Vec::new();
    for index in 0..10 {
        let payload = format!("batched {index}");
        receipts.push(batched.send(payload.clone()).await.expect("enqueue"));
        expected.push(payload);
    }
    for receipt in receipts {
        receipt
            .await
            .unwrap_or_else(|error| panic!("batched send: {error}; log:\n{}", broker.log()));
    }

    // pulsar-lite sometimes delivers an entry twice (at-least-once, which Pulsar allows): count
    // each message id once, in order of first delivery.
    let mut received = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut deliveries = 0;
    while received.len() < expected.len() {
        deliveries += 1;
        assert!(
            deliveries <= 3 * expected.len(),
            "endless redeliveries: {received:?}"
        );
        let message = tokio::time::timeout(PATIENCE, consumer.receive())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no message within {PATIENCE:?} after {received:?}; log:\n{}",
                    broker.log()
                )
            })
            .expect("receive");
        consumer.ack(&message).await.expect("ack");
        if seen.insert(message.id) {
            received.push(String::from_utf8_lossy(&message.payload).into_owned());
        }
    }
    assert_eq!(received, expected);

    // A reader from the earliest message sees the same stream.
    let reader = client
        .reader(topic)
        .start_message_id(MessageId::EARLIEST)
        .create()
        .await
        .expect("reader");
    let first = tokio::time::timeout(PATIENCE, reader.read_next())
        .await
        .expect("a message")
        .expect("read");
    assert_eq!(first.payload, "plain 0");
    let mut read_back = 1;
    while reader
        .has_message_available()
        .await
        .expect("has_message_available")
    {
        tokio::time::timeout(PATIENCE, reader.read_next())
            .await
            .expect("a message")
            .expect("read");
        read_back += 1;
    }
    assert_eq!(read_back, expected.len());

    plain.close().await.expect("close");
    batched.close().await.expect("close");
    consumer.close().await.expect("close");
    reader.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_and_negative_acks_against_pulsar_lite() {
    let Some(broker) = PulsarLite::start() else {
        return;
    };
    let client = Client::builder(broker.url())
        .operation_timeout(Duration::from_secs(10))
        .build()
        .await
        .expect("client");
    let topic = "persistent://public/default/meridian-client-compat-readers";
    let producer = once_ready(&broker, "producer", || client.producer(topic).create()).await;
    let mut ids = Vec::new();
    for index in 0..6 {
        ids.push(
            producer
                .send_and_wait(format!("m{index}"))
                .await
                .unwrap_or_else(|error| panic!("send: {error}; log:\n{}", broker.log())),
        );
    }
    for (inclusive, expected) in [(true, "m2"), (false, "m3")] {
        let reader = client
            .reader(topic)
            .start_message_id(ids[2])
            .start_message_id_inclusive(inclusive)
            .create()
            .await
            .expect("reader");
        let message = tokio::time::timeout(PATIENCE, reader.read_next())
            .await
            .unwrap_or_else(|_| panic!("no message; log:\n{}", broker.log()))
            .expect("read");
        assert_eq!(message.payload, expected, "inclusive={inclusive}");
        reader.close().await.expect("close");
    }

    let consumer = client
        .consumer(topic)
        .subscription("nack")
        .sub_type(SubscriptionType::Shared)
        .initial_position(InitialPosition::Earliest)
        .negative_ack_redelivery_delay(Duration::from_millis(100))
        .subscribe()
        .await
        .expect("subscribe");
    let first = tokio::time::timeout(PATIENCE, consumer.receive())
        .await
        .expect("a message")
        .expect("receive");
    consumer.negative_ack(&first).await.expect("nack");
    // Receive until the negatively acknowledged message comes back.
    let again = tokio::time::timeout(PATIENCE, async {
        loop {
            let message = consumer.receive().await.expect("receive");
            if message.id == first.id {
                return message;
            }
            consumer.ack(&message).await.expect("ack");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no redelivery; log:\n{}", broker.log()));
    assert_eq!(again.payload, first.payload);
    assert!(
        again.redelivery_count >= 1,
        "redelivery_count {}",
        again.redelivery_count
    );
}
