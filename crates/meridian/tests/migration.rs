//! Tenant migration (`docs/migration.md`) through the admin API and `meridian admin tenants
//! migrate`, against real brokers: validation with clear reasons, the durable record, a target
//! that is down (the migration pauses, survives a restart of the source, and goes on when the
//! target is back), an abort that puts the source's settings back; then a migration held
//! before its redirect, released, run to the end, refused an abort, and cleaned up.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{assert_error, eventually, Admin, BrokerProcess};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn cli(broker: &BrokerProcess, arguments: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meridian"))
        .arg("admin")
        .arg("--url")
        .arg(format!("http://127.0.0.1:{}", broker.web_port))
        .args(arguments)
        .env("NO_COLOR", "1")
        .output()
        .expect("run meridian admin")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "meridian admin failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn status(admin: &Admin) -> Value {
    admin.ok(admin.get("/admin/v2/tenants/acme/migration"))
}

#[test]
fn migration_is_validated_durable_resumed_and_aborted() {
    let mut a = BrokerProcess::start(&["--cluster-name", "a"]);
    let mut b = BrokerProcess::start(&["--cluster-name", "b"]);
    let admin_a = Admin::new(&a);
    let admin_b = Admin::new(&b);
    admin_a.ok(admin_a.put(
        "/admin/v2/tenants/acme",
        Some(r#"{"adminRoles":[],"allowedClusters":["a"]}"#),
    ));
    admin_a.ok(admin_a.put("/admin/v2/namespaces/acme/orders", None));

    // Validation: each refusal says why, and nothing starts.
    let start = |tenant: &str, body: &str| {
        admin_a.post(&format!("/admin/v2/tenants/{tenant}/migration"), body)
    };
    assert_error(start("ghost", r#"{"targetCluster":"b"}"#), 404);
    assert_error(start("acme", r#"{"targetCluster":"b"}"#), 412); // b not registered yet
    assert_error(start("acme", r#"{}"#), 400);
    assert_error(start("acme", r#"{"targetCluster":"a"}"#), 400);
    assert_error(admin_a.get("/admin/v2/tenants/acme/migration"), 404);
    assert_error(admin_a.delete("/admin/v2/tenants/acme/migration"), 404);

    // The target is registered but down: the migration starts and pauses with the reason.
    b.stop();
    admin_a.ok(admin_a.put(
        "/admin/v2/clusters/b",
        Some(&format!(
            r#"{{"serviceUrl":"http://127.0.0.1:{}","brokerServiceUrl":"pulsar://127.0.0.1:{}"}}"#,
            b.web_port, b.broker_port
        )),
    ));
    let started = stdout(&cli(
        &a,
        &["tenants", "migrate", "acme", "--to", "b", "--hold"],
    ));
    assert!(
        started.contains("from a to b: copyingMetadata"),
        "{started}"
    );
    let again = cli(&a, &["tenants", "migrate", "acme", "--to", "b"]);
    assert!(!again.status.success());
    let reason = String::from_utf8_lossy(&again.stderr);
    assert!(
        reason.contains("409") && reason.contains("already migrating to cluster b"),
        "{reason}"
    );
    assert!(
        eventually(WAIT, || status(&admin_a)["paused"] == true),
        "never paused: {}",
        status(&admin_a)
    );
    let paused = status(&admin_a);
    assert_eq!(paused["phase"], "copyingMetadata");
    assert!(
        paused["pausedReason"]
            .as_str()
            .is_some_and(|reason| reason.contains("target unreachable")),
        "{paused}"
    );
    let shown = stdout(&cli(&a, &["tenants", "migrate", "acme", "--status"]));
    assert!(shown.contains("PAUSED: target unreachable"), "{shown}");
    assert!(shown.contains("subscriptionsSynced"), "{shown}");

    // The record survives a restart of the source, and the migration goes on once the target
    // is back: metadata copied there, replication set up here, caught up (no topics yet).
    a.stop();
    a.restart();
    assert_eq!(status(&admin_a)["targetCluster"], "b");
    b.restart();
    assert!(
        // No subscriptions: caught up, then synced at once.
        eventually(WAIT, || status(&admin_a)["phase"] == "subscriptionsSynced"),
        "never caught up and synced: {}",
        status(&admin_a)
    );
    let done = status(&admin_a);
    assert_eq!(done["paused"], false, "{done}");
    assert_eq!(done["progress"]["namespacesReplicating"], 1, "{done}");
    let on_b = admin_b.ok(admin_b.get("/admin/v2/namespaces/acme/orders/replication"));
    assert_eq!(on_b, serde_json::json!(["a", "b"]));
    let on_a = admin_a.ok(admin_a.get("/admin/v2/namespaces/acme/orders/replication"));
    assert_eq!(on_a, serde_json::json!(["a", "b"]));
    let shown = stdout(&cli(&a, &["tenants", "migrate", "acme", "--status"]));
    assert!(shown.contains("subscriptionsSynced"), "{shown}");
    assert!(!shown.contains("PAUSED"), "{shown}");
    assert!(shown.contains("held before the redirect"), "{shown}");

    // Abort puts the source's settings back and removes the record.
    stdout(&cli(&a, &["tenants", "migrate", "acme", "--abort"]));
    assert_error(admin_a.get("/admin/v2/tenants/acme/migration"), 404);
    let on_a = admin_a.ok(admin_a.get("/admin/v2/namespaces/acme/orders/replication"));
    assert_eq!(on_a, serde_json::json!(["a"]));
    let tenant = admin_a.ok(admin_a.get("/admin/v2/tenants/acme"));
    assert_eq!(tenant["allowedClusters"], serde_json::json!(["a"]));
    // What the migration created on the target is gone too.
    assert_error(admin_b.get("/admin/v2/namespaces/acme/orders"), 404);
    assert_error(admin_b.get("/admin/v2/tenants/acme"), 404);
    // A new migration may start after an abort; held, then released with --redirect, it
    // runs to the end (no clients to move), and --cleanup removes the tenant from a.
    let held = stdout(&cli(
        &a,
        &["tenants", "migrate", "acme", "--to", "b", "--hold"],
    ));
    assert!(held.contains("held before the redirect"), "{held}");
    assert!(
        eventually(WAIT, || status(&admin_a)["phase"] == "subscriptionsSynced"),
        "never synced: {}",
        status(&admin_a)
    );
    let early = cli(&a, &["tenants", "migrate", "acme", "--cleanup"]);
    let reason = String::from_utf8_lossy(&early.stderr);
    assert!(
        !early.status.success() && reason.contains("cleanup needs phase done"),
        "{reason}"
    );
    stdout(&cli(&a, &["tenants", "migrate", "acme", "--redirect"]));
    assert!(
        eventually(WAIT, || status(&admin_a)["phase"] == "done"),
        "never done: {}",
        status(&admin_a)
    );
    let shown = stdout(&cli(&a, &["tenants", "migrate", "acme", "--status"]));
    for line in ["producersRedirected", "consumersRedirected", "done"] {
        assert!(shown.contains(line), "{shown}");
    }
    // Refused once the producers moved.
    let refused = cli(&a, &["tenants", "migrate", "acme", "--abort"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("409"));
    stdout(&cli(&a, &["tenants", "migrate", "acme", "--cleanup"]));
    assert_error(admin_a.get("/admin/v2/tenants/acme/migration"), 404);
    assert_error(admin_a.get("/admin/v2/tenants/acme"), 404);
    assert_error(admin_a.get("/admin/v2/namespaces/acme/orders"), 404);
    let on_b = admin_b.ok(admin_b.get("/admin/v2/namespaces/acme/orders/replication"));
    assert_eq!(on_b, serde_json::json!(["b"]));
}
