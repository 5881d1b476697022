//! `/admin/v2/tenants/{tenant}/migration` (a Meridian extension): start, status and abort of a
//! tenant's migration to another cluster (`docs/migration.md`).

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use meridian_broker::migration::{self, MigrationStatus};
use serde::Deserialize;

use crate::{body, ApiResult, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/admin/v2/tenants/{tenant}/migration",
            get(status).post(start).delete(abort),
        )
        .route(
            "/admin/v2/tenants/{tenant}/migration/redirect",
            post(release),
        )
        .route(
            "/admin/v2/tenants/{tenant}/migration/cleanup",
            post(cleanup),
        )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartRequest {
    #[serde(default)]
    target_cluster: String,
    /// Stop before the redirect until `POST …/migration/redirect`.
    #[serde(default)]
    hold_before_redirect: bool,
}

async fn start(
    State(broker): State<AppState>,
    Path(tenant): Path<String>,
    payload: Result<Json<StartRequest>, JsonRejection>,
) -> ApiResult<Json<MigrationStatus>> {
    let request = body(payload)?;
    Ok(Json(migration::start(
        &broker,
        &tenant,
        &request.target_cluster,
        request.hold_before_redirect,
    )?))
}

async fn status(
    State(broker): State<AppState>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<MigrationStatus>> {
    Ok(Json(migration::status(&broker, &tenant)?))
}

async fn release(
    State(broker): State<AppState>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<MigrationStatus>> {
    Ok(Json(migration::release(&broker, &tenant)?))
}

async fn cleanup(
    State(broker): State<AppState>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<MigrationStatus>> {
    Ok(Json(migration::cleanup(&broker, &tenant).await?))
}

async fn abort(
    State(broker): State<AppState>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<MigrationStatus>> {
    Ok(Json(migration::abort(&broker, &tenant).await?))
}
