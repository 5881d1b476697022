//! The broker's log: `--log-format json` (or `log_format = "json"` in the configuration file)
//! writes one JSON object per line with the level, time, target, message and the
//! cluster/tenant/namespace/topic fields; plain text carries colour codes only when stderr is a
//! terminal and `NO_COLOR` does not ask for none.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, Admin, BrokerProcess};

#[test]
fn json_log_lines_carry_level_time_message_and_topic_fields() {
    let broker = BrokerProcess::start_with_env(
        &["--log-format", "json"],
        &[(
            "RUST_LOG",
            "info,meridian_broker=debug,meridian_storage=debug",
        )],
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
    let lines = json_lines(&broker);
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
    // The storage's own lines name the log (`log`): they carry the topic fields as well.
    let opened = lines
        .iter()
        .find(|line| line["log"] == topic && line["message"] == "log opened")
        .expect("the storage's line about opening the topic's log");
    assert_eq!(opened["topic"], topic, "{opened}");
    assert_eq!(opened["tenant"], "public", "{opened}");
    assert_eq!(opened["namespace"], "public/default", "{opened}");
}

/// A broker's log lines, each parsed as JSON.
fn json_lines(broker: &BrokerProcess) -> Vec<serde_json::Value> {
    broker
        .log()
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("not a JSON line ({error}): {line}"))
        })
        .collect()
}

#[test]
fn the_configuration_file_chooses_the_log_format_and_the_flag_overrides_it() {
    let directory = tempfile::tempdir().expect("tempdir");
    let config = directory.path().join("meridian.toml");
    std::fs::write(&config, "log_format = \"json\"\n").expect("write the configuration");
    let config = config.to_str().expect("UTF-8 path");

    let broker = BrokerProcess::start(&["--config", config]);
    let lines = json_lines(&broker);
    assert!(
        lines.iter().any(|line| line["level"] == "INFO"),
        "no INFO line:\n{}",
        broker.log()
    );
    let runtime =
        Admin::new(&broker).ok(Admin::new(&broker).get("/admin/v2/brokers/configuration/runtime"));
    assert_eq!(runtime["log_format"], "json");
    drop(broker);

    let broker = BrokerProcess::start(&["--config", config, "--log-format", "text"]);
    let log = broker.log();
    assert!(log.contains(" INFO "), "{log}");
    assert!(
        !log.trim_start().starts_with('{'),
        "JSON despite --log-format text:\n{log}"
    );
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

/// What a broker writes to its stderr when stderr is a terminal (a pseudo-terminal here), up to
/// its first INFO line.
fn log_at_a_terminal(no_color: &str) -> String {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    use std::os::unix::ffi::OsStrExt;

    let controller =
        openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("open a pseudo-terminal");
    grantpt(&controller).expect("grantpt");
    unlockpt(&controller).expect("unlockpt");
    let name = ptsname(&controller, Vec::new()).expect("ptsname");
    let terminal = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(std::ffi::OsStr::from_bytes(name.as_bytes()))
        .expect("open the terminal side");
    let data = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args([
            "standalone",
            "--broker-port",
            "0",
            "--web-port",
            "0",
            "--data-dir",
        ])
        .arg(data.path())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", no_color)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(terminal))
        .spawn()
        .expect("start meridian");
    let output = Arc::new(Mutex::new(Vec::new()));
    let reader = std::thread::spawn({
        let output = output.clone();
        let mut controller = std::fs::File::from(controller);
        move || {
            let mut buffer = [0u8; 4096];
            // Ends when the broker has exited and the terminal side is closed (EIO).
            while let Ok(read @ 1..) = controller.read(&mut buffer) {
                output
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .extend_from_slice(&buffer[..read]);
            }
        }
    });
    let text = || {
        String::from_utf8_lossy(
            &output
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
        .into_owned()
    };
    let logged = eventually(Duration::from_secs(30), || text().contains("INFO"));
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    assert!(logged, "no INFO line at the terminal: {:?}", text());
    text()
}

#[test]
fn text_log_is_coloured_at_a_terminal_unless_no_color_asks_for_none() {
    let coloured = log_at_a_terminal("");
    assert!(
        coloured.contains("\u{1b}["),
        "no colour codes: {coloured:?}"
    );
    let plain = log_at_a_terminal("1");
    assert!(
        !plain.contains('\u{1b}'),
        "colour codes despite NO_COLOR: {plain:?}"
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
