//! EST (RFC 7030) and CRL routes of the device port.
//!
//! | route | auth | answer |
//! |---|---|---|
//! | `GET /.well-known/est/cacerts` | none | root + issuing CA, base64 certs-only PKCS#7 |
//! | `POST /.well-known/est/simpleenroll` | HTTP Basic `device-id:token` | the certificate, base64 PKCS#7 |
//! | `POST /.well-known/est/simplereenroll` | client certificate | a fresh certificate |
//! | `GET /.well-known/est/csrattrs` | none | 204: the CA takes only the key from a CSR |
//! | `GET /crl`, `/crl.pem`, `/crl?format=pem` | none | the signed CRL, DER or PEM |
//! | `GET /portcullis/whoami` | client certificate | the authenticated device |

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use portcullis_core::Token;
use serde::Deserialize;

use crate::authority::{AuthError, Authority, Error};
use crate::csr::{CsrError, MAX_BODY};
use crate::pkcs7;
use crate::tls::PeerCertificate;
use portcullis_http::Problem;

/// The EST, CRL and identity routes, to be served on the TLS device port.
pub fn router(authority: Arc<Authority>) -> Router {
    Router::new()
        .route(PATHS[0], get(cacerts))
        .route(PATHS[1], post(simpleenroll))
        .route(PATHS[2], post(simplereenroll))
        .route(PATHS[3], get(csrattrs))
        .route(PATHS[4], get(crl))
        .route(PATHS[5], get(crl_pem))
        .route(PATHS[6], get(whoami))
        .with_state(authority)
}

/// The paths [`router`] serves, in its order.
pub const PATHS: [&str; 7] = [
    "/.well-known/est/cacerts",
    "/.well-known/est/simpleenroll",
    "/.well-known/est/simplereenroll",
    "/.well-known/est/csrattrs",
    "/crl",
    "/crl.pem",
    "/portcullis/whoami",
];

/// Maps an identity failure to its HTTP problem.
pub fn auth_problem(e: &AuthError) -> Problem {
    match e {
        AuthError::Store(_) => {
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "registry-unavailable", "registry unavailable")
        }
        e if e.is_forbidden() => Problem::new(StatusCode::FORBIDDEN, "device-not-allowed", e.to_string()),
        e => Problem::new(StatusCode::UNAUTHORIZED, "client-certificate", e.to_string()),
    }
}

/// Maps a registry or enrollment failure to its HTTP problem; details of internal
/// failures go to the log, not the peer.
pub fn problem(e: &Error) -> Problem {
    use portcullis_store::Error as S;
    match e {
        Error::Csr(CsrError::TooLarge { .. }) => {
            Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large", e.to_string())
        }
        Error::Csr(CsrError::WeakKey { .. } | CsrError::UnsupportedKey(_) | CsrError::WeakSignature(_)) => {
            Problem::new(StatusCode::BAD_REQUEST, "csr-key-rejected", e.to_string())
        }
        Error::Csr(_) => Problem::new(StatusCode::BAD_REQUEST, "csr-invalid", e.to_string()),
        Error::BadCredentials | Error::TokenUsed | Error::TokenExpired => {
            Problem::new(StatusCode::UNAUTHORIZED, "enrollment-token", e.to_string())
        }
        Error::DeviceNotActive { .. } => {
            Problem::new(StatusCode::FORBIDDEN, "device-not-allowed", e.to_string())
        }
        Error::Auth(a) => auth_problem(a),
        Error::InvalidName(_) => Problem::new(StatusCode::BAD_REQUEST, "invalid-name", e.to_string()),
        Error::Store(S::NotFound { .. }) => Problem::new(StatusCode::NOT_FOUND, "not-found", e.to_string()),
        Error::Store(S::AlreadyExists { .. }) => {
            Problem::new(StatusCode::CONFLICT, "already-exists", e.to_string())
        }
        Error::Store(S::InvalidTransition { .. }) => {
            Problem::new(StatusCode::CONFLICT, "invalid-transition", e.to_string())
        }
        Error::Superseded(_) => Problem::new(StatusCode::FORBIDDEN, "certificate-superseded", e.to_string()),
        Error::TooManyReenrollments { retry_s, .. } => {
            Problem::new(StatusCode::TOO_MANY_REQUESTS, "reenroll-rate", e.to_string())
                .with_retry_after(*retry_s)
        }
        Error::UnknownReason(_) => Problem::new(StatusCode::BAD_REQUEST, "invalid-reason", e.to_string()),
        Error::Store(S::NotValid { .. }) => Problem::new(StatusCode::CONFLICT, "not-valid", e.to_string()),
        Error::Store(_) | Error::Ca(_) => {
            tracing::error!(error = ?e, "internal error");
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the server log")
        }
    }
}

fn pkcs7_response(certs: &[&[u8]]) -> Response {
    match pkcs7::certs_only(certs) {
        Ok(der) => {
            let body = portcullis_client::files::base64_lines(&der);
            (
                [
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/pkcs7-mime; smime-type=certs-only"),
                    ),
                    (
                        http::HeaderName::from_static("content-transfer-encoding"),
                        HeaderValue::from_static("base64"),
                    ),
                ],
                body,
            )
                .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot encode PKCS#7");
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the server log")
                .into_response()
        }
    }
}

