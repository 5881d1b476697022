//! The `meridian` binary: command-line parsing, configuration, tracing, and wiring the crates
//! together.
//!
//! `meridian standalone` runs one broker with embedded storage (`<data-dir>/storage`) and
//! embedded metadata (`<data-dir>/metadata.redb`), serving the Pulsar protocol on the broker
//! port and HTTP on the web port, until SIGINT or SIGTERM.

mod admin_cli;
mod client_cli;
mod config;
mod logging;
mod lookup_cli;
mod perf;
mod tls_cli;
mod tokens_cli;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use meridian_broker::Broker;
use meridian_metadata::{EmbeddedStore, ExpectedVersion, MetadataError, MetadataStore};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "meridian",
    version,
    about = "A Pulsar-compatible message broker built for cross-cluster replication"
)]
struct Cli {
    /// Log lines on stderr: `text` (colour only at a terminal) or `json` (one object per line).
    /// Default: `log_format` of the configuration file (standalone), else `text`.
    #[arg(long, value_enum, global = true)]
    log_format: Option<logging::LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one broker with embedded storage and metadata.
    ///
    /// Example: meridian standalone --data-dir ./data --config meridian.toml
    Standalone(StandaloneArgs),
    /// Run one broker of a cluster (preview): metadata and bundle ownership on etcd, shared
    /// by every broker of the cluster; each broker keeps the topics it owns in its own local
    /// storage for now (docs/cluster.md, "Built: brokers on etcd").
    ///
    /// Example: meridian broker --cluster-name c1 --metadata-store etcd://127.0.0.1:2379
    Broker(BrokerArgs),
    /// Administer a broker through its REST API (pulsar-admin's nouns and verbs).
    Admin(admin_cli::AdminArgs),
    /// Produce or consume messages from the command line.
    Client(client_cli::ClientArgs),
    /// Measure throughput and latency, like pulsar-perf (produce, consume, end-to-end).
    Perf(perf::PerfArgs),
    /// Run a lookup front door: one service URL that sends each topic to its tenant's home
    /// cluster (docs/lookup.md).
    ///
    /// Example: meridian lookup --clusters http://127.0.0.1:8080,http://127.0.0.1:8081
    Lookup(lookup_cli::LookupArgs),
    /// Create keys and tokens for token authentication (as `pulsar tokens`).
    Tokens(tokens_cli::TokensArgs),
    /// Print a shell completion script.
    ///
    /// Example: meridian completions bash > /etc/bash_completion.d/meridian
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(clap::Args)]
struct StandaloneArgs {
    /// TOML configuration file (every key: docs/configuration.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory for all data (default ./data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Name of this cluster (default standalone).
    #[arg(long)]
    cluster_name: Option<String>,
    /// Port of the Pulsar binary protocol (default 6650).
    #[arg(long)]
    broker_port: Option<u16>,
    /// Port of the HTTP API (default 8080).
    #[arg(long)]
    web_port: Option<u16>,
    /// Address to listen on (default 127.0.0.1).
    #[arg(long)]
    bind_address: Option<String>,
    /// Host name that lookups return (default: the bind address).
    #[arg(long)]
    advertised_address: Option<String>,
}

#[derive(clap::Args)]
struct BrokerArgs {
    #[command(flatten)]
    common: StandaloneArgs,
    /// etcd endpoints of the cluster's metadata, `etcd://host:2379,host:2379`
    /// (`metadata_store_url`).
    #[arg(long)]
    metadata_store: Option<String>,
    /// TTL of this broker's etcd lease: how long after a crash its bundles move (default 10).
    #[arg(long)]
    etcd_lease_ttl_seconds: Option<u64>,
    /// Bundles per namespace (default 4, Pulsar's `defaultNumberOfNamespaceBundles`).
    #[arg(long)]
    default_number_of_namespace_bundles: Option<u32>,
    /// Store topics' entries on S3-compatible object storage, `s3://bucket/prefix`
    /// (`storage_url`; cursors go to etcd). Without it each broker keeps the topics it owns in
    /// its own local storage.
    #[arg(long)]
    storage: Option<String>,
    /// The S3 API's URL, `http://host:port` (`s3_endpoint`).
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// SigV4 signing region (`s3_region`, default us-east-1).
    #[arg(long)]
    s3_region: Option<String>,
    /// `true`: path-style URLs (SeaweedFS, MinIO, Garage; the default); `false`: virtual-hosted
    /// (AWS) (`s3_path_style`).
    #[arg(long)]
    s3_path_style: Option<bool>,
    /// A file holding `ACCESS_KEY_ID:SECRET_ACCESS_KEY` (`s3_access_key_file`); without it,
    /// `MERIDIAN_S3_ACCESS_KEY_ID` and `MERIDIAN_S3_SECRET_ACCESS_KEY`.
    #[arg(long)]
    s3_access_key_file: Option<PathBuf>,
}

