//! A connection's authentication (when `authentication_enabled`): the token in CONNECT, its
//! expiry on a long-lived connection, and AUTH_CHALLENGE / AUTH_RESPONSE refreshes, as Pulsar's
//! broker does them:
//!
//! - CONNECT must carry a valid token (`auth_method_name` "token"), or, with
//!   `tls_authentication_enabled`, method "tls" over a connection whose client certificate
//!   names the role (its CN); otherwise the client gets ERROR(AuthenticationError) and the
//!   connection is closed. A role over `max_connections_per_role` gets NotAllowedError.
//! - Every `authentication_refresh_check_seconds` an expired token is challenged: a client that
//!   announced `supports_auth_refresh` gets AUTH_CHALLENGE and must answer with a valid token of
//!   the same role before the next check; a client that cannot refresh, or does not, is
//!   disconnected (it reconnects with whatever token it has then).
//!
//! With `authorization_enabled`, each command that opens or reads a topic is checked against
//! the role's permissions ([`Connection::authorize`]: PRODUCER and GET_OR_CREATE_SCHEMA need
//! produce, SUBSCRIBE consume, LOOKUP, PARTITIONED_METADATA and GET_SCHEMA either,
//! GET_TOPICS_OF_NAMESPACE some grant in the namespace); commands on a producer or consumer
//! already open ride on the check made when it was opened. A permission revoked while connected
//! takes effect at once: a change of a tenant or of namespace or topic policies
//! (`Broker::authorization_changes`), and each periodic check, re-check every producer and
//! consumer; one that lost its permission is closed (CLOSE_PRODUCER / CLOSE_CONSUMER), and the
//! client's attempt to re-create it is refused with AuthorizationError.
//!
//! Replication is for super-users and `replicator_roles` only: a producer named with the
//! replicator prefix, or a SEND whose metadata carries `replicated_from` or is a marker, from
//! any other role is refused with AuthorizationError (nothing is stored).
//!
//! Every refusal is written to the audit log.

use meridian_auth::{AuditEvent, AuthPolicies, Outcome, Principal, TopicAction};
use meridian_broker::TopicName;
use meridian_wire::proto::{
    base_command::Type, command_lookup_topic_response, command_partitioned_topic_metadata_response,
    AuthData, BaseCommand, CommandAuthChallenge, CommandCloseConsumer, CommandCloseProducer,
    CommandConnect, CommandLookupTopicResponse, CommandPartitionedTopicMetadataResponse,
    CommandSend, MessageMetadata, ServerError,
};
use std::sync::atomic::Ordering;

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
    /// This connection counted against `max_connections_per_role`.
    _role_connection: Option<meridian_auth::RoleConnection>,
    /// The CN of the client certificate the TLS handshake verified (mutual TLS).
    certificate_role: Option<String>,
}

