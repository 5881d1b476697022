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

impl Broker {
    /// Starts `meridian standalone` in `home` (data and log there) with this config file and
    /// cluster name, on fresh ports; returns it and its (broker, web) ports.
    fn start(home: &Path, config: &Path, cluster: &str) -> (Broker, u16, u16) {
        let (broker_port, web_port) = (free_port(), free_port());
        let log = std::fs::File::create(home.join("broker.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["standalone", "--cluster-name", cluster])
            .args(["--config", config.to_str().expect("path")])
            .args(["--data-dir", home.join("data").to_str().expect("path")])
            .args(["--broker-port", &broker_port.to_string()])
            .args(["--web-port", &web_port.to_string()])
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start meridian");
        (Broker(child), broker_port, web_port)
    }
}

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
    let (_broker, broker_port, web_port) = Broker::start(directory.path(), &config, "standalone");
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

/// One secured cluster: its process, ports and directory.
struct SecuredCluster {
    name: &'static str,
    home: std::path::PathBuf,
    broker_port: u16,
    web_port: u16,
    _process: Broker,
}

impl SecuredCluster {
    fn start(name: &'static str, directory: &Path, secret: &Path, admin_token: &str) -> Self {
        let home = directory.join(name);
        std::fs::create_dir_all(&home).expect("dir");
        let config = home.join("meridian.toml");
        std::fs::write(
            &config,
            format!(
                "authentication_enabled = true\nauthorization_enabled = true\n\
                 super_user_roles = [\"admin\"]\nreplicator_roles = [\"replicator\"]\n\
                 token_secret_key = \"file://{}\"\naudit_log_file = \"{}\"\n",
                secret.display(),
                home.join("audit.log").display()
            ),
        )
        .expect("config");
        let (process, broker_port, web_port) = Broker::start(&home, &config, name);
        let cluster = SecuredCluster {
            name,
            home,
            broker_port,
            web_port,
            _process: process,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while cluster
            .call("GET", "/admin/v2/brokers/health", admin_token, None)
            .0
            != 200
        {
            assert!(Instant::now() < deadline, "{name} not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    fn call(&self, method: &str, path: &str, token: &str, body: Option<&str>) -> (u16, String) {
        let request = ureq::request(method, &format!("http://127.0.0.1:{}{path}", self.web_port))
            .set("Authorization", &format!("Bearer {token}"))
            .set("Content-Type", "application/json");
        let result = match body {
            Some(body) => request.send_string(body),
            None => request.call(),
        };
        match result {
            Ok(response) => (
                response.status(),
                response.into_string().unwrap_or_default(),
            ),
            Err(ureq::Error::Status(code, response)) => {
                (code, response.into_string().unwrap_or_default())
            }
            Err(_) => (0, String::new()),
        }
    }

    fn registration(&self, replicator_token: &str) -> String {
        serde_json::json!({
            "serviceUrl": format!("http://127.0.0.1:{}", self.web_port),
            "brokerServiceUrl": format!("pulsar://127.0.0.1:{}", self.broker_port),
            "authenticationPlugin": "org.apache.pulsar.client.impl.auth.AuthenticationToken",
            "authenticationParameters": format!("token:{replicator_token}"),
        })
        .to_string()
    }

    async fn client(&self, token: &str) -> meridian_client::Client {
        meridian_client::Client::builder(format!("pulsar://127.0.0.1:{}", self.broker_port))
            .operation_timeout(Duration::from_secs(10))
            .auth_token(token)
            .build()
            .await
            .expect("client")
    }
}

/// Two secured clusters east and west (one secret key; roles admin, a super-user, and
/// replicator), each registered on east with the replicator's token; tenant `t` with namespace
/// `t/ns` replicated between them, configured once on east.
struct SecuredPair {
    east: SecuredCluster,
    west: SecuredCluster,
    token: Box<dyn Fn(&str) -> String>,
    admin: String,
    _directory: tempfile::TempDir,
}

impl SecuredPair {
    async fn start() -> SecuredPair {
        let directory = tempfile::tempdir().expect("tempdir");
        let secret = directory.path().join("secret.key");
        ok(meridian(&[
            "tokens",
            "create-secret-key",
            "--output",
            secret.to_str().expect("path"),
        ]));
        let token = move |role: &str| {
            ok(meridian(&[
                "tokens",
                "create",
                "--secret-key",
                &format!("file://{}", secret.display()),
                "--subject",
                role,
            ]))
        };
        let (admin, replicator) = (token("admin"), token("replicator"));
        let secret = directory.path().join("secret.key");
        let east = SecuredCluster::start("east", directory.path(), &secret, &admin);
        let west = SecuredCluster::start("west", directory.path(), &secret, &admin);
        // Configure once, on east: the registrations carry the token each side replicates with.
        for cluster in [&east, &west] {
            let (status, body) = east.call(
                "PUT",
                &format!("/admin/v2/clusters/{}", cluster.name),
                &admin,
                Some(&cluster.registration(&replicator)),
            );
            assert!(status < 300 || status == 409, "{status} {body}");
        }
        let tenant = r#"{"adminRoles":[],"allowedClusters":["east","west"]}"#;
        assert!(
            east.call("PUT", "/admin/v2/tenants/t", &admin, Some(tenant))
                .0
                < 300
        );
        assert!(
            east.call("PUT", "/admin/v2/namespaces/t/ns", &admin, None)
                .0
                < 300
        );
        let clusters = r#"["east","west"]"#;
        let replication = "/admin/v2/namespaces/t/ns/replication";
        assert!(east.call("POST", replication, &admin, Some(clusters)).0 < 300);
        // The replicator role pushed the namespace to west (configure-once).
        let deadline = Instant::now() + Duration::from_secs(60);
        while west.call("GET", replication, &admin, None) != (200, clusters.to_string()) {
            assert!(
                Instant::now() < deadline,
                "the namespace never reached west"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        SecuredPair {
            east,
            west,
            token: Box::new(token),
            admin,
            _directory: directory,
        }
    }
}

/// Waits up to a minute for `condition`; false if it never held.
async fn within_a_minute(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_replicate_with_tokens_and_forged_replication_is_refused() {
    let pair = SecuredPair::start().await;
    let (east, west, admin, app) = (&pair.east, &pair.west, &pair.admin, (pair.token)("app"));
    let grant = r#"["produce","consume"]"#;
    let path = "/admin/v2/namespaces/t/ns/permissions/app";
    assert!(east.call("POST", path, admin, Some(grant)).0 < 300);
    assert!(west.call("POST", path, admin, Some(grant)).0 < 300);

    let topic = "persistent://t/ns/orders";
    let west_client = west.client(&app).await;
    let consumer = west_client
        .consumer(topic)
        .subscription("s")
        .initial_position(meridian_client::InitialPosition::Earliest)
        .subscribe()
        .await
        .expect("subscribe on west");
    let east_client = east.client(&app).await;
    let producer = east_client
        .producer(topic)
        .create()
        .await
        .expect("producer");
    producer
        .send_and_wait(meridian_client::ProducerMessage::new("replicated"))
        .await
        .expect("send on east");
    let message = tokio::time::timeout(Duration::from_secs(60), consumer.receive())
        .await
        .expect("replicated within a minute")
        .expect("receive");
    assert_eq!(&message.payload[..], b"replicated");

    // A role allowed to produce, but not to replicate, can neither pose as a replicator nor
    // send messages marked as replicated.
    let forged = west_client
        .producer(topic)
        .name("pulsar.repl.east")
        .create()
        .await;
    let error = forged
        .err()
        .expect("a replicator producer from a normal role");
    assert!(error.to_string().contains("may not replicate"), "{error}");
    let producer = west_client
        .producer(topic)
        .send_timeout(Duration::from_secs(3))
        .create()
        .await
        .expect("producer");
    let error = producer
        .send_and_wait(meridian_client::ProducerMessage::new("forged").with_replicated_from("east"))
        .await
        .expect_err("a replicated message from a normal role");
    // The client resends a refused message until its timeout; the audit log says why.
    let audit = std::fs::read_to_string(west.home.join("audit.log")).expect("audit log");
    assert!(
        audit
            .lines()
            .any(|line| line.contains("\"action\":\"SEND\"")
                && line.contains("\"role\":\"app\"")
                && line.contains("may not replicate")),
        "{error}; audit:\n{audit}"
    );
    // Configure-once pushes need a replicating role too.
    let (status, body) = ureq::request(
        "PUT",
        &format!(
            "http://127.0.0.1:{}/admin/v2/namespaces/t/forged",
            west.web_port
        ),
    )
    .set("Authorization", &format!("Bearer {app}"))
    .set("x-meridian-propagated-from", "east")
    .call()
    .map(|response| (response.status(), String::new()))
    .unwrap_or_else(|error| match error {
        ureq::Error::Status(code, response) => (code, response.into_string().unwrap_or_default()),
        other => (0, other.to_string()),
    });
    assert_eq!(status, 403, "{body}");
    let stats = west
        .call("GET", "/admin/v2/persistent/t/ns/orders/stats", admin, None)
        .1;
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats");
    assert_eq!(stats["msgInCounter"], 1, "{stats}");
}

/// Every call one secured cluster makes to another carries the token of the other's
/// registration: replicated-subscription state posts (acknowledgements on east reach west's
/// subscription) and a tenant migration from east to west (metadata copied, replicated, done,
/// cleaned up). Without the token both were refused with 401 and never got anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_subscriptions_and_migration_work_between_secured_clusters() {
    let pair = SecuredPair::start().await;
    let (east, west, admin) = (&pair.east, &pair.west, pair.admin.as_str());
    let stats = |cluster: &SecuredCluster, topic: &str| -> serde_json::Value {
        let (_, body) = cluster.call(
            "GET",
            &format!("/admin/v2/persistent/{topic}/stats"),
            admin,
            None,
        );
        serde_json::from_str(&body).unwrap_or_default()
    };

    // A replicated subscription: it exists on west, east's consumer acknowledges everything.
    let topic = "persistent://t/ns/synced";
    let subscribe = |client: meridian_client::Client| async move {
        client
            .consumer(topic)
            .subscription("rs")
            .initial_position(meridian_client::InitialPosition::Earliest)
            .replicate_subscription_state(true)
            .subscribe()
            .await
            .expect("subscribe")
    };
    subscribe(west.client(admin).await).await.close().await.ok();
    let east_client = east.client(admin).await;
    let consumer = subscribe(east_client.clone()).await;
    let producer = east_client
        .producer(topic)
        .create()
        .await
        .expect("producer");
    for index in 0..3 {
        producer
            .send_and_wait(meridian_client::ProducerMessage::new(format!("m{index}")))
            .await
            .expect("send on east");
    }
    for _ in 0..3 {
        let message = consumer.receive().await.expect("receive on east");
        consumer.ack(&message).await.expect("ack on east");
    }
    let synced = within_a_minute(|| {
        let stats = stats(west, "t/ns/synced");
        stats["msgInCounter"] == 3 && stats["subscriptions"]["rs"]["msgBacklog"] == 0
    })
    .await;
    assert!(
        synced,
        "east's acknowledgements never reached west: {}",
        stats(west, "t/ns/synced")
    );
    consumer.close().await.ok();
    producer.close().await.ok();
    east_client.close().await;

    // A tenant migration from east to west runs to the end and cleans up.
    let tenant = r#"{"adminRoles":[],"allowedClusters":["east"]}"#;
    assert!(
        east.call("PUT", "/admin/v2/tenants/m", admin, Some(tenant))
            .0
            < 300
    );
    assert!(east.call("PUT", "/admin/v2/namespaces/m/ns", admin, None).0 < 300);
    let client = east.client(admin).await;
    let producer = client
        .producer("persistent://m/ns/moved")
        .create()
        .await
        .expect("producer");
    producer
        .send_and_wait(meridian_client::ProducerMessage::new("moved"))
        .await
        .expect("send on east");
    producer.close().await.ok();
    client.close().await;
    let migration = "/admin/v2/tenants/m/migration";
    let (status, body) = east.call(
        "POST",
        migration,
        admin,
        Some(r#"{"targetCluster":"west"}"#),
    );
    assert!(status < 300, "{status} {body}");
    let done = within_a_minute(|| {
        east.call("GET", migration, admin, None)
            .1
            .contains(r#""phase":"done""#)
    })
    .await;
    assert!(
        done,
        "never done: {}",
        east.call("GET", migration, admin, None).1
    );
    assert_eq!(stats(west, "m/ns/moved")["msgInCounter"], 1);
    let (status, body) = east.call("POST", &format!("{migration}/cleanup"), admin, None);
    assert!(status < 300, "{status} {body}");
    assert_eq!(
        west.call("GET", "/admin/v2/namespaces/m/ns/replication", admin, None),
        (200, r#"["west"]"#.to_string())
    );

    // The lookup front door, with a token, finds the tenant's new home.
    let (listen, web_listen) = (free_port(), free_port());
    let east_url = format!("http://127.0.0.1:{}", east.web_port);
    let west_url = format!("http://127.0.0.1:{}", west.web_port);
    let _front_door = Broker(
        Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["lookup", "--clusters", &format!("{east_url},{west_url}")])
            .args(["--listen", &format!("127.0.0.1:{listen}")])
            .args(["--web-listen", &format!("127.0.0.1:{web_listen}")])
            .args(["--auth-token", admin])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start meridian lookup"),
    );
    let listening = within_a_minute(|| std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok());
    assert!(listening.await, "the front door never listened");
    let client = meridian_client::Client::builder(format!("pulsar://127.0.0.1:{listen}"))
        .operation_timeout(Duration::from_secs(30))
        .auth_token(admin)
        .build()
        .await
        .expect("client through the front door");
    let producer = client
        .producer("persistent://m/ns/moved")
        .create()
        .await
        .expect("producer through the front door");
    producer
        .send_and_wait(meridian_client::ProducerMessage::new("via the front door"))
        .await
        .expect("send through the front door");
    assert_eq!(stats(west, "m/ns/moved")["msgInCounter"], 2);
}

#[test]
fn plain_ports_can_be_turned_off() {
    let directory = tempfile::tempdir().expect("tempdir");
    let home = directory.path();
    let openssl = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(home)
            .output()
            .expect("openssl");
        assert!(status.status.success(), "{status:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-subj",
        "/CN=localhost",
    ]);
    let (broker_tls, web_tls) = (free_port(), free_port());
    let config = home.join("meridian.toml");
    std::fs::write(
        &config,
        format!(
            "plain_ports_enabled = false\nbroker_port_tls = {broker_tls}\nweb_port_tls = {web_tls}\n\
             tls_certificate_file_path = \"{}\"\ntls_key_file_path = \"{}\"\n",
            home.join("server.pem").display(),
            home.join("server.key").display()
        ),
    )
    .expect("config");
    let (broker, broker_port, web_port) = Broker::start(home, &config, "standalone");
    // The broker's own listening sockets: the plain ports it was given are free numbers that
    // another test's broker may take meanwhile, so a connection to them proves nothing.
    let deadline = Instant::now() + Duration::from_secs(60);
    let listening = loop {
        let listening = listening_ports(broker.0.id());
        if listening.contains(&broker_tls) && listening.contains(&web_tls) {
            break listening;
        }
        assert!(Instant::now() < deadline, "the TLS ports never opened");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !listening.contains(&broker_port),
        "the plain protocol port is open: {listening:?}"
    );
    assert!(
        !listening.contains(&web_port),
        "the plain web port is open: {listening:?}"
    );
}

/// The TCP ports process `pid` listens on: its sockets' inodes (`/proc/<pid>/fd`) among the
/// listening sockets of `/proc/net/tcp` and `tcp6`.
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the broker's file descriptors")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        // `sl local_address rem_address st ... inode`: the state 0A is LISTEN, the local
        // address ends in `:<port in hex>`, the inode is the tenth field.
        for fields in text
            .lines()
            .skip(1)
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
        {
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            if *state != "0A" || !inodes.contains(*inode) {
                continue;
            }
            if let Some(port) = local
                .rsplit_once(':')
                .and_then(|(_, port)| u16::from_str_radix(port, 16).ok())
            {
                ports.push(port);
            }
        }
    }
    ports
}
