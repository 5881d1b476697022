//! `/admin/v2/tenants`.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use meridian_broker::resources::TenantInfo;

use crate::{body, ApiResult, AppState};

pub fn routes() -> Router<AppState> {
    Router::new().route("/admin/v2/tenants", get(list)).route(
        "/admin/v2/tenants/{tenant}",
        get(get_tenant).put(create).post(update).delete(delete),
    )
}

async fn list(State(broker): State<AppState>) -> ApiResult<Json<Vec<String>>> {
    Ok(Json(broker.resources().tenants()?))
}

async fn get_tenant(
    State(broker): State<AppState>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<TenantInfo>> {
    Ok(Json(broker.resources().tenant(&tenant)?))
}

async fn create(
    State(broker): State<AppState>,
    Path(tenant): Path<String>,
    payload: Result<Json<TenantInfo>, JsonRejection>,
) -> ApiResult<()> {
    broker.resources().create_tenant(&tenant, &body(payload)?)?;
    Ok(())
}

async fn update(
    State(broker): State<AppState>,
    Path(tenant): Path<String>,
    payload: Result<Json<TenantInfo>, JsonRejection>,
) -> ApiResult<()> {
    broker.resources().update_tenant(&tenant, &body(payload)?)?;
    Ok(())
}

async fn delete(State(broker): State<AppState>, Path(tenant): Path<String>) -> ApiResult<()> {
    broker.resources().delete_tenant(&tenant)?;
    Ok(())
}
