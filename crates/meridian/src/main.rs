//! The `meridian` binary: command-line parsing, tracing, and the subcommands.
//!
//! Today it offers `meridian standalone`, which opens the embedded storage under `--data-dir`
//! and keeps it open until interrupted; the Pulsar protocol listener is not built yet.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "meridian",
    version,
    about = "A Pulsar-compatible message broker built for cross-cluster replication"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one broker with embedded storage and metadata.
    Standalone {
        /// Directory for all data.
        #[arg(long, default_value = "./data", env = "MERIDIAN_DATA_DIR")]
        data_dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Standalone { data_dir } => {
            let storage_root = data_dir.join("storage");
            let storage = meridian_storage::Storage::open(
                &storage_root,
                meridian_storage::StorageConfig::default(),
            )
            .with_context(|| format!("opening storage in {}", storage_root.display()))?;
            let logs = storage.log_names().context("listing logs")?;
            tracing::info!(
                data_dir = %data_dir.display(),
                logs = logs.len(),
                "storage open; the Pulsar protocol listener is not implemented yet, so there is nothing to serve"
            );
            storage.close().context("closing storage")?;
            Ok(())
        }
    }
}
