//! The device port's `/firmware/` tree (client certificate required for all of it).
//!
//! | route | answer |
//! |---|---|
//! | `GET /firmware/metadata/FILE` | TUF metadata (`N.root.json`, `timestamp.json`, `N.snapshot.json`, `N.targets.json`) |
//! | `GET /firmware/targets/HW/VERSION/HASH.NAME` | an image; `Range: bytes=N-[M]` answered with 206 |
//! | `POST /firmware/assignment` | `{hardware, installed}` → `{target, version, rollout}` or nulls |
//! | `POST /firmware/report` | a state change; the device is the certificate's, a report naming another is 403 |

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use portcullis_http::Problem;
use portcullis_pki::Authority;
use portcullis_pki::tls::PeerCertificate;

use crate::Error;
use crate::service::{CheckIn, Firmware, Report};

/// The path prefix these routes answer.
pub const PREFIX: &str = "/firmware/";

#[derive(Clone)]
struct Ctx {
    authority: Arc<Authority>,
    firmware: Arc<Firmware>,
}

/// The `/firmware/` routes.
pub fn router(authority: Arc<Authority>, firmware: Arc<Firmware>) -> Router {
    Router::new()
        .route("/firmware/metadata/{*file}", get(metadata))
        .route("/firmware/targets/{*file}", get(target))
        .route("/firmware/assignment", post(assignment))
        .route("/firmware/report", post(report))
        .fallback(|| async {
            Problem::new(StatusCode::NOT_FOUND, "not-found", "no such firmware resource").into_response()
        })
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024))
        .with_state(Ctx { authority, firmware })
}

type Peer = Option<axum::Extension<PeerCertificate>>;

async fn device(
    ctx: &Ctx,
    peer: &Peer,
) -> Result<std::sync::Arc<portcullis_pki::AuthenticatedDevice>, Response> {
    ctx.authority
        .authenticate(peer.as_deref())
        .await
        .map_err(|e| portcullis_pki::est::auth_problem(&e).into_response())
}

fn refused(e: &Error) -> Response {
    match e {
        Error::NotYourReport { .. } => {
            Problem::new(StatusCode::FORBIDDEN, "report-not-yours", e.to_string()).into_response()
        }
        Error::Refused(m) => {
            Problem::new(StatusCode::BAD_REQUEST, "firmware-request", m.clone()).into_response()
        }
        Error::Forbidden(m) => {
            Problem::new(StatusCode::FORBIDDEN, "rollout-not-yours", m.clone()).into_response()
        }
        other => {
            tracing::error!(error = %other, "firmware request failed");
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "firmware-error", "firmware service failed")
                .into_response()
        }
    }
}

async fn metadata(
    State(ctx): State<Ctx>,
    peer: Peer,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Response {
    serve(&ctx, &peer, &format!("metadata/{file}"), &headers, "application/json").await
}

async fn target(
    State(ctx): State<Ctx>,
    peer: Peer,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Response {
    serve(&ctx, &peer, &format!("targets/{file}"), &headers, "application/octet-stream").await
}

/// Parses `bytes=N-` or `bytes=N-M` (one range; what resuming clients send) against a
/// file of `len` bytes; `None` when it is not satisfiable or not understood.
pub fn parse_range(v: &str, len: u64) -> Option<(u64, u64)> {
    let spec = v.trim().strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end: u64 = if b.trim().is_empty() {
        len.checked_sub(1)?
    } else {
        b.trim().parse::<u64>().ok()?.min(len.checked_sub(1)?)
    };
    (start <= end && start < len).then_some((start, end))
}

async fn serve(
    ctx: &Ctx,
    peer: &Peer,
    rel: &str,
    headers: &HeaderMap,
    content_type: &'static str,
) -> Response {
    if let Err(r) = device(ctx, peer).await {
        return r;
    }
    let Some(path) = ctx.firmware.repo().resolve(rel) else {
        return Problem::new(StatusCode::NOT_FOUND, "not-found", format!("no firmware file {rel}"))
            .into_response();
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(_) => {
            return Problem::new(StatusCode::NOT_FOUND, "not-found", format!("no firmware file {rel}"))
                .into_response();
        }
    };
    let len = match file.metadata().await {
        Ok(m) => m.len(),
        Err(e) => {
            tracing::error!(error = %e, path = %path.display(), "firmware file unreadable");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, len.saturating_sub(1)),
        Some(r) => match parse_range(r, len) {
            Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e),
            None => {
                let mut resp = Problem::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "range",
                    format!("range {r:?} not satisfiable for {len} bytes"),
                )
                .into_response();
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    resp.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return resp;
            }
        },
    };
    let count = if len == 0 { 0 } else { end - start + 1 };
    let body = {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let mut file = file;
        if start > 0 && file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file.take(count), 256 * 1024))
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}"))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    // Metadata changes under the same name (timestamp.json): never cache it.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    serde_json::from_slice(body).map_err(|e| {
        Problem::new(StatusCode::BAD_REQUEST, "firmware-request", format!("malformed JSON: {e}"))
    })
}

async fn assignment(State(ctx): State<Ctx>, peer: Peer, body: axum::body::Bytes) -> Response {
    let d = match device(&ctx, &peer).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let check: CheckIn = match json_body(&body) {
        Ok(c) => c,
        Err(p) => return p.into_response(),
    };
    match ctx.firmware.assignment(&d.id, d.group.as_str(), check).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => refused(&e),
    }
}

async fn report(State(ctx): State<Ctx>, peer: Peer, body: axum::body::Bytes) -> Response {
    let d = match device(&ctx, &peer).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let report: Report = match json_body(&body) {
        Ok(c) => c,
        Err(p) => return p.into_response(),
    };
    match ctx.firmware.report(&d.id, d.group.as_str(), report).await {
        Ok(()) => (StatusCode::NO_CONTENT, ()).into_response(),
        Err(e) => refused(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-", 10), Some((0, 9)));
        assert_eq!(parse_range("bytes=4-", 10), Some((4, 9)));
        assert_eq!(parse_range("bytes=4-6", 10), Some((4, 6)));
        assert_eq!(parse_range("bytes=4-60", 10), Some((4, 9)));
        assert_eq!(parse_range("bytes=10-", 10), None);
        assert_eq!(parse_range("bytes=6-4", 10), None);
        assert_eq!(parse_range("items=0-", 10), None);
        assert_eq!(parse_range("bytes=0-", 0), None);
    }
}
