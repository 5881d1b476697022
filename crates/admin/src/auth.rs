//! Authentication of HTTP requests and the audit of admin mutations.
//!
//! With `authentication_enabled`, every request but `/metrics` and `/status.html` (open in
//! Pulsar too, unless `authenticateMetricsEndpoint`) needs `Authorization: Bearer <token>`;
//! without one, or with one that does not verify, the answer is 401 with a JSON reason. The
//! role of a verified token travels with the request as a [`Caller`] for the handlers'
//! permission checks.
//!
//! Every request that changes something (any method but GET and HEAD) is written to the audit
//! log with its outcome, as is every refused credential.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use meridian_auth::{AuditEvent, Outcome, Security};

use crate::ApiError;

/// The client's address, set per connection by the server.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddress(pub SocketAddr);

/// Who sent a request: the role of its token (None without authentication).
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub role: Option<String>,
}

/// Paths served without credentials.
fn is_open(path: &str) -> bool {
    matches!(path, "/metrics" | "/metrics/" | "/status.html")
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
    State(security): State<Arc<Security>>,
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
    request.extensions_mut().insert(caller.clone());
    let response = next.run(request).await;
    let status = response.status();
    let mutation = method != Method::GET && method != Method::HEAD;
    if mutation || status == StatusCode::FORBIDDEN {
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
