//! Cluster mode: topic-level requests go to the broker that owns the topic's bundle.
//!
//! As Pulsar does, a topic-level admin call (`/admin/v2/persistent/{tenant}/{ns}/{topic}...`)
//! or an HTTP lookup (`/lookup/v2/topic/persistent/...`) that reaches a broker which does not
//! own the topic's bundle is answered `307 Temporary Redirect` to the same path and query on
//! the owner's web service URL. A bundle nobody owns is taken by this broker, which then
//! serves the request. Partitioned-topic metadata (`.../partitions`, `partitioned-stats`, and
//! calls naming a partitioned topic rather than one of its partitions) is answered by any
//! broker from the shared metadata, as in Pulsar. In standalone nothing changes.

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use meridian_broker::cluster::Owner;
use meridian_broker::TopicName;

use crate::{ApiError, AppState};

/// The middleware: passes the request on unless another broker owns its topic.
pub async fn redirect_to_owner(
    State(broker): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(cluster) = broker.cluster() else {
        return next.run(request).await;
    };
    let Some(topic) = owned_topic_of(request.method(), request.uri().path()) else {
        return next.run(request).await;
    };
    let Ok(name) = TopicName::parse(&topic) else {
        return next.run(request).await;
    };
    if name.partition_index().is_none() && matches!(broker.partition_count(&name), Ok(Some(_))) {
        return next.run(request).await;
    }
    match cluster.lookup(&broker, &name).await {
        Ok(Owner::This) => next.run(request).await,
        Ok(Owner::Other { registration, .. }) => {
            let path_and_query = request
                .uri()
                .path_and_query()
                .map(|value| value.as_str())
                .unwrap_or("/");
            let over_tls = request.extensions().get::<crate::auth::OverTls>().is_some();
            let location = format!(
                "{}{path_and_query}",
                registration.web_url(over_tls).trim_end_matches('/')
            );
            (
                StatusCode::TEMPORARY_REDIRECT,
                [(header::LOCATION, location)],
            )
                .into_response()
        }
        Err(error) => ApiError::from(error).into_response(),
    }
}

/// The topic a request is about when only the topic's owner may answer it: topic-level admin
/// calls and HTTP lookups, but not partitioned-topic metadata nor namespace-level calls.
fn owned_topic_of(method: &Method, path: &str) -> Option<String> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (tenant, namespace, local, rest) = match segments.as_slice() {
        ["lookup", "v2", "topic", "persistent", tenant, namespace, local] => {
            (tenant, namespace, local, None)
        }
        ["admin", "v2", "persistent", tenant, namespace, local, rest @ ..] => {
            (tenant, namespace, local, rest.first())
        }
        _ => return None,
    };
    if path.starts_with("/admin/")
        && rest.is_none()
        && *local == "partitioned"
        && method == Method::GET
    {
        return None; // the namespace's partitioned topics
    }
    if matches!(rest, Some(&"partitions") | Some(&"partitioned-stats")) {
        return None;
    }
    Some(format!(
        "persistent://{tenant}/{namespace}/{}",
        percent_decode(local)?
    ))
}

/// `%XX` escapes of a path segment decoded (a topic's local name travels URL-encoded);
/// `None` for a result that is not UTF-8.
fn percent_decode(segment: &str) -> Option<String> {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .ok()
        .map(|decoded| decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_topic_level_calls_and_lookups_are_redirected() {
        let get = Method::GET;
        let topic = |path| owned_topic_of(&get, path);
        assert_eq!(
            topic("/admin/v2/persistent/t/ns/orders/stats").as_deref(),
            Some("persistent://t/ns/orders")
        );
        assert_eq!(
            topic("/admin/v2/persistent/t/ns/orders").as_deref(),
            Some("persistent://t/ns/orders")
        );
        assert_eq!(
            topic("/lookup/v2/topic/persistent/t/ns/a%20b").as_deref(),
            Some("persistent://t/ns/a b")
        );
        assert_eq!(topic("/admin/v2/persistent/t/ns"), None);
        assert_eq!(topic("/admin/v2/persistent/t/ns/partitioned"), None);
        assert_eq!(topic("/admin/v2/persistent/t/ns/orders/partitions"), None);
        assert_eq!(
            topic("/admin/v2/persistent/t/ns/orders/partitioned-stats"),
            None
        );
        assert_eq!(topic("/admin/v2/namespaces/t/ns"), None);
        assert_eq!(topic("/admin/v2/persistent/t/ns/bad%FF"), None);
        assert_eq!(
            owned_topic_of(&Method::PUT, "/admin/v2/persistent/t/ns/partitioned").as_deref(),
            Some("persistent://t/ns/partitioned")
        );
    }
}
