//! The built-in web console at `/console`: a read-only view of this cluster for people.
//!
//! Three static files (an HTML shell, a stylesheet, a script) are embedded in the binary and
//! served as they are; the script draws every page in the browser from the REST API the broker
//! already serves (`/admin/v2/clusters`, `/admin/v2/broker-stats/topics`, a topic's `stats`, …),
//! so the console has no data path of its own and shows exactly what `pulsar-admin` would.
//!
//! Nothing is fetched from elsewhere: the Content-Security-Policy sent with each file allows
//! scripts, styles and requests from this origin only, and the script builds the page with DOM
//! text nodes (never HTML strings), so names that users chose (topics, subscriptions,
//! consumers) are shown as text whatever they contain.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::AppState;

const INDEX_HTML: &str = include_str!("index.html");
const STYLE_CSS: &str = include_str!("style.css");
const APP_JS: &str = include_str!("app.js");

/// Same-origin only; `data:` images for the (empty) icon, so the browser asks for no
/// `/favicon.ico`.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console", get(index))
        .route("/console/", get(index))
        .route("/console/style.css", get(style))
        .route("/console/app.js", get(script))
}

/// One embedded file with its type and the console's security headers. `no-cache` lets the
/// browser keep a copy but ask again, so a new broker version never runs an old script.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}
