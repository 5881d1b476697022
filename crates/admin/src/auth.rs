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
//! (super-user or `replicator_roles`), and a replicator role may push only what configure-once
//! and tenant migration write ([`is_configure_once`]); it may also read and create any topic
//! and post subscription states ([`is_replication_call`]). Posting a subscription's replicated
//! state needs a replicating role (a tenant admin may not). A denial is 403 with a reason.
//!
//! Every request that changes something (any method but GET and HEAD) is written to the audit
//! log with its outcome, as is every refused credential.

use std::borrow::Cow;
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

/// Marks a request that came over TLS (the HTTPS port), set per connection by the server.
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

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
    // A cluster's record carries the credentials this cluster uses to reach it: only
    // super-users read them.
    let redact = method == Method::GET
        && is_cluster_record(&path)
        && !security.is_super_user(caller.role.as_deref());
    request.extensions_mut().insert(caller.clone());
    let mut response = next.run(request).await;
    if redact {
        response = without_credentials(response).await;
    }
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

/// Fields of a cluster record that hold a secret (Pulsar's `ClusterData`).
const CLUSTER_SECRETS: &[&str] = &["authenticationParameters"];

/// Largest cluster record rewritten (a record is a few hundred bytes).
const MAX_CLUSTER_RECORD_BYTES: usize = 1024 * 1024;

/// `/admin/v2/clusters/{cluster}`.
fn is_cluster_record(path: &str) -> bool {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    matches!(segments.as_slice(), ["admin", "v2", "clusters", _])
}

/// A cluster record's reply without its secrets ([`CLUSTER_SECRETS`]); any other reply as it
/// is.
async fn without_credentials(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_CLUSTER_RECORD_BYTES).await else {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cluster record too large",
        )
        .into_response();
    };
    let Ok(serde_json::Value::Object(mut record)) = serde_json::from_slice(&bytes) else {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    for field in CLUSTER_SECRETS {
        record.remove(*field);
    }
    let text = serde_json::to_vec(&record).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(text))
}

/// A path segment percent-decoded (`%XX` to its byte; anything else kept as it is).
fn decode(segment: &str) -> Cow<'_, str> {
    if !segment.contains('%') {
        return Cow::Borrowed(segment);
    }
    let bytes = segment.as_bytes();
    let hex = |byte: u8| char::from(byte).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = (bytes[index] == b'%' && index + 2 < bytes.len())
            .then(|| Some(hex(bytes[index + 1])? * 16 + hex(bytes[index + 2])?))
            .flatten();
        match escaped {
            Some(byte) => {
                out.push(byte as u8);
                index += 3;
            }
            None => {
                out.push(bytes[index]);
                index += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// The tenant's admin roles (none if it does not exist).
fn tenant_admins(broker: &Broker, tenant: &str) -> Vec<String> {
    broker
        .resources()
        .tenant(tenant)
        .map(|info| info.admin_roles)
        .unwrap_or_default()
}

/// What a replicator role (not a super-user) may do under `/admin/v2/persistent/` (`rest` is
/// the path after it): read, create a topic or a partitioned topic, post a subscription's
/// replicated state. That is what replication calls on a peer (`prepare_remote_topic`, the
/// subscription sync).
fn is_replication_call(method: &Method, rest: &[&str]) -> bool {
    match rest {
        _ if method == Method::GET || method == Method::HEAD => true,
        [_, _, _] | [_, _, _, "partitions"] => method == Method::PUT,
        [_, _, _, "subscription", _, "replicatedSubscriptionState"] => method == Method::POST,
        _ => false,
    }
}

/// The requests configure-once propagation and tenant migration send to a peer (with
/// `PROPAGATED_HEADER`): cluster records, the tenant, its namespaces and their replication
/// lists, partitioned topics' partition counts, the migration's status; and the deletes of an
/// aborted migration. A replicator role may send these and nothing else.
fn is_configure_once(method: &Method, segments: &[&str]) -> bool {
    let m = |allowed: &[Method]| allowed.contains(method);
    use Method as M;
    match segments {
        ["admin", "v2", "clusters", _] => m(&[M::GET, M::PUT]),
        ["admin", "v2", "tenants", _] => m(&[M::GET, M::PUT, M::POST, M::DELETE]),
        ["admin", "v2", "tenants", _, "migration"] => m(&[M::GET]),
        ["admin", "v2", "namespaces", _, _] => m(&[M::GET, M::PUT, M::DELETE]),
        ["admin", "v2", "namespaces", _, _, "replication"] => m(&[M::GET, M::POST]),
        ["admin", "v2", "persistent", _, _, _, "partitions"] => m(&[M::GET, M::PUT, M::POST]),
        _ => false,
    }
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
    // Decoded as the handlers' `Path` extractor decodes them, so that the check is made on the
    // tenant, namespace and topic the handler acts on (`%70ublic` is `public`).
    let decoded: Vec<Cow<'_, str>> = path.trim_matches('/').split('/').map(decode).collect();
    let segments: Vec<&str> = decoded.iter().map(AsRef::as_ref).collect();
    let read = method == Method::GET || method == Method::HEAD;
    if propagated {
        // Configure-once metadata from another cluster: only replicating roles may push it,
        // and only to the records configure-once and tenant migration write.
        if !security.may_replicate(role) {
            return Some(format!(
                "role '{}' may not push configure-once metadata (not a super-user or replicator role)",
                role.unwrap_or_default()
            ));
        }
        return (!is_configure_once(method, &segments)).then(|| {
            format!(
                "role '{}' is a replicator role, not a super-user: configure-once may not {method} {path}",
                role.unwrap_or_default()
            )
        });
    }
    if matches!(
        segments.as_slice(),
        [.., "subscription", _, "replicatedSubscriptionState"]
    ) && !security.may_replicate(role)
    {
        // Another cluster's subscription state moves this cluster's cursors: only a replicating
        // role speaks for another cluster, not even the tenant's admins.
        return Some(format!(
            "role '{}' may not post replicated subscription state (not a super-user or replicator role)",
            role.unwrap_or_default()
        ));
    }
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
        // Replicators create and inspect the topics they replicate to, and post subscription
        // states; nothing else (no deletes, grants, cursor moves, policies).
        ["admin", "v2", "persistent" | "non-persistent", rest @ ..]
            if security.may_replicate(role) && is_replication_call(method, rest) =>
        {
            None
        }
        ["admin", "v2", "persistent" | "non-persistent", tenant, ..] => tenant_admin(tenant),
        ["lookup", "v2", "topic", domain, tenant, namespace, topic] => {
            let name = match TopicName::parse(&format!("{domain}://{tenant}/{namespace}/{topic}")) {
                Ok(name) => name,
                // Refused, not waved through to the handler: fail closed.
                Err(error) => return Some(error.to_string()),
            };
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