/// Errors end the process with their reasons on one line (`Error: what: why`), without the
/// backtrace `RUST_BACKTRACE` would add to a returned error: they are for users, not for us.
/// One about a certificate says how to trust it.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            let text = format!("{error:#}");
            eprintln!("Error: {text}{}", tls_cli::hint(&text));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The broker's format may come from its configuration file, so it starts logging once
    // that is read; every other command logs as the flag says.
    if !matches!(cli.command, Command::Standalone(_) | Command::Broker(_)) {
        logging::init(cli.log_format.unwrap_or_default());
    }
    match cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "meridian", &mut std::io::stdout());
            Ok(())
        }
        Command::Admin(arguments) => admin_cli::run(arguments),
        Command::Tokens(arguments) => tokens_cli::run(arguments),
        Command::Client(arguments) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(client_cli::run(arguments)),
        Command::Perf(arguments) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("meridian-perf")
            .build()
            .context("starting the async runtime")?
            .block_on(perf::run(arguments)),
        Command::Lookup(arguments) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("meridian-lookup")
            .build()
            .context("starting the async runtime")?
            .block_on(lookup_cli::run(arguments)),
        Command::Standalone(arguments) => {
            let config = load_config(cli.log_format, arguments)?;
            runtime()?.block_on(standalone(config, false))
        }
        Command::Broker(arguments) => {
            let mut config = load_config(cli.log_format, arguments.common)?;
            if let Some(url) = arguments.metadata_store {
                config.metadata_store_url = Some(url);
            }
            if let Some(ttl) = arguments.etcd_lease_ttl_seconds {
                config.etcd_lease_ttl_seconds = ttl;
            }
            if let Some(bundles) = arguments.default_number_of_namespace_bundles {
                config.default_number_of_namespace_bundles = bundles;
            }
            if let Some(storage) = arguments.storage {
                config.storage_url = Some(storage);
            }
            if let Some(endpoint) = arguments.s3_endpoint {
                config.s3_endpoint = Some(endpoint);
            }
            if let Some(region) = arguments.s3_region {
                config.s3_region = region;
            }
            if let Some(path_style) = arguments.s3_path_style {
                config.s3_path_style = path_style;
            }
            if let Some(file) = arguments.s3_access_key_file {
                config.s3_access_key_file = Some(file);
            }
            config.validate()?;
            if config.metadata_store_url.is_none() {
                anyhow::bail!(
                    "meridian broker needs --metadata-store etcd://host:2379 \
                     (or metadata_store_url in the configuration)"
                );
            }
            runtime()?.block_on(standalone(config, true))
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("meridian")
        .build()
        .context("starting the async runtime")
}

/// The configuration of a broker: file, environment, then the flags; starts logging.
fn load_config(
    log_format: Option<logging::LogFormat>,
    arguments: StandaloneArgs,
) -> anyhow::Result<Config> {
    let loaded = Config::load(arguments.config.as_deref(), std::env::vars());
    let format = log_format
        .or_else(|| loaded.as_ref().ok().map(|config| config.log_format))
        .unwrap_or_default();
    logging::init(format);
    let mut config = loaded?;
    if let Some(data_dir) = arguments.data_dir {
        config.data_dir = data_dir;
    }
    if let Some(cluster_name) = arguments.cluster_name {
        config.cluster_name = cluster_name;
    }
    if let Some(port) = arguments.broker_port {
        config.broker_port = port;
    }
    if let Some(port) = arguments.web_port {
        config.web_port = port;
    }
    if let Some(address) = arguments.bind_address {
        config.bind_address = address;
    }
    if let Some(address) = arguments.advertised_address {
        config.advertised_address = Some(address);
    }
    config.validate()?;
    logging::set_cluster(&config.cluster_name);
    Ok(config)
}