async fn cacerts(State(a): State<Arc<Authority>>) -> Response {
    pkcs7_response(&[a.ca().root_der(), a.ca().issuing_der()])
}

async fn csrattrs() -> StatusCode {
    StatusCode::NO_CONTENT
}

fn check_content_type(headers: &HeaderMap) -> Result<(), Problem> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if essence == "application/pkcs10" {
        Ok(())
    } else {
        Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content-type",
            format!("content type must be application/pkcs10, got {:?}", ct),
        ))
    }
}

pub use portcullis_http::{DRAIN_CAP, drain};

/// Reads at most [`MAX_BODY`] bytes, refusing a larger body (declared or actual) with 413.
async fn read_body(req: Request) -> Result<(HeaderMap, Bytes), Problem> {
    use http_body_util::BodyExt;
    let too_large = |len: Option<usize>| {
        let detail = match len {
            Some(len) => format!("request body is {len} bytes, more than the {MAX_BODY} allowed"),
            None => format!("request body exceeds the {MAX_BODY} bytes allowed"),
        };
        Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large", detail)
    };
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(len) = declared
        && len > MAX_BODY
    {
        if len <= DRAIN_CAP {
            drain(body).await;
        }
        return Err(too_large(Some(len)));
    }
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| {
            Problem::new(StatusCode::BAD_REQUEST, "body-unreadable", "request body could not be read")
        })?;
        if let Some(d) = frame.data_ref() {
            if buf.len() + d.len() > MAX_BODY {
                drain(body).await;
                return Err(too_large(None));
            }
            buf.extend_from_slice(d);
        }
    }
    Ok((parts.headers, buf.freeze()))
}

fn basic_credentials(headers: &HeaderMap) -> Result<(String, Token), Problem> {
    let missing = || {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "enrollment-token",
            "HTTP Basic authentication with device-id:token is required",
        )
    };
    let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or_else(missing)?;
    let (scheme, rest) = value.split_once(' ').ok_or_else(missing)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(missing());
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            Problem::new(StatusCode::UNAUTHORIZED, "enrollment-token", "malformed HTTP Basic credentials")
        })?;
    let (user, pass) = decoded.split_once(':').ok_or_else(|| {
        Problem::new(StatusCode::UNAUTHORIZED, "enrollment-token", "malformed HTTP Basic credentials")
    })?;
    Ok((user.to_owned(), Token::from_presented(pass)))
}

async fn simpleenroll(State(a): State<Arc<Authority>>, req: Request) -> Response {
    let result = async {
        // The body is read first, whatever the verdict, so that an HTTP/2 client still
        // sending it receives the precise error rather than a stream reset.
        let (headers, body) = read_body(req).await?;
        let (id, token) = basic_credentials(&headers)?;
        check_content_type(&headers)?;
        a.enroll(&id, &token, &body).await.map_err(|e| {
            tracing::warn!(device = %id, error = %e, "enrollment refused");
            problem(&e)
        })
    }
    .await;
    match result {
        Ok(issued) => pkcs7_response(&[&issued.der]),
        Err(p) => p.into_response(),
    }
}

async fn simplereenroll(
    State(a): State<Arc<Authority>>,
    peer: Option<axum::Extension<PeerCertificate>>,
    req: Request,
) -> Response {
    let result = async {
        let (headers, body) = read_body(req).await?;
        let device = a.authenticate(peer.as_deref()).await.map_err(|e| {
            tracing::warn!(error = %e, "re-enrollment refused");
            auth_problem(&e)
        })?;
        check_content_type(&headers)?;
        a.reenroll(&device, &body).await.map_err(|e| {
            tracing::warn!(device = %device.id, error = %e, "re-enrollment refused");
            problem(&e)
        })
    }
    .await;
    match result {
        Ok(issued) => pkcs7_response(&[&issued.der]),
        Err(p) => p.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct CrlQuery {
    format: Option<String>,
}

async fn crl(State(a): State<Arc<Authority>>, Query(q): Query<CrlQuery>) -> Response {
    match q.format.as_deref() {
        None | Some("der") => {
            ([(header::CONTENT_TYPE, "application/pkix-crl")], a.crl_der().as_ref().clone()).into_response()
        }
        Some("pem") => crl_pem(State(a)).await,
        Some(other) => Problem::new(
            StatusCode::BAD_REQUEST,
            "crl-format",
            format!("unknown CRL format {other:?}; use der or pem"),
        )
        .into_response(),
    }
}

async fn crl_pem(State(a): State<Arc<Authority>>) -> Response {
    ([(header::CONTENT_TYPE, "application/x-pem-file")], a.crl_pem()).into_response()
}

async fn whoami(State(a): State<Arc<Authority>>, peer: Option<axum::Extension<PeerCertificate>>) -> Response {
    match a.authenticate(peer.as_deref()).await {
        Ok(d) => axum::Json(serde_json::json!({
            "device": d.id,
            "serial": d.serial,
            "fingerprint": d.fingerprint,
            "not_after": d.not_after.unix_timestamp(),
        }))
        .into_response(),
        Err(e) => auth_problem(&e).into_response(),
    }
}
