//! `meridian client produce|consume` against a real broker.

mod common;

use std::process::Command;

use common::{Admin, BrokerProcess};

fn client(broker: &BrokerProcess, arguments: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .arg("client")
        .arg("--url")
        .arg(broker.url())
        .args(arguments)
        .env("NO_COLOR", "1")
        .output()
        .expect("run meridian client");
    assert!(
        output.status.success(),
        "meridian client {arguments:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn produce_then_consume_from_the_command_line() {
    let broker = BrokerProcess::start(&[]);
    // Create the subscription first so the messages are kept for it.
    let admin = Admin::new(&broker);
    admin.ok(admin.put(
        "/admin/v2/persistent/public/default/cli-topic/subscription/cli",
        None,
    ));
    let ids = client(
        &broker,
        &[
            "produce",
            "cli-topic",
            "-m",
            "hello",
            "-m",
            "world",
            "-n",
            "2",
            "-k",
            "k1",
            "-p",
            "a=1",
        ],
    );
    assert_eq!(ids.lines().count(), 4, "{ids}");
    let consumed = client(
        &broker,
        &[
            "consume",
            "cli-topic",
            "-s",
            "cli",
            "-p",
            "earliest",
            "-n",
            "4",
            "--timeout-seconds",
            "20",
        ],
    );
    let contents: Vec<&str> = consumed
        .lines()
        .filter_map(|line| line.split_once("content:").map(|(_, content)| content))
        .collect();
    assert_eq!(
        contents,
        vec!["hello", "world", "hello", "world"],
        "{consumed}"
    );
    assert!(
        consumed.contains("key:[k1]") && consumed.contains("properties:[a=1]"),
        "{consumed}"
    );
    broker.assert_no_errors();
}
