//! Token authentication with a key pair (the broker holds only the public key), end to end with
//! real processes: `meridian tokens` makes the keys and tokens, `meridian client` and
//! `meridian admin` authenticate with `--auth-token-file` / `--auth-token`, and without a token
//! (or with one signed by another key) both are refused and nothing is written.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn meridian(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(args)
        .env_remove("MERIDIAN_AUTH_TOKEN")
        .output()
        .expect("run meridian")
}

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "meridian failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("free port")
}

/// The broker process, stopped by its pid when dropped.
struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn key_pair(directory: &Path, name: &str, algorithm: &str) -> (String, String) {
    let private = directory.join(format!("{name}-private.key"));
    let public = directory.join(format!("{name}-public.key"));
    ok(meridian(&[
        "tokens",
        "create-key-pair",
        "--signature-algorithm",
        algorithm,
        "--output-private-key",
        private.to_str().expect("path"),
        "--output-public-key",
        public.to_str().expect("path"),
    ]));
    (
        format!("file://{}", private.display()),
        format!("file://{}", public.display()),
    )
}

#[test]
fn key_pair_tokens_authenticate_the_cli_and_others_are_refused() {
    let directory = tempfile::tempdir().expect("tempdir");
    let (private, public) = key_pair(directory.path(), "broker", "ES256");
    let (other_private, _) = key_pair(directory.path(), "other", "ES256");
    let token = ok(meridian(&[
        "tokens",
        "create",
        "--private-key",
        &private,
        "--subject",
        "app1",
        "--expiry-time",
        "1h",
    ]));
    let forged = ok(meridian(&[
        "tokens",
        "create",
        "--private-key",
        &other_private,
        "--subject",
        "app1",
    ]));
    ok(meridian(&[
        "tokens",
        "validate",
        "--public-key",
        &public,
        &token,
    ]));
    let token_file = directory.path().join("app1.token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token file");

    let config = directory.path().join("meridian.toml");
    std::fs::write(
        &config,
        format!("authentication_enabled = true\ntoken_public_key = \"{public}\"\n"),
    )
    .expect("config");
    let (broker_port, web_port) = (free_port(), free_port());
    let log = std::fs::File::create(directory.path().join("broker.log")).expect("log");
    let _broker = Broker(
        Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["standalone", "--config", config.to_str().expect("path")])
            .args([
                "--data-dir",
                directory.path().join("data").to_str().expect("path"),
            ])
            .args(["--broker-port", &broker_port.to_string()])
            .args(["--web-port", &web_port.to_string()])
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start meridian"),
    );
    let web = format!("http://127.0.0.1:{web_port}");
    let health = format!("{web}/admin/v2/brokers/health");
    let deadline = Instant::now() + Duration::from_secs(60);
    // Ready once the health check answers; without a token it is 401, with one 200.
    loop {
        match ureq::get(&health).call() {
            Err(ureq::Error::Status(401, response)) => {
                let body = response.into_string().expect("body");
                assert!(body.contains("\"reason\""), "{body}");
                break;
            }
            Ok(response) => panic!("health served without a token: {}", response.status()),
            _ => {}
        }
        assert!(Instant::now() < deadline, "broker not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = ureq::get(&health)
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .expect("health with a token")
        .status();
    assert_eq!(status, 200);

    let url = format!("pulsar://127.0.0.1:{broker_port}");
    let topic = "persistent://public/default/key-pair";
    let token_file = token_file.to_str().expect("path");
    ok(meridian(&[
        "client",
        "--url",
        &url,
        "--auth-token-file",
        token_file,
        "produce",
        topic,
        "-m",
        "hi",
    ]));
    for refused in [
        vec!["client", "--url", &url, "produce", "refused-a", "-m", "x"],
        vec![
            "client",
            "--url",
            &url,
            "--auth-token",
            &forged,
            "produce",
            "refused-b",
            "-m",
            "x",
        ],
    ] {
        let output = meridian(&refused);
        assert!(
            !output.status.success(),
            "produced without a valid token: {} {} {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(directory.path().join("broker.log")).unwrap_or_default()
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("uthentication"), "{stderr}");
    }
    let stats = ok(meridian(&[
        "admin",
        "--url",
        &web,
        "--auth-token",
        &token,
        "--output",
        "json",
        "topics",
        "stats",
        topic,
    ]));
    assert!(
        stats.contains("\"msgInCounter\": 1") || stats.contains("\"msgInCounter\":1"),
        "{stats}"
    );
    let listing = ok(meridian(&[
        "admin",
        "--url",
        &web,
        "--auth-token",
        &token,
        "topics",
        "list",
        "public/default",
    ]));
    assert!(!listing.contains("refused-"), "{listing}");
    let output = meridian(&["admin", "--url", &web, "tenants", "list"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("401"));
}
