//! A real `meridian standalone` process for the client's integration tests:
//! free loopback ports, a fresh data directory, readiness awaited through
//! `GET /admin/v2/brokers/health`, and the process stopped with SIGTERM (or
//! SIGKILL for crash tests) when the handle is dropped.
//!
//! The binary is `$MERIDIAN_BIN`, else `<workspace>/target/debug/meridian`.
//! Build it first: `cargo build -p meridian` (`cargo test --workspace` builds
//! it too, but does not promise to build it before these tests run).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the `meridian` binary is, or a panic that says how to build it.
pub fn meridian_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MERIDIAN_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "MERIDIAN_BIN={} does not name a file",
            path.display()
        );
        return path;
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut candidates = vec![manifest.join("../../target/debug/meridian")];
    // A custom target directory: the binary sits next to `deps/`, where
    // this test executable is.
    if let Some(profile_dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().and_then(Path::parent).map(Path::to_path_buf))
    {
        candidates.push(profile_dir.join("meridian"));
    }
    candidates
        .iter()
        .find(|candidate| candidate.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "the meridian binary was not found (looked at {candidates:?}). \
                 Build it first with `cargo build -p meridian`, or point MERIDIAN_BIN at it."
            )
        })
}

pub struct BrokerProcess {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub broker_port: u16,
    pub web_port: u16,
    log_path: PathBuf,
    config_path: Option<PathBuf>,
    _temporary: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("free port")
}

/// A plain HTTP GET on the broker's web port: the response, status line included.
fn http_get(web_port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", web_port)).ok()?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    Some(response)
}

fn healthy(web_port: u16) -> bool {
    http_get(web_port, "/admin/v2/brokers/health")
        .is_some_and(|response| response.starts_with("HTTP/1.1 200"))
}

impl BrokerProcess {
    /// Starts a broker with default settings.
    pub fn start() -> BrokerProcess {
        BrokerProcess::start_with_config("")
    }

    /// Starts a broker with this TOML configuration (empty: none).
    pub fn start_with_config(toml: &str) -> BrokerProcess {
        let temporary = tempfile::tempdir().expect("tempdir");
        let config_path = (!toml.is_empty()).then(|| {
            let path = temporary.path().join("meridian.toml");
            std::fs::write(&path, toml).expect("write config");
            path
        });
        let mut broker = BrokerProcess {
            child: None,
            data_dir: temporary.path().join("data"),
            broker_port: free_port(),
            web_port: free_port(),
            log_path: temporary.path().join("broker.log"),
            config_path,
            _temporary: temporary,
        };
        broker.launch();
        broker
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("log file");
        let mut command = Command::new(meridian_binary());
        command
            .arg("standalone")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--broker-port")
            .arg(self.broker_port.to_string())
            .arg("--web-port")
            .arg(self.web_port.to_string())
            .arg("--bind-address")
            .arg("127.0.0.1");
        if let Some(config) = &self.config_path {
            command.arg("--config").arg(config);
        }
        // The broker reads MERIDIAN_* variables as configuration and refuses
        // unknown keys, so MERIDIAN_BIN must not reach it.
        for (name, _) in std::env::vars() {
            if name.starts_with("MERIDIAN_") {
                command.env_remove(name);
            }
        }
        let child = command
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::from(log.try_clone().expect("log file")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start meridian");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !healthy(self.web_port) {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
            {
                panic!("meridian exited with {status}; log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "meridian did not become healthy within 30 s; log:\n{}",
                self.log()
            );
            // Polling the health endpoint: the condition, not the pause, is
            // what the loop waits for.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The body of an admin API GET, if it answered 200.
    pub fn admin_get(&self, path: &str) -> Option<String> {
        let response = http_get(self.web_port, path)?;
        if !response.starts_with("HTTP/1.1 200") {
            return None;
        }
        response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
    }

    pub fn url(&self) -> String {
        format!("pulsar://127.0.0.1:{}", self.broker_port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Stops the broker with SIGTERM (by pid) and waits for it to exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("meridian did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the broker with SIGKILL: a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same ports and data directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the broker first");
        self.launch();
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `condition` holds, checking every 10 ms, for at most `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A topic name no other test uses.
pub fn unique_topic(prefix: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "persistent://public/default/{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
