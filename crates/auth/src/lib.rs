//! Meridian's security, shared by the protocol server and the HTTP API: token authentication
//! ([`token`], keys in [`keys`]), authorization decisions ([`Security::is_super_user`] and
//! friends) and the audit log ([`audit`]).
//!
//! Everything is off by default ([`Security::disabled`]): then every connection and request is
//! served as before, with no role.

pub mod audit;
pub mod authz;
pub mod certificate;
pub mod keys;
pub mod tls;
pub mod token;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use audit::{AuditEvent, AuditLog, Outcome};
pub use authz::{AuthPolicies, TopicAction};
pub use token::{Principal, TokenVerifier};

/// Why a credential, a key or a request is refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The client's credentials are not valid (Pulsar's AuthenticationError, HTTP 401).
    #[error("authentication failed: {0}")]
    Rejected(String),
    /// A key could not be read, parsed or made.
    #[error("{0}")]
    Key(String),
    /// The audit log could not be opened.
    #[error("audit log: {0}")]
    Audit(String),
}

/// Security settings (Pulsar's names in `docs/configuration.md`).
#[derive(Debug, Clone)]
pub struct SecurityConfig {
    /// Clients must present a valid token (`authenticationEnabled`).
    pub authentication_enabled: bool,
    /// Roles are checked against permissions (`authorizationEnabled`).
    pub authorization_enabled: bool,
    /// Roles allowed everything (`superUserRoles`).
    pub super_user_roles: Vec<String>,
    /// Roles other clusters replicate with: besides super-users, only they may create
    /// replicator producers, send replicated messages and push configure-once metadata, and they
    /// may produce to, consume from and create any topic (Meridian's; Pulsar replicates with a
    /// super-user role).
    pub replicator_roles: Vec<String>,
    /// HMAC key of tokens (`tokenSecretKey`): `file:///path`, `data:;base64,...` or base64.
    pub token_secret_key: Option<String>,
    /// Public key of tokens (`tokenPublicKey`), the same forms; DER or PEM.
    pub token_public_key: Option<String>,
    /// Claim holding the role (`tokenAuthClaim`, default `sub`).
    pub token_auth_claim: String,
    /// Audience a token must name, if set (`tokenAudience`).
    pub token_audience: Option<String>,
    /// How often connections are checked for expired credentials
    /// (`authenticationRefreshCheckSeconds`).
    pub authentication_refresh_check: Duration,
    /// Append-only JSON-lines audit log; None: no audit log.
    pub audit_log_file: Option<PathBuf>,
    /// Binary-protocol connections one role may hold at once, over all listeners; a CONNECT
    /// beyond it is refused (0: no limit).
    pub max_connections_per_role: usize,
    /// A client may authenticate with its TLS client certificate, the subject's CN as its role
    /// (Pulsar's `AuthenticationProviderTls`; needs mutual TLS).
    pub tls_authentication_enabled: bool,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            authentication_enabled: false,
            authorization_enabled: false,
            super_user_roles: Vec::new(),
            replicator_roles: Vec::new(),
            token_secret_key: None,
            token_public_key: None,
            token_auth_claim: "sub".into(),
            token_audience: None,
            authentication_refresh_check: Duration::from_secs(60),
            audit_log_file: None,
            max_connections_per_role: 0,
            tls_authentication_enabled: false,
        }
    }
}

/// The security state of one broker.
pub struct Security {
    config: SecurityConfig,
    verifier: Option<TokenVerifier>,
    audit: Option<AuditLog>,
    /// Connections held per role (for `max_connections_per_role`).
    role_connections: Arc<Mutex<HashMap<String, usize>>>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field(
                "authentication_enabled",
                &self.config.authentication_enabled,
            )
            .field("authorization_enabled", &self.config.authorization_enabled)
            .finish()
    }
}

impl Default for Security {
    fn default() -> Self {
        Security::disabled()
    }
}

impl Security {
    /// No authentication, no authorization, no audit log: today's behaviour.
    pub fn disabled() -> Security {
        Security {
            config: SecurityConfig::default(),
            verifier: None,
            audit: None,
            role_connections: Arc::default(),
        }
    }

    /// Loads the keys and opens the audit log. Authentication needs exactly one token key.
    pub fn new(config: SecurityConfig) -> Result<Security, AuthError> {
        let key = match (&config.token_secret_key, &config.token_public_key) {
            (Some(_), Some(_)) => {
                return Err(AuthError::Key(
                    "set token_secret_key or token_public_key, not both".into(),
                ))
            }
            (Some(secret), None) => {
                Some(keys::secret_verifying_key(&keys::read_key_source(secret)?)?)
            }
            (None, Some(public)) => {
                Some(keys::public_verifying_key(&keys::read_key_source(public)?)?)
            }
            (None, None) => None,
        };
        if config.authentication_enabled && key.is_none() {
            return Err(AuthError::Key(
                "authentication_enabled needs token_secret_key or token_public_key".into(),
            ));
        }
        if config.authorization_enabled && !config.authentication_enabled {
            return Err(AuthError::Key(
                "authorization_enabled needs authentication_enabled (roles come from tokens)"
                    .into(),
            ));
        }
        let verifier = key.map(|key| {
            TokenVerifier::new(
                key,
                config.token_auth_claim.clone(),
                config.token_audience.clone(),
            )
        });
        let audit = match &config.audit_log_file {
            Some(path) => Some(AuditLog::open(path)?),
            None => None,
        };
        Ok(Security {
            config,
            verifier,
            audit,
            role_connections: Arc::default(),
        })
    }

