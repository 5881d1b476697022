//! A connection's authentication (when `authentication_enabled`): the token in CONNECT, its
//! expiry on a long-lived connection, and AUTH_CHALLENGE / AUTH_RESPONSE refreshes, as Pulsar's
//! broker does them:
//!
//! - CONNECT must carry a valid token (`auth_method_name` "token"); otherwise the client gets
//!   ERROR(AuthenticationError) and the connection is closed.
//! - Every `authentication_refresh_check_seconds` an expired token is challenged: a client that
//!   announced `supports_auth_refresh` gets AUTH_CHALLENGE and must answer with a valid token of
//!   the same role before the next check; a client that cannot refresh, or does not, is
//!   disconnected (it reconnects with whatever token it has then).
//!
//! Every refusal is written to the audit log.

use meridian_auth::{AuditEvent, Outcome, Principal};
use meridian_wire::proto::{
    base_command::Type, AuthData, BaseCommand, CommandAuthChallenge, CommandConnect, ServerError,
};

use super::{command, Close, Connection, PROTOCOL_VERSION, SERVER_VERSION};

/// What the broker sends in AUTH_CHALLENGE to ask for fresh credentials (Pulsar's
/// `AuthData.REFRESH_AUTH_DATA`).
const REFRESH_AUTH_DATA: &[u8] = b"PulsarAuthRefresh";

/// The authentication state of one connection.
#[derive(Default)]
pub(super) struct AuthState {
    /// Who the connection speaks for (None without authentication).
    pub(super) principal: Option<Principal>,
    /// The client said it answers AUTH_CHALLENGE (`supports_auth_refresh`).
    refresh_supported: bool,
    /// An AUTH_CHALLENGE is unanswered.
    refresh_pending: bool,
}

impl Connection {
    /// The authenticated role, if any.
    pub(super) fn role(&self) -> Option<&str> {
        self.auth
            .principal
            .as_ref()
            .map(|principal| principal.role.as_str())
    }

    /// Writes an audit line for this connection.
    pub(super) fn audit(&self, action: &str, resource: &str, outcome: Outcome, reason: &str) {
        self.config.security.audit(AuditEvent {
            role: self.role(),
            address: &self.peer.to_string(),
            action,
            resource,
            outcome,
            reason: Some(reason),
        });
    }

    /// Refuses a connection's credentials: audit, ERROR(AuthenticationError), close.
    async fn refuse_credentials(&self, action: &str, reason: String) -> Close {
        tracing::debug!(peer = %self.peer, %reason, "authentication failed");
        self.audit(action, "", Outcome::Unauthenticated, &reason);
        self.error(
            u64::MAX,
            ServerError::AuthenticationError,
            format!("Unable to authenticate: {reason}"),
        )
        .await;
        Close(format!("authentication failed: {reason}"))
    }

    /// Checks CONNECT's credentials (nothing to check without authentication).
    pub(super) async fn authenticate_connect(
        &mut self,
        connect: &CommandConnect,
    ) -> Result<(), Close> {
        let security = self.config.security.clone();
        if !security.authentication_enabled() {
            return Ok(());
        }
        self.auth.refresh_supported = connect
            .feature_flags
            .as_ref()
            .is_some_and(|flags| flags.supports_auth_refresh());
        let method = connect.auth_method_name.as_deref().unwrap_or("none");
        if method != "token" {
            let reason = format!("authentication method '{method}' is not accepted; use a token");
            return Err(self.refuse_credentials("CONNECT", reason).await);
        }
        let token = String::from_utf8_lossy(connect.auth_data.as_deref().unwrap_or_default());
        match security.authenticate(&token) {
            Ok(principal) => {
                tracing::debug!(peer = %self.peer, role = %principal.role, "client authenticated");
                self.auth.principal = Some(principal);
                Ok(())
            }
            Err(error) => Err(self.refuse_credentials("CONNECT", error.to_string()).await),
        }
    }

    /// A command before CONNECT (the caller closes the connection).
    pub(super) fn audit_before_connect(&self, kind: Option<Type>) {
        if self.config.security.authentication_enabled() {
            let action = kind.map_or("UNKNOWN", |kind| kind.as_str_name());
            self.audit(
                action,
                "",
                Outcome::Unauthenticated,
                "command before CONNECT",
            );
        }
    }

    /// AUTH_RESPONSE: fresh credentials after AUTH_CHALLENGE. They must be valid and of the
    /// same role.
    pub(super) async fn handle_auth_response(&mut self, base: BaseCommand) -> Result<(), Close> {
        let security = self.config.security.clone();
        if !security.authentication_enabled() {
            return Ok(());
        }
        let token = base
            .auth_response
            .and_then(|response| response.response)
            .and_then(|data| data.auth_data)
            .map(|data| String::from_utf8_lossy(&data).into_owned())
            .unwrap_or_default();
        match security.authenticate(&token) {
            Ok(principal) if Some(principal.role.as_str()) == self.role() => {
                tracing::debug!(peer = %self.peer, role = %principal.role, "credentials refreshed");
                self.auth.principal = Some(principal);
                self.auth.refresh_pending = false;
                Ok(())
            }
            Ok(principal) => {
                let reason = format!(
                    "refreshed credentials are for role '{}', not '{}'",
                    principal.role,
                    self.role().unwrap_or_default()
                );
                Err(self.refuse_credentials("AUTH_RESPONSE", reason).await)
            }
            Err(error) => Err(self
                .refuse_credentials("AUTH_RESPONSE", error.to_string())
                .await),
        }
    }

    /// The periodic check: expired credentials are challenged once, then the connection closes.
    pub(super) async fn check_credentials(&mut self) -> Result<(), Close> {
        if !self.auth.principal.as_ref().is_some_and(Principal::expired) {
            return Ok(());
        }
        if self.auth.refresh_pending {
            let reason = "credentials expired and were not refreshed in time".to_string();
            return Err(self.refuse_credentials("AUTH_REFRESH", reason).await);
        }
        if !self.auth.refresh_supported {
            let reason = "credentials expired (the client cannot refresh them)".to_string();
            return Err(self.refuse_credentials("AUTH_REFRESH", reason).await);
        }
        self.auth.refresh_pending = true;
        self.send_command(BaseCommand {
            auth_challenge: Some(CommandAuthChallenge {
                server_version: Some(SERVER_VERSION.into()),
                challenge: Some(AuthData {
                    auth_method_name: Some("token".into()),
                    auth_data: Some(bytes::Bytes::from_static(REFRESH_AUTH_DATA)),
                }),
                protocol_version: Some(self.protocol_version.unwrap_or(PROTOCOL_VERSION)),
            }),
            ..command(Type::AuthChallenge)
        })
        .await;
        Ok(())
    }
}