/// Creates the records Pulsar standalone creates on first start: the cluster, tenant `public`
/// and namespace `public/default`.
fn initialize_metadata(metadata: &dyn MetadataStore, config: &Config) -> anyhow::Result<()> {
    let broker = config.broker_config();
    let mut cluster = serde_json::json!({
        "serviceUrl": broker.web_service_url,
        "brokerServiceUrl": broker.broker_service_url,
    });
    // The TLS URLs too, as Pulsar standalone registers them: peers with
    // brokerClientTlsEnabled (and lookups through the front door) use them.
    if let Some(url) = &broker.broker_service_url_tls {
        cluster["brokerServiceUrlTls"] = url.clone().into();
    }
    if let Some(port) = config.web_port_tls {
        cluster["serviceUrlTls"] = format!("https://{}:{port}", config.advertised_address()).into();
    }
    let records = [
        (format!("/clusters/{}", config.cluster_name), cluster),
        (
            "/tenants/public".to_string(),
            serde_json::json!({ "adminRoles": [], "allowedClusters": [config.cluster_name] }),
        ),
        (
            "/namespaces/public/default".to_string(),
            serde_json::json!({}),
        ),
    ];
    for (key, value) in records {
        if metadata.get(&key)?.is_none() {
            match metadata.put(&key, value.to_string().as_bytes(), ExpectedVersion::Absent) {
                // Another broker of the cluster created it first (cluster mode).
                Ok(_) | Err(MetadataError::BadVersion { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
    }
    Ok(())
}

/// Runs a broker until SIGINT or SIGTERM: `meridian standalone`, or with `cluster` a
/// `meridian broker` of a cluster on etcd (`metadata_store_url`).
async fn standalone(config: Config, cluster: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    // Every topic holds a file descriptor for its active segment; use the hard limit.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(error) => tracing::warn!(%error, "could not raise the open file limit"),
    }
    let security = Arc::new(
        meridian_auth::Security::new(config.security_config()).context("configuring security")?,
    );
    warn_if_exposed(&config);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let storage_root = config.data_dir.join("storage");
    let storage_config = config.storage_config();
    let storage = tokio::task::spawn_blocking(move || {
        meridian_storage::Storage::open(storage_root, storage_config)
    })
    .await?
    .context("opening storage")?;
    let etcd = match (cluster, &config.metadata_store_url) {
        (true, Some(url)) => Some(
            meridian_etcd::Cluster::connect(
                url,
                &config.cluster_name,
                meridian_etcd::ClientOptions::default(),
            )
            .context("metadata_store_url")?,
        ),
        _ => None,
    };
    let metadata: Arc<dyn MetadataStore> = match &etcd {
        Some(etcd) => {
            let etcd = etcd.clone();
            tokio::task::spawn_blocking(move || etcd.metadata_store())
                .await?
                .context("opening the metadata store on etcd")?
        }
        None => EmbeddedStore::open(&config.data_dir.join("metadata.redb"))
            .context("opening the metadata store")?,
    };
    {
        let (metadata, config) = (metadata.clone(), config.clone());
        tokio::task::spawn_blocking(move || initialize_metadata(metadata.as_ref(), &config))
            .await??;
    }
    let broker =
        Broker::new(config.broker_config(), storage, metadata).context("starting the broker")?;
    let membership = match etcd {
        Some(etcd) => Some(join_cluster(&broker, etcd, &config).await?),
        None => None,
    };

    let bind = |port: u16| {
        let address = format!("{}:{port}", config.bind_address);
        async move {
            TcpListener::bind(&address)
                .await
                .with_context(|| format!("listening on {address}"))
        }
    };
    let tls = match (&config.tls_certificate_file_path, &config.tls_key_file_path) {
        (Some(certificate), Some(key))
            if config.broker_port_tls.is_some() || config.web_port_tls.is_some() =>
        {
            Some(
                meridian_auth::tls::server_config(
                    certificate,
                    key,
                    config
                        .tls_trust_certs_file_path
                        .as_deref()
                        .filter(|_| config.tls_require_trusted_client_cert_on_connect),
                    &[b"http/1.1"],
                )
                .context("loading the TLS certificate")?,
            )
        }
        _ => None,
    };

    let shutdown = CancellationToken::new();
    let mut server_config = config.server_config();
    server_config.security = security.clone();
    meridian_admin::set_runtime_configuration(config.runtime_values());
    let mut protocol_servers = Vec::new();
    let mut web_servers = Vec::new();
    if config.plain_ports_enabled {
        let (protocol, web) = (
            bind(config.broker_port).await?,
            bind(config.web_port).await?,
        );
        protocol_servers.push(tokio::spawn(meridian_server::serve(
            protocol,
            broker.clone(),
            server_config.clone(),
            shutdown.clone(),
        )));
        web_servers.push(tokio::spawn(meridian_admin::serve(
            web,
            broker.clone(),
            config.http_limits(),
            security.clone(),
            shutdown.clone(),
        )));
    }
    if let (Some(port), Some(tls)) = (config.broker_port_tls, &tls) {
        protocol_servers.push(tokio::spawn(meridian_server::serve_tls(
            bind(port).await?,
            broker.clone(),
            server_config.clone(),
            tls.clone(),
            shutdown.clone(),
        )));
    }
    if let (Some(port), Some(tls)) = (config.web_port_tls, &tls) {
        web_servers.push(tokio::spawn(meridian_admin::serve_with_tls(
            bind(port).await?,
            broker.clone(),
            config.http_limits(),
            security.clone(),
            Some(tls.clone()),
            shutdown.clone(),
        )));
    }
    // Replicated topics with a backlog must not wait for a client to resume replicating.
    tokio::spawn({
        let broker = broker.clone();
        async move { broker.load_replicated_topics(None).await }
    });
    // A tenant migration under way when the broker stopped goes on from its record.
    meridian_broker::migration::resume_all(&broker);
    let background = tokio::spawn(background_loop(
        broker.clone(),
        Duration::from_secs(config.policy_check_interval_seconds),
        Duration::from_secs(config.stats_interval_seconds),
        shutdown.clone(),
    ));
    tracing::info!(
        cluster = %config.cluster_name,
        broker_service_url = %broker.config().broker_service_url,
        web_service_url = %broker.config().web_service_url,
        data_dir = %config.data_dir.display(),
        startup_ms = started.elapsed().as_millis() as u64,
        broker_id = membership.as_ref().map(|mode| mode.broker_id()),
        "meridian {} is serving",
        if cluster { "broker" } else { "standalone" }
    );

    wait_for_signal().await?;
    tracing::info!("shutting down: no new connections, closing clients, flushing");
    shutdown.cancel();
    for server in protocol_servers {
        let _ = server.await;
    }
    let _ = background.await;
    for web in web_servers {
        if let Ok(Err(error)) = web.await {
            tracing::warn!(%error, "HTTP server stopped with an error");
        }
    }
    broker.close().await;
    if let Some(mode) = membership {
        // Releases this broker's bundles at once rather than after the lease's TTL.
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(logs) = mode.logs() {
                logs.shutdown();
            }
            mode.leave()
        })
        .await;
    }
    tracing::info!(
        "meridian {} stopped",
        if cluster { "broker" } else { "standalone" }
    );
    Ok(())
}

/// Registers the broker in its cluster on etcd (id `advertised-address:web-port`, as Pulsar
/// names brokers) and puts it in cluster mode: bundle ownership, the lease watch, and policy
/// changes made through other brokers.
async fn join_cluster(
    broker: &Arc<Broker>,
    etcd: meridian_etcd::Cluster,
    config: &Config,
) -> anyhow::Result<Arc<meridian_broker::cluster::ClusterMode>> {
    use meridian_broker::cluster::{ClusterMode, Registration};
    let broker_config = broker.config();
    let registration = Registration {
        broker_service_url: broker_config.broker_service_url.clone(),
        broker_service_url_tls: broker_config.broker_service_url_tls.clone(),
        web_service_url: broker_config.web_service_url.clone(),
        web_service_url_tls: broker_config.web_service_url_tls.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        start_timestamp: meridian_broker::clock::now_ms(),
    };
    let broker_id = format!("{}:{}", config.advertised_address(), config.web_port);
    let ttl = Duration::from_secs(config.etcd_lease_ttl_seconds);
    let bundles = config.default_number_of_namespace_bundles;
    let logs = match (&config.storage_url, &config.s3_endpoint) {
        (Some(storage), Some(endpoint)) => {
            Some(object_store_logs(storage, endpoint, config, &broker_id)?)
        }
        _ => None,
    };
    let mode = tokio::task::spawn_blocking(move || {
        ClusterMode::join(etcd, &broker_id, &registration, ttl, bundles, logs)
    })
    .await?
    .context("registering the broker in etcd")?;
    broker.set_cluster(mode.clone());
    if mode.logs().is_some() {
        let storage = config.storage_config();
        tokio::spawn(meridian_broker::cluster::logs::watch_failures(
            broker.clone(),
            mode.clone(),
        ));
        tokio::spawn(meridian_broker::cluster::logs::persist_cursors(
            mode.clone(),
            storage.cursor_persist_interval,
            storage.cursor_max_persisted_ranges,
        ));
    }
    tokio::spawn(meridian_broker::cluster::watch_lease(
        broker.clone(),
        mode.clone(),
    ));
    tokio::spawn(meridian_broker::cluster::watch_policies(broker.clone()));
    tokio::spawn(meridian_broker::cluster::balance::run(
        broker.clone(),
        mode.clone(),
        config.balancer_config(),
    ));
    Ok(mode)
}

/// The object-store side of `meridian broker --storage s3://...`: the S3 client (the bucket
/// is created if missing) and the engine settings, started with each etcd session.
fn object_store_logs(
    storage: &str,
    endpoint: &str,
    config: &Config,
    broker_id: &str,
) -> anyhow::Result<Arc<meridian_broker::cluster::logs::ClusterLogs>> {
    use meridian_objstore::{Credentials, ObjectStore, S3Config};
    let credentials = Credentials::from_file_or_env(config.s3_access_key_file.as_deref())?;
    let s3 = S3Config::new(
        storage,
        endpoint,
        &config.s3_region,
        config.s3_path_style,
        credentials,
    )
    .context("storage_url / s3_* settings")?;
    let store = ObjectStore::new(&s3).context("storage_url / s3_* settings")?;
    if let Err(error) = store.create_bucket() {
        tracing::warn!(%error, "could not create the bucket (it may exist, owned by this account); going on");
    }
    // Object keys may not hold ':' in every store; the broker id is `host:port`.
    let engine_id = broker_id.replace([':', '/'], "_");
    let mut engine = meridian_objlog::ObjectLogConfig::new(&engine_id);
    engine.manifest_threshold = config.object_log_manifest_threshold;
    engine.orphan_grace = std::time::Duration::from_secs(config.object_log_orphan_grace_seconds);
    let logs = meridian_broker::cluster::logs::ClusterLogs::new(Arc::new(store), engine)
        .context("object-store log settings")?;
    Ok(Arc::new(logs))
}

/// A broker reachable from other hosts without authentication serves anyone who can reach it.
fn warn_if_exposed(config: &Config) {
    let loopback = config.bind_address == "localhost"
        || config
            .bind_address
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback());
    if !loopback && !config.authentication_enabled {
        tracing::warn!(
            bind_address = %config.bind_address,
            "listening on a non-loopback address without authentication: anyone who can reach \
             these ports can produce, consume and administer everything \
             (set authentication_enabled, see docs/security.md)"
        );
    }
}

