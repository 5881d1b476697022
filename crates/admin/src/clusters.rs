//! `/admin/v2/clusters`.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use meridian_broker::resources::ClusterData;

use crate::{body, ApiResult, AppState};

pub fn routes() -> Router<AppState> {
    Router::new().route("/admin/v2/clusters", get(list)).route(
        "/admin/v2/clusters/{cluster}",
        get(get_cluster).put(create).post(update).delete(delete),
    )
}

async fn list(State(broker): State<AppState>) -> ApiResult<Json<Vec<String>>> {
    Ok(Json(broker.resources().clusters()?))
}

async fn get_cluster(
    State(broker): State<AppState>,
    Path(cluster): Path<String>,
) -> ApiResult<Json<ClusterData>> {
    Ok(Json(broker.resources().cluster(&cluster)?))
}

async fn create(
    State(broker): State<AppState>,
    Path(cluster): Path<String>,
    payload: Result<Json<ClusterData>, JsonRejection>,
) -> ApiResult<()> {
    broker
        .resources()
        .create_cluster(&cluster, &body(payload)?)?;
    broker.clusters_changed().await;
    Ok(())
}

async fn update(
    State(broker): State<AppState>,
    Path(cluster): Path<String>,
    payload: Result<Json<ClusterData>, JsonRejection>,
) -> ApiResult<()> {
    broker
        .resources()
        .update_cluster(&cluster, &body(payload)?)?;
    broker.clusters_changed().await;
    Ok(())
}

async fn delete(State(broker): State<AppState>, Path(cluster): Path<String>) -> ApiResult<()> {
    broker.resources().delete_cluster(&cluster)?;
    broker.clusters_changed().await;
    Ok(())
}
