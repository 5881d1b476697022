//! `meridian perf` against a real broker: the counts and the shape of the JSON summary.
//!
//! These tests check that the tool counts and reports correctly, never how fast anything is
//! (speed belongs in docs/BENCHMARKS.md): the only number with a range is the message count
//! of a paced run, and that range is wide enough to hold on any machine.

mod common;

use std::process::{Command, Output};

use common::{Admin, BrokerProcess};
use serde_json::Value;

/// Runs `meridian perf <arguments> --url <broker> --admin-url <broker> --output json`.
fn perf(broker: &BrokerProcess, arguments: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meridian"))
        .arg("perf")
        .args(arguments)
        .arg("--url")
        .arg(broker.url())
        .arg("--admin-url")
        .arg(format!("http://127.0.0.1:{}", broker.web_port))
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run meridian perf")
}

/// Runs a JSON-output perf command that must succeed, and parses its stdout: exactly one
/// JSON object, nothing else.
fn perf_json(broker: &BrokerProcess, arguments: &[&str]) -> Value {
    let output = perf(broker, &[arguments, &["--output", "json"]].concat());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "meridian perf {arguments:?} failed: {}\nstdout: {stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout)
        .unwrap_or_else(|error| panic!("stdout is not one JSON object ({error}): {stdout}"))
}