    pub fn authentication_enabled(&self) -> bool {
        self.config.authentication_enabled
    }

    pub fn authorization_enabled(&self) -> bool {
        self.config.authorization_enabled
    }

    /// Whether CONNECT may authenticate with the TLS client certificate (method `tls`).
    pub fn tls_authentication_enabled(&self) -> bool {
        self.config.tls_authentication_enabled
    }

    pub fn refresh_check_interval(&self) -> Duration {
        self.config.authentication_refresh_check
    }

    /// The principal of a token (with or without `Bearer `), or why it is refused.
    pub fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        match &self.verifier {
            Some(verifier) => verifier.verify(token),
            None => Err(AuthError::Rejected("no token key is configured".into())),
        }
    }

    /// The role may do anything (`superUserRoles`); true for everyone without authorization.
    pub fn is_super_user(&self, role: Option<&str>) -> bool {
        if !self.config.authorization_enabled {
            return true;
        }
        role.is_some_and(|role| self.config.super_user_roles.iter().any(|r| r == role))
    }

    /// The role may replicate (super-users and `replicator_roles`); true for everyone without
    /// authorization.
    pub fn may_replicate(&self, role: Option<&str>) -> bool {
        self.is_super_user(role)
            || role.is_some_and(|role| self.config.replicator_roles.iter().any(|r| r == role))
    }

    /// Why `role` may not do `action` on `topic` (its base name), or None if it may. Always
    /// None without authorization.
    pub fn topic_denial(
        &self,
        role: Option<&str>,
        action: TopicAction,
        topic: &str,
        tenant_admins: &[String],
        grants: &AuthPolicies,
    ) -> Option<String> {
        if self.may_replicate(role) {
            return None;
        }
        match role {
            Some(role) => authz::topic_denial(role, action, topic, tenant_admins, grants),
            None => Some("no role: authenticate first".into()),
        }
    }

    /// True if `role` may administer a tenant with these admin roles (super-users may).
    pub fn is_tenant_admin(&self, role: Option<&str>, tenant_admins: &[String]) -> bool {
        self.is_super_user(role)
            || role.is_some_and(|role| tenant_admins.iter().any(|admin| admin == role))
    }

    /// Audits a TLS handshake that failed on the client's certificate (mutual TLS): an
    /// authentication failure like a refused token. Other handshake failures are not audited.
    pub fn audit_tls_failure(&self, peer: std::net::SocketAddr, error: &std::io::Error) {
        if let Some(reason) = tls::client_certificate_refusal(error) {
            self.audit(AuditEvent {
                role: None,
                address: &peer.to_string(),
                action: "TLS",
                resource: "",
                outcome: Outcome::Unauthenticated,
                reason: Some(&reason),
            });
        }
    }

    /// Writes one audit line (if an audit log is configured).
    pub fn audit(&self, event: AuditEvent<'_>) {
        if let Some(audit) = &self.audit {
            audit.write(&event);
        }
    }
}

/// The token in a cluster's `authenticationParameters`, as Pulsar's `AuthenticationToken` reads
/// them: `token:<jwt>`, `file:///path` (a file holding the token), `{"token":"<jwt>"}`, or the
/// bare token.
pub fn token_from_parameters(parameters: &str) -> Result<String, AuthError> {
    let parameters = parameters.trim();
    if let Some(token) = parameters.strip_prefix("token:") {
        return Ok(token.trim().to_string());
    }
    if let Some(path) = parameters.strip_prefix("file://") {
        return std::fs::read_to_string(path)
            .map(|text| text.trim().to_string())
            .map_err(|error| AuthError::Key(format!("reading the token file {path}: {error}")));
    }
    if parameters.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(parameters)
            .map_err(|error| AuthError::Key(format!("authentication parameters: {error}")))?;
        return value
            .get("token")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| AuthError::Key("authentication parameters have no \"token\"".into()));
    }
    Ok(parameters.to_string())
}

/// One connection of a role, counted against `max_connections_per_role` until dropped.
pub struct RoleConnection {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    role: String,
}

impl Drop for RoleConnection {
    fn drop(&mut self) {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = counts.get_mut(&self.role) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.role);
            }
        }
    }
}

impl Security {
    /// Counts a connection of `role`; `Err` with a reason when the role already holds
    /// `max_connections_per_role` (none is counted without a limit).
    pub fn claim_role_connection(&self, role: &str) -> Result<Option<RoleConnection>, String> {
        let limit = self.config.max_connections_per_role;
        if limit == 0 {
            return Ok(None);
        }
        let mut counts = self
            .role_connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = counts.entry(role.to_string()).or_default();
        if *count >= limit {
            return Err(format!(
                "role '{role}' already holds {limit} connections (max_connections_per_role)"
            ));
        }
        *count += 1;
        Ok(Some(RoleConnection {
            counts: self.role_connections.clone(),
            role: role.to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_parameters() {
        use super::token_from_parameters as parse;
        assert_eq!(parse("token:abc").expect("token"), "abc");
        assert_eq!(parse(r#"{"token":"abc"}"#).expect("json"), "abc");
        assert_eq!(parse("abc").expect("bare"), "abc");
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("t");
        std::fs::write(&path, "abc\n").expect("write");
        assert_eq!(
            parse(&format!("file://{}", path.display())).expect("file"),
            "abc"
        );
    }
}