/// Periodic broker work: policy enforcement (TTL, backlog quotas, retention) and stats rates.
async fn background_loop(
    broker: Arc<Broker>,
    policy_interval: Duration,
    stats_interval: Duration,
    shutdown: CancellationToken,
) {
    let mut policies = tokio::time::interval(policy_interval);
    let mut stats = tokio::time::interval(stats_interval);
    loop {
        tokio::select! {
            _ = policies.tick() => {
                let broker = broker.clone();
                if let Err(error) = tokio::task::spawn_blocking(move || broker.enforce_policies()).await {
                    tracing::error!(%error, "policy enforcement task failed");
                }
            }
            _ = stats.tick() => broker.sample_rates(),
            _ = shutdown.cancelled() => return,
        }
    }
}

pub(crate) async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    /// Every command and verb has a one-line help and an example in its long help, and the
    /// example parses.
    #[test]
    fn every_command_has_help_and_an_example() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in command.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(format!("{name}: no help"));
                }
                let has_subcommands = sub.get_subcommands().next().is_some();
                let long = sub
                    .get_long_about()
                    .map(|about| about.to_string())
                    .unwrap_or_default();
                match long.split_once("Example: ") {
                    // The example must parse: words up to a shell redirection.
                    Some((_, example)) => {
                        let words = example
                            .lines()
                            .next()
                            .unwrap_or_default()
                            .split_whitespace()
                            .take_while(|word| *word != ">");
                        if let Err(error) = super::Cli::try_parse_from(words) {
                            missing.push(format!("{name}: example does not parse: {error}"));
                        }
                    }
                    None if !has_subcommands => missing.push(format!("{name}: no example")),
                    None => {}
                }
                walk(sub, &name, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "meridian", &mut missing);
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }
}
