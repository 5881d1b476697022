//! Pulsar's permission resources: grants of `produce` / `consume` to roles on a namespace or a
//! topic, kept in the namespace's policies (`auth_policies`, as Pulsar keeps them).
//!
//! - `GET    /admin/v2/namespaces/{tenant}/{namespace}/permissions` → `{role: [actions]}`
//! - `POST   /admin/v2/namespaces/{tenant}/{namespace}/permissions/{role}` body `["produce"]`
//! - `DELETE /admin/v2/namespaces/{tenant}/{namespace}/permissions/{role}`
//! - the same under `/admin/v2/persistent/{tenant}/{namespace}/{topic}/permissions`; a topic's
//!   GET answers its own grants merged with its namespace's.
//!
//! Who may call them is decided in [`crate::auth`] (tenant admins and super-users).

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use meridian_auth::authz::check_actions;
use meridian_auth::AuthPolicies;
use meridian_broker::TopicName;

use crate::{body, ApiError, ApiResult, AppState};

pub fn routes() -> Router<AppState> {
    let namespace = "/admin/v2/namespaces/{tenant}/{namespace}/permissions";
    let topic = "/admin/v2/persistent/{tenant}/{namespace}/{topic}/permissions";
    Router::new()
        .route(namespace, get(namespace_permissions))
        .route(
            &format!("{namespace}/{{role}}"),
            post(grant_namespace).delete(revoke_namespace),
        )
        .route(topic, get(topic_permissions))
        .route(
            &format!("{topic}/{{role}}"),
            post(grant_topic).delete(revoke_topic),
        )
}

type Grants = BTreeMap<String, BTreeSet<String>>;

fn grants_of(broker: &AppState, tenant: &str, namespace: &str) -> ApiResult<AuthPolicies> {
    let policies = broker.resources().policies(tenant, namespace)?;
    Ok(AuthPolicies::from_policies(
        policies.other.get("auth_policies"),
    ))
}

fn change(
    broker: &AppState,
    tenant: &str,
    namespace: &str,
    mut apply: impl FnMut(&mut AuthPolicies),
) -> ApiResult<()> {
    broker
        .resources()
        .update_policies(tenant, namespace, |policies| {
            let mut grants = AuthPolicies::from_policies(policies.other.get("auth_policies"));
            apply(&mut grants);
            policies
                .other
                .insert("auth_policies".into(), grants.to_value());
            Ok(())
        })?;
    Ok(())
}

fn actions(payload: Result<Json<Vec<String>>, JsonRejection>) -> ApiResult<BTreeSet<String>> {
    check_actions(&body(payload)?).map_err(ApiError::bad_request)
}

/// The base topic (a partition's grants are its partitioned topic's).
fn topic_name(tenant: &str, namespace: &str, topic: &str) -> ApiResult<String> {
    let name = TopicName::parse(&format!("persistent://{tenant}/{namespace}/{topic}"))?;
    Ok(name.base().to_string())
}

async fn namespace_permissions(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<Json<Grants>> {
    Ok(Json(
        grants_of(&broker, &tenant, &namespace)?.namespace_auth,
    ))
}

async fn grant_namespace(
    State(broker): State<AppState>,
    Path((tenant, namespace, role)): Path<(String, String, String)>,
    payload: Result<Json<Vec<String>>, JsonRejection>,
) -> ApiResult<()> {
    let actions = actions(payload)?;
    change(&broker, &tenant, &namespace, |grants| {
        grants.namespace_auth.insert(role.clone(), actions.clone());
    })
}

async fn revoke_namespace(
    State(broker): State<AppState>,
    Path((tenant, namespace, role)): Path<(String, String, String)>,
) -> ApiResult<()> {
    change(&broker, &tenant, &namespace, |grants| {
        grants.namespace_auth.remove(&role);
    })
}

async fn topic_permissions(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): Path<(String, String, String)>,
) -> ApiResult<Json<Grants>> {
    let topic = topic_name(&tenant, &namespace, &topic)?;
    let grants = grants_of(&broker, &tenant, &namespace)?;
    let mut merged = grants.namespace_auth.clone();
    for (role, actions) in grants
        .destination_auth
        .get(&topic)
        .cloned()
        .unwrap_or_default()
    {
        merged.entry(role).or_default().extend(actions);
    }
    Ok(Json(merged))
}

async fn grant_topic(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic, role)): Path<(String, String, String, String)>,
    payload: Result<Json<Vec<String>>, JsonRejection>,
) -> ApiResult<()> {
    let topic = topic_name(&tenant, &namespace, &topic)?;
    let actions = actions(payload)?;
    change(&broker, &tenant, &namespace, |grants| {
        grants
            .destination_auth
            .entry(topic.clone())
            .or_default()
            .insert(role.clone(), actions.clone());
    })
}

async fn revoke_topic(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic, role)): Path<(String, String, String, String)>,
) -> ApiResult<()> {
    let topic = topic_name(&tenant, &namespace, &topic)?;
    change(&broker, &tenant, &namespace, |grants| {
        if let Some(roles) = grants.destination_auth.get_mut(&topic) {
            roles.remove(&role);
            if roles.is_empty() {
                grants.destination_auth.remove(&topic);
            }
        }
    })
}
