//! `meridian lookup`: the lookup front door (`meridian-lookup`) with its flags.

use std::time::Duration;

use anyhow::{bail, Context};
use meridian_lookup::LookupConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct LookupArgs {
    /// Web (admin) URLs of the clusters served, comma-separated, e.g.
    /// `http://east:8080,http://west:8080` (`https://` for clusters reached over TLS, see
    /// `--tls-trust-cert-path`). Each one's name and broker URLs are read from it.
    /// Their order breaks ties: a tenant on several clusters with no migration record is sent
    /// to the first.
    #[arg(long, value_delimiter = ',', required = true)]
    clusters: Vec<String>,
    /// Address of the Pulsar binary protocol (clients' `pulsar://` service URL).
    #[arg(long, default_value = "127.0.0.1:6660")]
    listen: String,
    /// Address of HTTP lookup (clients' `http://` service URL).
    #[arg(long, default_value = "127.0.0.1:8090")]
    web_listen: String,
    /// Milliseconds a tenant's home is used before it is checked again.
    #[arg(long, default_value_t = 500)]
    home_fresh_ms: u64,
    /// Tenants whose home is cached at once (the least recently used go first).
    #[arg(long, default_value_t = 10_000)]
    max_cached_tenants: usize,
    /// Deadline in milliseconds of each call to a cluster (admin calls, forwarded lookups).
    #[arg(long, default_value_t = 5_000)]
    request_timeout_ms: u64,
    /// Binary connections served at once.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Connections served at once from one IP address (0: no limit).
    #[arg(long, default_value_t = 1_000)]
    max_connections_per_ip: usize,
    /// LOOKUP and PARTITIONED_METADATA requests of one connection answered at once.
    #[arg(long, default_value_t = 1_000)]
    max_pending_lookups_per_connection: usize,
    /// `--auth-token` / `--auth-token-file`: the token of a super-user role of the clusters,
    /// for the front door's admin calls and forwarded lookups (needed when they authenticate).
    #[command(flatten)]
    auth: crate::tokens_cli::AuthTokenArgs,
    /// `--tls-trust-cert-path`, ...: how clusters named by `https://` URLs are trusted (their
    /// admin API at `serviceUrlTls`, their brokers at `brokerServiceUrlTls`).
    #[command(flatten)]
    tls: crate::tls_cli::TlsArgs,
}

pub async fn run(arguments: LookupArgs) -> anyhow::Result<()> {
    let clusters: Vec<String> = arguments
        .clusters
        .iter()
        .map(|url| url.trim().trim_end_matches('/').to_string())
        .filter(|url| !url.is_empty())
        .collect();
    if clusters.is_empty() {
        bail!("--clusters names no cluster");
    }
    if let Some(url) = clusters
        .iter()
        .find(|url| !url.starts_with("http://") && !url.starts_with("https://"))
    {
        bail!("--clusters: {url:?} is not a web URL (http://host:port or https://host:port)");
    }
    if arguments.request_timeout_ms == 0 || arguments.max_pending_lookups_per_connection == 0 {
        bail!("--request-timeout-ms and --max-pending-lookups-per-connection must be positive");
    }
    let config = LookupConfig {
        clusters,
        home_fresh_for: Duration::from_millis(arguments.home_fresh_ms),
        max_cached_tenants: arguments.max_cached_tenants.max(1),
        request_timeout: Duration::from_millis(arguments.request_timeout_ms),
        max_connections: arguments.max_connections.max(1),
        max_connections_per_ip: arguments.max_connections_per_ip,
        max_pending_lookups_per_connection: arguments.max_pending_lookups_per_connection,
        auth_token: arguments.auth.token()?,
        tls: arguments.tls.options(),
        ..LookupConfig::default()
    };
    let binary = TcpListener::bind(&arguments.listen)
        .await
        .with_context(|| format!("listening on {}", arguments.listen))?;
    let web = TcpListener::bind(&arguments.web_listen)
        .await
        .with_context(|| format!("listening on {}", arguments.web_listen))?;
    tracing::info!(
        listen = %binary.local_addr()?,
        web_listen = %web.local_addr()?,
        clusters = %config.clusters.join(","),
        "meridian lookup is serving"
    );
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(meridian_lookup::serve(
        config,
        binary,
        web,
        shutdown.clone(),
    ));
    crate::wait_for_signal().await?;
    tracing::info!("shutting down: no new connections");
    shutdown.cancel();
    let _ = server.await;
    tracing::info!("meridian lookup stopped");
    Ok(())
}
