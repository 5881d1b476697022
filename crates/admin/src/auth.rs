//! Authentication of HTTP requests and the audit of admin mutations.
//!
//! With `authentication_enabled`, every request but `/metrics` and `/status.html` (open in
//! Pulsar too, unless `authenticateMetricsEndpoint`) and the console's static files needs `Authorization: Bearer <token>`;
//! without one, or with one that does not verify, the answer is 401 with a JSON reason. The
//! role of a verified token travels with the request as a [`Caller`] for the handlers'
//! permission checks.
//!
//! With `authorization_enabled`, each request is then checked by its path
//! ([`authorization_denial`]): super-users may do everything; a tenant's admin roles may use
//! `/admin/v2/tenants/{tenant}` (read), `/admin/v2/namespaces/{tenant}/...` and
//! `/admin/v2/persistent|non-persistent/{tenant}/...`; any authenticated role may read
//! `/admin/v2/clusters`; an HTTP lookup needs produce or consume on the topic; everything else
//! (cluster changes, tenants, brokers, migration) is for super-users. Configure-once pushes
//! from other clusters (requests with `PROPAGATED_HEADER`) need a replicating role
//! (super-user or `replicator_roles`), which may also use every topic path. A denial is 403
//! with a reason.
//!
//! Every request that changes something (any method but GET and HEAD) is written to the audit
//! log with its outcome, as is every refused credential.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use meridian_auth::{AuditEvent, AuthPolicies, Outcome, Security, TopicAction};
use meridian_broker::{Broker, TopicName};

use crate::ApiError;

/// The client's address, set per connection by the server.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddress(pub SocketAddr);

/// Who sent a request: the role of its token (None without authentication).
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub role: Option<String>,
}

/// Paths served without credentials: metrics, the status page, and the console's three
/// static files (code, no data: the console asks for a token and sends it with each API call).
fn is_open(path: &str) -> bool {
    matches!(
        path,
        "/metrics"
            | "/metrics/"
            | "/status.html"
            | "/console"
            | "/console/"
            | "/console/style.css"
            | "/console/app.js"
    )
}

fn audit(
    security: &Security,
    request: (&Method, &str, Option<SocketAddr>),
    role: Option<&str>,
    outcome: Outcome,
    reason: Option<&str>,
) {
    let (method, path, peer) = request;
    security.audit(AuditEvent {
        role,
        address: &peer.map(|peer| peer.to_string()).unwrap_or_default(),
        action: method.as_str(),
        resource: path,
        outcome,
        reason,
    });
}

/// The middleware: authenticates, runs the request, audits mutations.
pub async fn authenticate(
    State((security, broker)): State<(Arc<Security>, Arc<Broker>)>,
    mut request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let peer = request.extensions().get::<PeerAddress>().map(|peer| peer.0);
    let mut caller = Caller::default();
    if security.authentication_enabled() && !is_open(&path) {
        let token = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        let verified = match token {
            Some(token) => security
                .authenticate(token)
                .map_err(|error| error.to_string()),
            None => Err("authentication required: send Authorization: Bearer <token>".into()),
        };
        match verified {
            Ok(principal) => caller.role = Some(principal.role),
            Err(reason) => {
                audit(
                    &security,
                    (&method, &path, peer),
                    None,
                    Outcome::Unauthenticated,
                    Some(&reason),
                );
                return ApiError::new(StatusCode::UNAUTHORIZED, reason).into_response();
            }
        }
    }
    if security.authorization_enabled() && !is_open(&path) {
        let propagated = request
            .headers()
            .contains_key(crate::propagate::PROPAGATED_HEADER);
        let denial = authorization_denial(&security, &broker, &method, &path, &caller, propagated);
        if let Some(reason) = denial {
            let response = ApiError::new(StatusCode::FORBIDDEN, reason.clone()).into_response();
            audit(
                &security,
                (&method, &path, peer),
                caller.role.as_deref(),
                Outcome::Denied,
                Some(&reason),
            );
            return response;
        }
    }
    request.extensions_mut().insert(caller.clone());
    let response = next.run(request).await;
    let status = response.status();
    let mutation = method != Method::GET && method != Method::HEAD;
    if mutation || status == StatusCode::FORBIDDEN {
        // A 403 from a handler (not from the check above) is audited here.
        let outcome = if status == StatusCode::FORBIDDEN {
            Outcome::Denied
        } else if status.is_success() || status.is_redirection() {
            Outcome::Allowed
        } else {
            Outcome::Failed
        };
        let reason = (!status.is_success()).then(|| status.to_string());
        audit(
            &security,
            (&method, &path, peer),
            caller.role.as_deref(),
            outcome,
            reason.as_deref(),
        );
    }
    response
}

/// The tenant's admin roles (none if it does not exist).
fn tenant_admins(broker: &Broker, tenant: &str) -> Vec<String> {
    broker
        .resources()
        .tenant(tenant)
        .map(|info| info.admin_roles)
        .unwrap_or_default()
}

/// Why the caller may not make this request, or None if it may.
pub fn authorization_denial(
    security: &Security,
    broker: &Broker,
    method: &Method,
    path: &str,
    caller: &Caller,
    propagated: bool,
) -> Option<String> {
    let role = caller.role.as_deref();
    if security.is_super_user(role) {
        return None;
    }
    if propagated {
        // Configure-once metadata from another cluster: only replicating roles may push it.
        return (!security.may_replicate(role)).then(|| {
            format!(
                "role '{}' may not push configure-once metadata (not a super-user or replicator role)",
                role.unwrap_or_default()
            )
        });
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let read = method == Method::GET || method == Method::HEAD;
    let tenant_admin = |tenant: &str| {
        (!security.is_tenant_admin(role, &tenant_admins(broker, tenant))).then(|| {
            format!(
                "role '{}' is not an admin of tenant {tenant}",
                role.unwrap_or_default()
            )
        })
    };
    match segments.as_slice() {
        ["admin", "v2", "clusters", ..] if read => None,
        ["admin", "v2", "tenants", tenant] if read => tenant_admin(tenant),
        ["admin", "v2", "namespaces", tenant, ..] => tenant_admin(tenant),
        // Replicators create and inspect the topics they replicate to.
        ["admin", "v2", "persistent" | "non-persistent", ..] if security.may_replicate(role) => {
            None
        }
        ["admin", "v2", "persistent" | "non-persistent", tenant, ..] => tenant_admin(tenant),
        ["lookup", "v2", "topic", domain, tenant, namespace, topic] => {
            let name =
                TopicName::parse(&format!("{domain}://{tenant}/{namespace}/{topic}")).ok()?;
            let grants = broker
                .resources()
                .policies(tenant, namespace)
                .map(|policies| AuthPolicies::from_policies(policies.other.get("auth_policies")))
                .unwrap_or_default();
            security.topic_denial(
                role,
                TopicAction::Lookup,
                &name.base().to_string(),
                &tenant_admins(broker, tenant),
                &grants,
            )
        }
        _ => Some(format!(
            "role '{}' is not a super-user; {method} {path} needs one",
            role.unwrap_or_default()
        )),
    }
}