impl AuthState {
    pub(super) fn with_certificate_role(certificate_role: Option<String>) -> AuthState {
        AuthState {
            certificate_role,
            ..AuthState::default()
        }
    }
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
        let authenticated = match method {
            "token" => {
                let token =
                    String::from_utf8_lossy(connect.auth_data.as_deref().unwrap_or_default());
                security
                    .authenticate(&token)
                    .map_err(|error| error.to_string())
            }
            "tls" if security.tls_authentication_enabled() => {
                match self.auth.certificate_role.clone() {
                    Some(role) => Ok(Principal {
                        role,
                        expires_at: None,
                    }),
                    None => Err(
                        "no client certificate with a subject CN (method tls needs mutual TLS)"
                            .to_string(),
                    ),
                }
            }
            _ => {
                let accepted = if security.tls_authentication_enabled() {
                    "use a token or a client certificate (tls)"
                } else {
                    "use a token"
                };
                Err(format!(
                    "authentication method '{method}' is not accepted; {accepted}"
                ))
            }
        };
        match authenticated {
            Ok(principal) => {
                tracing::debug!(peer = %self.peer, role = %principal.role, "client authenticated");
                let role = principal.role.clone();
                self.auth.principal = Some(principal);
                match security.claim_role_connection(&role) {
                    Ok(slot) => {
                        self.auth._role_connection = slot;
                        Ok(())
                    }
                    Err(reason) => {
                        self.audit("CONNECT", "", Outcome::Denied, &reason);
                        self.error(u64::MAX, ServerError::NotAllowedError, reason.clone())
                            .await;
                        Err(Close(reason))
                    }
                }
            }
            Err(reason) => Err(self.refuse_credentials("CONNECT", reason).await),
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

    /// The tenant's admin roles and the namespace's grants.
    fn grants_of(&self, tenant: &str, namespace: &str) -> (Vec<String>, AuthPolicies) {
        let resources = self.broker.resources();
        let admins = resources
            .tenant(tenant)
            .map(|info| info.admin_roles)
            .unwrap_or_default();
        let grants = resources
            .policies(tenant, namespace)
            .map(|policies| AuthPolicies::from_policies(policies.other.get("auth_policies")))
            .unwrap_or_default();
        (admins, grants)
    }

    /// Why this connection's role may not do `action` on `topic`, or None if it may (always
    /// None without authorization; a malformed name is left to the command to report).
    fn topic_denial(&self, topic: &str, action: TopicAction) -> Option<String> {
        let security = &self.config.security;
        if security.is_super_user(self.role()) {
            return None;
        }
        let name = TopicName::parse(topic).ok()?;
        let (admins, grants) = self.grants_of(&name.tenant, &name.namespace);
        security.topic_denial(
            self.role(),
            action,
            &name.base().to_string(),
            &admins,
            &grants,
        )
    }

    /// Checks `command` on `topic`; a denial is audited and its reason returned (the caller
    /// answers AuthorizationError with it).
    pub(super) fn authorize(
        &self,
        command: &str,
        topic: &str,
        action: TopicAction,
    ) -> Result<(), String> {
        match self.topic_denial(topic, action) {
            None => Ok(()),
            Some(reason) => {
                self.audit(command, topic, Outcome::Denied, &reason);
                Err(reason)
            }
        }
    }

    /// Checks that this connection's role may replicate (create a replicator producer, send
    /// replicated messages); a denial is audited and its reason returned.
    pub(super) fn authorize_replication(&self, command: &str, topic: &str) -> Result<(), String> {
        if self.config.security.may_replicate(self.role()) {
            return Ok(());
        }
        let reason = format!(
            "role '{}' may not replicate (only super-users and replicator roles)",
            self.role().unwrap_or_default()
        );
        self.audit(command, topic, Outcome::Denied, &reason);
        Err(reason)
    }

    /// Checks a SEND only replication may make: one whose metadata carries `replicated_from`,
    /// or a marker (`marker_type`, or the command's `marker` flag; markers are written by
    /// brokers and never delivered, so a client's would vanish silently). Other SENDs pass.
    pub(super) fn authorize_replicated_send(
        &self,
        send: &CommandSend,
        metadata: &MessageMetadata,
        topic: &str,
    ) -> Result<(), String> {
        if metadata.replicated_from.is_none() && metadata.marker_type.is_none() && !send.marker() {
            return Ok(());
        }
        self.authorize_replication("SEND", topic)
    }

    /// Checks a namespace-wide read (the topic list): tenant admins and roles with any grant
    /// in the namespace may.
    pub(super) fn authorize_namespace(&self, command: &str, namespace: &str) -> Result<(), String> {
        let security = &self.config.security;
        if security.is_super_user(self.role()) {
            return Ok(());
        }
        let (tenant, local) = namespace.split_once('/').unwrap_or((namespace, ""));
        let (admins, grants) = self.grants_of(tenant, local);
        let role = self.role().unwrap_or_default();
        if security.is_tenant_admin(self.role(), &admins) || grants.has_any(role) {
            return Ok(());
        }
        let reason = format!("role '{role}' has no permission in namespace {namespace}");
        self.audit(command, namespace, Outcome::Denied, &reason);
        Err(reason)
    }

    /// Refuses a request with AuthorizationError.
    pub(super) async fn deny(&self, request_id: u64, reason: String) {
        self.error(request_id, ServerError::AuthorizationError, reason)
            .await;
    }

    pub(super) async fn deny_lookup(&self, request_id: u64, reason: String) {
        self.send_command(BaseCommand {
            lookup_response: Some(Box::new(CommandLookupTopicResponse {
                response: Some(command_lookup_topic_response::LookupType::Failed as i32),
                request_id,
                error: Some(ServerError::AuthorizationError as i32),
                message: Some(reason),
                ..Default::default()
            })),
            ..command(Type::LookupResponse)
        })
        .await;
    }

    pub(super) async fn deny_partitioned_metadata(&self, request_id: u64, reason: String) {
        self.send_command(BaseCommand {
            partitioned_metadata_response: Some(Box::new(
                CommandPartitionedTopicMetadataResponse {
                    request_id,
                    response: Some(
                        command_partitioned_topic_metadata_response::LookupType::Failed as i32,
                    ),
                    error: Some(ServerError::AuthorizationError as i32),
                    message: Some(reason),
                    ..Default::default()
                },
            )),
            ..command(Type::PartitionedMetadataResponse)
        })
        .await;
    }

    /// Closes the producers and consumers whose role lost its permission.
    pub(super) async fn enforce_revocations(&mut self) {
        let revoked_producers: Vec<(u64, String)> = self
            .producers
            .iter()
            .filter(|(_, producer)| !producer.closed.load(Ordering::SeqCst))
            .filter_map(|(id, producer)| {
                let denial = self.topic_denial(producer.topic.full_name(), TopicAction::Produce);
                denial.map(|reason| (*id, reason))
            })
            .collect();
        for (id, reason) in revoked_producers {
            if let Some(producer) = self.producers.remove(&id) {
                producer.closed.store(true, Ordering::SeqCst);
                producer.topic.remove_producer(producer.key);
                self.audit(
                    "PRODUCER",
                    producer.topic.full_name(),
                    Outcome::Denied,
                    &reason,
                );
                self.send_command(BaseCommand {
                    close_producer: Some(Box::new(CommandCloseProducer {
                        producer_id: id,
                        request_id: 0,
                        ..Default::default()
                    })),
                    ..command(Type::CloseProducer)
                })
                .await;
            }
        }
        let revoked_consumers: Vec<(u64, String)> = self
            .consumers
            .iter()
            .filter(|(_, consumer)| !consumer.closed.load(Ordering::SeqCst))
            .filter_map(|(id, consumer)| {
                let denial = self.topic_denial(consumer.topic.full_name(), TopicAction::Consume);
                denial.map(|reason| (*id, reason))
            })
            .collect();
        for (id, reason) in revoked_consumers {
            if let Some(consumer) = self.consumers.remove(&id) {
                consumer.closed.store(true, Ordering::SeqCst);
                consumer
                    .topic
                    .remove_consumer(&consumer.subscription.name, consumer.key);
                self.audit(
                    "SUBSCRIBE",
                    consumer.topic.full_name(),
                    Outcome::Denied,
                    &reason,
                );
                self.send_command(BaseCommand {
                    close_consumer: Some(Box::new(CommandCloseConsumer {
                        consumer_id: id,
                        request_id: 0,
                        ..Default::default()
                    })),
                    ..command(Type::CloseConsumer)
                })
                .await;
            }
        }
    }

    /// The periodic check: permissions revoked since are enforced; expired credentials are
    /// challenged once, then the connection closes.
    pub(super) async fn check_credentials(&mut self) -> Result<(), Close> {
        if self.config.security.authorization_enabled() {
            self.enforce_revocations().await;
        }
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
            auth_challenge: Some(Box::new(CommandAuthChallenge {
                server_version: Some(SERVER_VERSION.into()),
                challenge: Some(AuthData {
                    auth_method_name: Some("token".into()),
                    auth_data: Some(bytes::Bytes::from_static(REFRESH_AUTH_DATA)),
                }),
                protocol_version: Some(self.protocol_version.unwrap_or(PROTOCOL_VERSION)),
            })),
            ..command(Type::AuthChallenge)
        })
        .await;
        Ok(())
    }
}
