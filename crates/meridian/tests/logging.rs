//! The broker's log: `--log-format json` writes one JSON object per line with the level, time,
//! target, message and the cluster/tenant/namespace/topic fields; plain text carries no colour
//! codes when stderr is not a terminal.

mod common;

use std::time::Duration;

use common::{eventually, Admin, BrokerProcess};

#[test]
fn json_log_lines_carry_level_time_message_and_topic_fields() {
    let broker = BrokerProcess::start_with_env(
        &["--log-format", "json"],
        &[("RUST_LOG", "info,meridian_broker=debug")],
    );
    let admin = Admin::new(&broker);
    let path = "/admin/v2/persistent/public/default/logged";
    admin.ok(admin.put(path, None));
    // Stats load the topic, which logs "topic loaded" with its name.
    admin.ok(admin.get(&format!("{path}/stats")));
    let topic = "persistent://public/default/logged";
    assert!(
        eventually(Duration::from_secs(30), || broker.log().contains(topic)),
        "no log line names the topic; log:\n{}",
        broker.log()
    );
    let log = broker.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("not a JSON line ({error}): {line}"))
        })
        .collect();
    for line in &lines {
        for key in ["time", "level", "target", "message"] {
            assert!(line.get(key).is_some(), "{key} missing in {line}");
        }
    }
    let loaded = lines
        .iter()
        .find(|line| line["topic"] == topic)
        .expect("a line with the topic field");
    assert_eq!(loaded["tenant"], "public");
    assert_eq!(loaded["namespace"], "public/default");
    assert_eq!(loaded["cluster"], "standalone");
    assert_eq!(loaded["level"], "DEBUG");
}

#[test]
fn text_log_has_no_colour_codes_without_a_terminal() {
    // NO_COLOR unset: only the missing terminal keeps colour codes out.
    let broker = BrokerProcess::start_with_env(&[], &[("NO_COLOR", "")]);
    let log = broker.log();
    assert!(log.contains(" INFO "), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
}

#[test]
fn completions_are_generated_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["completions", shell])
            .output()
            .expect("run meridian completions");
        assert!(output.status.success(), "{shell}: {output:?}");
        let script = String::from_utf8_lossy(&output.stdout);
        assert!(
            script.contains("standalone") && script.contains("leader-broker"),
            "{shell} completions lack the commands"
        );
    }
}
