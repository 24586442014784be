//! `/v1/firmware/…`: publish, list, root, fleet status and rollouts.

use std::sync::Arc;

use crate::wire;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use portcullis_firmware::Error as FwError;
use portcullis_firmware::service::{Firmware, NewRollout};
use portcullis_http::Problem;
use portcullis_store::Actor;
use serde::Deserialize;

#[derive(Clone)]
pub(crate) struct FwState {
    pub(crate) firmware: Arc<Firmware>,
    pub(crate) actor: Actor,
}

/// Images up to 1 GiB.
const MAX_IMAGE: usize = 1 << 30;

pub(crate) fn routes(state: FwState) -> Router {
    Router::new()
        .route("/v1/firmware/root", get(root))
        .route(
            "/v1/firmware/targets",
            get(targets).post(publish).layer(axum::extract::DefaultBodyLimit::max(MAX_IMAGE)),
        )
        .route("/v1/firmware/metadata/{role}", get(metadata))
        .route("/v1/firmware/uploads", post(upload).layer(axum::extract::DefaultBodyLimit::max(MAX_IMAGE)))
        .route("/v1/firmware/import", post(import).layer(axum::extract::DefaultBodyLimit::max(16 << 20)))
        .route("/v1/firmware/status", get(status))
        .route("/v1/firmware/refresh", post(refresh))
        .route("/v1/firmware/rollouts", get(rollouts).post(create_rollout))
        .route("/v1/firmware/rollouts/{id}", get(rollout))
        .route("/v1/firmware/rollouts/{id}/{action}", post(change_rollout))
        .with_state(state)
}

fn fw_err(e: FwError) -> Problem {
    match e {
        FwError::Refused(m) if m.starts_with("no rollout") => {
            Problem::new(StatusCode::NOT_FOUND, "not-found", m)
        }
        FwError::Refused(m) => Problem::new(StatusCode::BAD_REQUEST, "firmware-refused", m),
        FwError::Forbidden(m) => Problem::new(StatusCode::FORBIDDEN, "forbidden", m),
        e @ FwError::KeyOffline(_) => Problem::new(StatusCode::CONFLICT, "key-offline", e.to_string()),
        other => {
            tracing::error!(error = %other, "firmware operation failed");
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "firmware-error", other.to_string())
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FwError> + Send + 'static,
) -> Result<T, Problem> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "firmware-error", e.to_string()))?
        .map_err(fw_err)
}

