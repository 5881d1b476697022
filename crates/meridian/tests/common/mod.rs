//! A real `meridian standalone` process for integration tests: free loopback ports, a fresh
//! data directory, readiness awaited through the health endpoint, and the process stopped
//! (SIGTERM, or SIGKILL for crash tests) when the handle is dropped.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct BrokerProcess {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub broker_port: u16,
    pub web_port: u16,
    log_path: PathBuf,
    extra_args: Vec<String>,
    environment: Vec<(String, String)>,
    _temporary: Option<tempfile::TempDir>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("free port")
}

fn healthy(web_port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", web_port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request =
        "GET /admin/v2/brokers/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200") && response.ends_with("ok")
}

impl BrokerProcess {
    /// Starts a broker on a fresh data directory.
    pub fn start(extra_args: &[&str]) -> BrokerProcess {
        BrokerProcess::start_with_env(extra_args, &[])
    }

    /// Starts a broker with extra `MERIDIAN_*` settings in its environment.
    pub fn start_with_env(extra_args: &[&str], environment: &[(&str, &str)]) -> BrokerProcess {
        let temporary = tempfile::tempdir().expect("tempdir");
        let mut broker = BrokerProcess {
            child: None,
            data_dir: temporary.path().join("data"),
            broker_port: free_port(),
            web_port: free_port(),
            log_path: temporary.path().join("broker.log"),
            extra_args: extra_args
                .iter()
                .map(|argument| argument.to_string())
                .collect(),
            environment: environment
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
            _temporary: Some(temporary),
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
        let child = Command::new(env!("CARGO_BIN_EXE_meridian"))
            .arg("standalone")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--broker-port")
            .arg(self.broker_port.to_string())
            .arg("--web-port")
            .arg(self.web_port.to_string())
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            // The test's own settings win over the defaults above.
            .envs(self.environment.iter().cloned())
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
                "meridian did not become healthy; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The running process's id.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|child| child.id())
            .expect("broker running")
    }

    pub fn url(&self) -> String {
        format!("pulsar://127.0.0.1:{}", self.broker_port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Stops the broker with SIGTERM and waits for it; returns its exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("meridian did not stop within 30 s after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the broker with SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same data directory and ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the broker first");
        self.launch();
    }

    /// Stops the broker, empties its data directory and starts it again on the same ports:
    /// a cluster rebuilt from scratch.
    pub fn rebuild(&mut self) {
        self.stop();
        std::fs::remove_dir_all(&self.data_dir).expect("remove the data directory");
        self.launch();
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Fails if the broker logged an ERROR line.
    pub fn assert_no_errors(&self) {
        let log = self.log();
        let errors: Vec<&str> = log
            .lines()
            .filter(|line| line.contains(" ERROR "))
            .collect();
        assert!(
            errors.is_empty(),
            "broker logged errors:\n{}",
            errors.join("\n")
        );
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}

/// A minimal HTTP client for the admin API.
pub struct Admin {
    base: String,
}

/// Status code and body (JSON when it parses, else a JSON string).
pub type Reply = (u16, serde_json::Value);

impl Admin {
    pub fn new(broker: &BrokerProcess) -> Admin {
        Admin {
            base: format!("http://127.0.0.1:{}", broker.web_port),
        }
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        let request = ureq::request(method, &format!("{}{}", self.base, path))
            .set("Content-Type", "application/json");
        let response = match body {
            Some(body) => request.send_string(body),
            None => request.call(),
        };
        let (status, text) = match response {
            Ok(response) => (
                response.status(),
                response.into_string().unwrap_or_default(),
            ),
            Err(ureq::Error::Status(status, response)) => {
                (status, response.into_string().unwrap_or_default())
            }
            Err(error) => panic!("{method} {path}: {error}"),
        };
        let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        (status, value)
    }

    pub fn get(&self, path: &str) -> Reply {
        self.call("GET", path, None)
    }

    pub fn put(&self, path: &str, body: Option<&str>) -> Reply {
        self.call("PUT", path, body)
    }

    pub fn post(&self, path: &str, body: &str) -> Reply {
        self.call("POST", path, Some(body))
    }

    pub fn delete(&self, path: &str) -> Reply {
        self.call("DELETE", path, None)
    }

    /// Asserts a 2xx status and returns the body.
    pub fn ok(&self, reply: Reply) -> serde_json::Value {
        assert!(
            (200..300).contains(&reply.0),
            "expected success, got {} {}",
            reply.0,
            reply.1
        );
        reply.1
    }
}

/// Asserts an error status with a JSON reason.
pub fn assert_error(reply: Reply, status: u16) {
    assert_eq!(reply.0, status, "unexpected reply {}", reply.1);
    assert!(
        reply
            .1
            .get("reason")
            .and_then(|reason| reason.as_str())
            .is_some_and(|reason| !reason.is_empty()),
        "error without a reason: {}",
        reply.1
    );
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    condition()
}
