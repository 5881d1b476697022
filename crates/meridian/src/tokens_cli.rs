//! `meridian tokens`: keys and tokens as `pulsar tokens` makes them (raw secret key bytes or
//! base64; DER key pairs, PKCS#8 private and X.509 public; compact JWTs with `sub` and `exp`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use clap::{Args, Subcommand, ValueEnum};
use meridian_auth::keys::{self, KeyKind};
use meridian_auth::token;

#[derive(Args)]
pub struct TokensArgs {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Clone, Copy, ValueEnum)]
enum KeyPairAlgorithm {
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "ES256")]
    Es256,
}

#[derive(Subcommand)]
enum Verb {
    /// Create a secret key for HS256 tokens (the broker's token_secret_key).
    ///
    /// Example: meridian tokens create-secret-key --output my-secret.key
    CreateSecretKey {
        /// Write the raw key to this file (mode 0600) instead of printing it.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Print or write the key in base64.
        #[arg(long, short)]
        base64: bool,
    },
    /// Create a key pair: the private key signs tokens, the public key (the broker's
    /// token_public_key) verifies them.
    ///
    /// Example: meridian tokens create-key-pair --output-private-key my-private.key --output-public-key my-public.key
    CreateKeyPair {
        #[arg(long, value_enum, default_value = "RS256")]
        signature_algorithm: KeyPairAlgorithm,
        /// File for the private key (PKCS#8 DER, mode 0600).
        #[arg(long)]
        output_private_key: PathBuf,
        /// File for the public key (X.509 SubjectPublicKeyInfo DER).
        #[arg(long)]
        output_public_key: PathBuf,
    },
    /// Create a token for a role, signed with a secret key or a private key.
    ///
    /// Example: meridian tokens create --secret-key file:///etc/meridian/my-secret.key --subject app1 --expiry-time 30d
    Create {
        /// Secret key: file:///path, data:;base64,..., or base64.
        #[arg(long, short = 's', conflicts_with = "private_key")]
        secret_key: Option<String>,
        /// Private key (PKCS#8, DER or PEM): file:///path, data:;base64,..., or base64.
        #[arg(long, short = 'p')]
        private_key: Option<String>,
        /// The role (the `sub` claim).
        #[arg(long)]
        subject: String,
        /// Lifetime: 30s, 10m, 2h, 7d, 1w, 1y (default: no expiry).
        #[arg(long, visible_alias = "expiry")]
        expiry_time: Option<String>,
    },
    /// Check a token against a key and print its role and expiry.
    ///
    /// Example: meridian tokens validate --secret-key file:///etc/meridian/my-secret.key eyJhbGciOiJIUzI1NiJ9.e30.x
    Validate {
        #[arg(long, short = 's', conflicts_with = "public_key")]
        secret_key: Option<String>,
        #[arg(long, short = 'p')]
        public_key: Option<String>,
        token: String,
    },
}

/// Writes a file readable by its owner only. An existing file is made so before the key is
/// written into it (`mode` applies only to a file the open creates).
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

pub fn run(arguments: TokensArgs) -> anyhow::Result<()> {
    match arguments.verb {
        Verb::CreateSecretKey { output, base64 } => {
            let key = keys::generate_secret_key()?;
            let bytes = if base64 {
                STANDARD.encode(&key).into_bytes()
            } else {
                key
            };
            match output {
                Some(path) => write_private(&path, &bytes)?,
                None if base64 => println!("{}", String::from_utf8_lossy(&bytes)),
                None => std::io::stdout().write_all(&bytes)?,
            }
        }
        Verb::CreateKeyPair {
            signature_algorithm,
            output_private_key,
            output_public_key,
        } => {
            let kind = match signature_algorithm {
                KeyPairAlgorithm::Rs256 => KeyKind::Rsa,
                KeyPairAlgorithm::Es256 => KeyKind::Ec,
            };
            let (private, public) = keys::generate_key_pair(kind)?;
            write_private(&output_private_key, &private)?;
            std::fs::write(&output_public_key, public)
                .with_context(|| format!("writing {}", output_public_key.display()))?;
        }
        Verb::Create {
            secret_key,
            private_key,
            subject,
            expiry_time,
        } => {
            let key = match (secret_key, private_key) {
                (Some(secret), None) => keys::secret_signing_key(&keys::read_key_source(&secret)?),
                (None, Some(private)) => {
                    keys::private_signing_key(&keys::read_key_source(&private)?)?
                }
                _ => bail!("give --secret-key or --private-key"),
            };
            let expiry = expiry_time
                .as_deref()
                .map(token::parse_expiry)
                .transpose()?;
            println!("{}", token::create_token(&key, &subject, expiry)?);
        }
        Verb::Validate {
            secret_key,
            public_key,
            token,
        } => {
            let key = match (secret_key, public_key) {
                (Some(secret), None) => {
                    keys::secret_verifying_key(&keys::read_key_source(&secret)?)?
                }
                (None, Some(public)) => {
                    keys::public_verifying_key(&keys::read_key_source(&public)?)?
                }
                _ => bail!("give --secret-key or --public-key"),
            };
            let principal = token::TokenVerifier::new(key, "sub".into(), None).verify(&token)?;
            match principal.expires_at {
                Some(exp) => println!("role: {} (expires at {exp})", principal.role),
                None => println!("role: {} (no expiry)", principal.role),
            }
        }
    }
    Ok(())
}

/// `--auth-token` / `--auth-token-file` of `meridian admin` and `meridian client`.
#[derive(Args, Clone)]
pub struct AuthTokenArgs {
    /// Token to authenticate with (as `pulsar-admin --auth-params token:...`).
    #[arg(
        long,
        global = true,
        env = "MERIDIAN_AUTH_TOKEN",
        hide_env_values = true,
        conflicts_with = "auth_token_file"
    )]
    auth_token: Option<String>,
    /// File holding the token to authenticate with.
    #[arg(long, global = true)]
    auth_token_file: Option<PathBuf>,
}

impl AuthTokenArgs {
    /// The token given, if any (a file's is read now, surrounding whitespace removed).
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        if let Some(path) = &self.auth_token_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the token file {}", path.display()))?;
            return Ok(Some(text.trim().to_string()));
        }
        Ok(self
            .auth_token
            .as_ref()
            .map(|token| token.trim().to_string()))
    }
}