fn count(summary: &Value, field: &str) -> u64 {
    summary[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not a count in {summary}"))
}

/// Checks a latency block: every percentile present, in order, and the sample count.
fn assert_latency(summary: &Value, field: &str, samples: u64) {
    let latency = &summary[field];
    let value = |name: &str| {
        latency[name]
            .as_f64()
            .unwrap_or_else(|| panic!("{field}.{name} missing in {summary}"))
    };
    assert_eq!(latency["samples"].as_u64(), Some(samples), "{field}");
    let (p50, p95, p99, p99_9, max) = (
        value("p50"),
        value("p95"),
        value("p99"),
        value("p99_9"),
        value("max"),
    );
    assert!(p50 >= 0.0, "{field}: {latency}");
    assert!(p50 <= p95 && p95 <= p99, "{field}: {latency}");
    assert!(p99 <= p99_9 && p99_9 <= max, "{field}: {latency}");
}

#[test]
fn end_to_end_receives_every_message_it_sent() {
    let broker = BrokerProcess::start(&[]);
    let summary = perf_json(
        &broker,
        &["end-to-end", "--messages", "2000", "--size", "100"],
    );
    assert_eq!(summary["mode"], "end-to-end");
    assert_eq!(count(&summary, "sent"), 2000);
    assert_eq!(count(&summary, "received"), 2000);
    assert_eq!(count(&summary, "send_errors"), 0);
    assert_eq!(count(&summary, "received_other"), 0);
    assert_eq!(summary["interrupted"], false);
    assert_eq!(summary["publish"]["messages"], 2000);
    assert_eq!(summary["publish"]["bytes"], 200_000);
    assert_eq!(summary["receive"]["messages"], 2000);
    assert_latency(&summary, "publish_latency_ms", 2000);
    assert_latency(&summary, "end_to_end_latency_ms", 2000);
    assert!(summary["broker_cpu"].is_null());
    broker.assert_no_errors();
}

#[test]
fn partitioned_topics_with_lz4_are_created_and_measured() {
    let broker = BrokerProcess::start(&[]);
    let summary = perf_json(
        &broker,
        &[
            "end-to-end",
            "--topic-prefix",
            "parted",
            "--partitions",
            "2",
            "--compression",
            "lz4",
            "--messages",
            "2000",
            "--size",
            "100",
        ],
    );
    assert_eq!(count(&summary, "sent"), 2000);
    assert_eq!(count(&summary, "received"), 2000);
    assert_latency(&summary, "publish_latency_ms", 2000);
    assert_latency(&summary, "end_to_end_latency_ms", 2000);
    assert_eq!(summary["config"]["compression"], "lz4");
    let admin = Admin::new(&broker);
    let partitions = admin.ok(admin.get("/admin/v2/persistent/public/default/parted-0/partitions"));
    assert_eq!(partitions["partitions"], 2);

    // A second run finds the topic as it wants it; another partition count is an error.
    let again = perf_json(
        &broker,
        &[
            "produce",
            "--topic-prefix",
            "parted",
            "--partitions",
            "2",
            "--messages",
            "10",
        ],
    );
    assert_eq!(count(&again, "sent"), 10);
    let refused = perf(
        &broker,
        &[
            "produce",
            "--topic-prefix",
            "parted",
            "--partitions",
            "3",
            "--messages",
            "10",
        ],
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("exists with 2 partitions"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    broker.assert_no_errors();
}

#[test]
fn produce_at_a_rate_sends_about_that_many() {
    let broker = BrokerProcess::start(&[]);
    let output = perf(
        &broker,
        &[
            "produce",
            "--topic-prefix",
            "paced",
            "--duration",
            "2",
            "--rate",
            "500",
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    // Text output: per-second lines and the summary table.
    assert!(stdout.contains("msg/s"), "{stdout}");
    assert!(stdout.contains("latency ms"), "{stdout}");
    assert!(stdout.contains("  publish "), "{stdout}");

    let summary = perf_json(
        &broker,
        &[
            "produce",
            "--topic-prefix",
            "paced",
            "--duration",
            "2",
            "--rate",
            "500",
        ],
    );
    // 2 s at 500 msg/s is 1000; the bounds only catch a pacer that does not pace or stalls.
    let sent = count(&summary, "sent");
    assert!((200..=2000).contains(&sent), "sent {sent}");
    assert_latency(&summary, "publish_latency_ms", sent);
    assert!(summary["received"].is_null());
    assert!(summary["end_to_end_latency_ms"].is_null());
}

#[test]
fn consume_reads_what_another_run_produced() {
    let broker = BrokerProcess::start(&[]);
    let produced = perf_json(
        &broker,
        &[
            "produce",
            "--topic-prefix",
            "handoff",
            "--messages",
            "300",
            "--size",
            "64",
        ],
    );
    assert_eq!(count(&produced, "sent"), 300);
    let consumed = perf_json(
        &broker,
        &[
            "consume",
            "--topic-prefix",
            "handoff",
            "--subscription-position",
            "earliest",
            "--messages",
            "300",
        ],
    );
    assert_eq!(count(&consumed, "received"), 300);
    assert_eq!(consumed["receive"]["bytes"], 300 * 64);
    assert_latency(&consumed, "end_to_end_latency_ms", 300);
    assert!(consumed["sent"].is_null());
    broker.assert_no_errors();
}

#[test]
fn the_broker_cpu_and_its_system_calls_are_reported_per_message() {
    let broker = BrokerProcess::start(&[]);
    let pid = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                String::from_utf8_lossy(&cmdline).contains(&broker.data_dir.display().to_string())
            })
        })
        .expect("the broker's pid");
    let summary = perf_json(
        &broker,
        &[
            "end-to-end",
            "--messages",
            "500",
            "--size",
            "100",
            "--broker-pid",
            &pid.to_string(),
        ],
    );
    let cpu = &summary["broker_cpu"];
    assert_eq!(cpu["pid"].as_u64(), Some(u64::from(pid)), "{summary}");
    assert!(
        cpu["seconds"]
            .as_f64()
            .is_some_and(|seconds| seconds >= 0.0),
        "{cpu}"
    );
    assert!(cpu["us_per_message"].as_f64().is_some(), "{cpu}");
    // Its threads' time on a CPU, in nanoseconds: never 0 for a broker that handled 500
    // messages (the ticks may be, over a window this short).
    assert!(
        cpu["running_us_per_message"]
            .as_f64()
            .is_some_and(|micros| micros > 0.0),
        "{cpu}"
    );
    // What the broker did for them: it wrote receipts and deliveries (writev), and slept
    // between frames.
    assert!(
        cpu["read_write_syscalls"]
            .as_u64()
            .is_some_and(|calls| calls > 0),
        "{cpu}"
    );
    assert!(
        cpu["voluntary_switches"]
            .as_u64()
            .is_some_and(|switches| switches > 0),
        "{cpu}"
    );
    assert!(
        cpu["per_message"]["read_write_syscalls"].as_f64().is_some(),
        "{cpu}"
    );
}

#[test]
fn bad_options_exit_non_zero_with_a_reason() {
    let broker = BrokerProcess::start(&[]);
    for (arguments, reason) in [
        (&["end-to-end", "--size", "8"][..], "--size"),
        (&["consume", "--consumers", "2"][..], "--subscription-type"),
        (
            &["produce", "--messages", "5", "--duration", "5"][..],
            "--duration",
        ),
        (
            &["produce", "--broker-pid", "4000000000"][..],
            "--broker-pid",
        ),
    ] {
        let output = perf(&broker, arguments);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{arguments:?} succeeded");
        assert!(stderr.contains(reason), "{arguments:?}: {stderr}");
    }
}
