//! RFC 9457 problem documents.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

/// An RFC 9457 problem document: a precise, secret-free error for the peer.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// A URI naming the problem type (relative, under `/problems/`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the problem type.
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// What exactly went wrong with this request.
    pub detail: String,
    /// Each violation found, where there were several (RFC 9457 section 3 example
    /// extension `invalid-params`).
    #[serde(rename = "invalid-params", skip_serializing_if = "Vec::is_empty")]
    pub invalid_params: Vec<InvalidParam>,
    /// Seconds to send as `Retry-After` (429, 503).
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

/// One entry of a problem's `invalid-params`.
#[derive(Debug, Clone, Serialize)]
pub struct InvalidParam {
    /// Where in the request: `query/limit`, `body/temperature`, `header/x-trace`.
    pub name: String,
    /// What is wrong there.
    pub reason: String,
}

impl Problem {
    /// A problem with the given status, type slug and detail.
    pub fn new(status: StatusCode, kind: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("/problems/{kind}"),
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            invalid_params: Vec::new(),
            retry_after: None,
        }
    }

    /// The same problem with a `Retry-After` header.
    #[must_use]
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The same problem listing each violation.
    #[must_use]
    pub fn with_invalid_params(mut self, params: Vec<InvalidParam>) -> Self {
        self.invalid_params = params;
        self
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut resp = (status, body).into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"portcullis-est\", charset=\"UTF-8\""),
            );
        }
        resp
    }
}