async fn root(State(s): State<FwState>) -> Result<Response, Problem> {
    let fw = s.firmware.clone();
    let bytes = blocking(move || fw.repo().root_json()).await?;
    let mut resp = bytes.into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

async fn targets(State(s): State<FwState>) -> Result<Json<wire::FirmwareTargets>, Problem> {
    let fw = s.firmware.clone();
    let targets = blocking(move || fw.repo().targets()).await?;
    Ok(Json(wire::FirmwareTargets { targets }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishQuery {
    hardware: String,
    version: String,
    name: String,
    notes: Option<String>,
    #[serde(default)]
    allow_downgrade: bool,
}

async fn publish(
    State(s): State<FwState>,
    Query(q): Query<PublishQuery>,
    body: Bytes,
) -> Result<Response, Problem> {
    let bad = |m: String| Problem::new(StatusCode::BAD_REQUEST, "firmware-refused", m);
    let version: semver::Version = q
        .version
        .parse()
        .map_err(|_| bad(format!("invalid version {:?}: use semantic versioning, e.g. 1.4.2", q.version)))?;
    if !portcullis_firmware::safe_component(&q.name) {
        return Err(bad(format!("invalid image name {:?}", q.name)));
    }
    if body.is_empty() {
        return Err(bad("empty image".into()));
    }
    let fw = s.firmware.clone();
    let info = blocking(move || {
        let dir = fw.repo().upload_dir()?;
        let nonce: String = portcullis_core::random_bytes::<8>().iter().map(|b| format!("{b:02x}")).collect();
        let tmp = dir.join(format!("upload-{nonce}"));
        std::fs::create_dir_all(&tmp).map_err(|e| FwError::Refused(format!("cannot stage upload: {e}")))?;
        let file = tmp.join(&q.name);
        let result = std::fs::write(&file, &body)
            .map_err(|e| FwError::Refused(format!("cannot stage upload: {e}")))
            .and_then(|()| {
                fw.repo().publish(&file, &q.hardware, &version, q.notes.as_deref(), q.allow_downgrade, None)
            });
        let _ = std::fs::remove_dir_all(&tmp);
        result
    })
    .await?;
    tracing::info!(target = %info.path, actor = %s.actor, "firmware published");
    Ok((StatusCode::CREATED, Json(wire::FirmwarePublished { target: info })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusQuery {
    hardware: Option<String>,
}

async fn status(
    State(s): State<FwState>,
    Query(q): Query<StatusQuery>,
) -> Result<Json<wire::FleetStatus>, Problem> {
    Ok(Json(s.firmware.status(q.hardware.as_deref()).await.map_err(fw_err)?))
}

async fn refresh(State(s): State<FwState>) -> Result<Json<wire::Refreshed>, Problem> {
    let fw = s.firmware.clone();
    Ok(Json(blocking(move || fw.repo().refresh(chrono::Utc::now())).await?))
}

async fn rollouts(State(s): State<FwState>) -> Result<Json<wire::Rollouts>, Problem> {
    let mut rollouts = Vec::new();
    for r in s.firmware.rollouts().await.map_err(fw_err)? {
        rollouts.push(s.firmware.rollout_status(r.id).await.map_err(fw_err)?);
    }
    Ok(Json(wire::Rollouts { rollouts }))
}

async fn create_rollout(State(s): State<FwState>, Json(req): Json<NewRollout>) -> Result<Response, Problem> {
    let r = s.firmware.create_rollout(req, s.actor.clone()).await.map_err(fw_err)?;
    let body = s.firmware.rollout_status(r.id).await.map_err(fw_err)?;
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn rollout(
    State(s): State<FwState>,
    Path(id): Path<i64>,
) -> Result<Json<wire::RolloutStatus>, Problem> {
    Ok(Json(s.firmware.rollout_status(id).await.map_err(fw_err)?))
}

async fn change_rollout(
    State(s): State<FwState>,
    Path((id, action)): Path<(i64, String)>,
) -> Result<Json<wire::RolloutStatus>, Problem> {
    s.firmware.change_rollout(id, &action, s.actor.clone()).await.map_err(fw_err)?;
    Ok(Json(s.firmware.rollout_status(id).await.map_err(fw_err)?))
}

async fn metadata(State(s): State<FwState>, Path(role): Path<String>) -> Result<Response, Problem> {
    let fw = s.firmware.clone();
    let bytes = blocking(move || fw.repo().current_raw(&role)).await?;
    let mut resp = bytes.into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

async fn upload(State(s): State<FwState>, body: Bytes) -> Result<Response, Problem> {
    if body.is_empty() {
        return Err(Problem::new(StatusCode::BAD_REQUEST, "firmware-refused", "empty image"));
    }
    let fw = s.firmware.clone();
    let (sha256, length) = blocking(move || fw.repo().stage_upload(&body)).await?;
    Ok((StatusCode::CREATED, Json(wire::FirmwareUploaded { sha256, length })).into_response())
}

async fn import(State(s): State<FwState>, body: Bytes) -> Result<Json<wire::FirmwareTargets>, Problem> {
    let fw = s.firmware.clone();
    let targets = blocking(move || fw.repo().import_targets(&body)).await?;
    tracing::info!(targets = targets.len(), actor = %s.actor, "signed targets metadata imported");
    Ok(Json(wire::FirmwareTargets { targets }))
}
