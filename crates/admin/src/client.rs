use std::fmt;
use std::net::SocketAddr;

use axum::Router;
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use portcullis_core::Token;
use serde_json::Value;

use crate::wire;
use tower::ServiceExt;

/// A failed admin API call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server could not be reached.
    #[error("cannot reach the admin API at {addr}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("admin API request failed: {0}")]
    Http(String),
    /// The server answered with an error.
    #[error("{detail} (HTTP {status})")]
    Problem {
        /// HTTP status.
        status: u16,
        /// The problem's detail.
        detail: String,
    },
}

enum Target {
    Remote(SocketAddr),
    /// The router, and whatever guard (a data-dir lock) must live as long as it.
    Local {
        router: Router,
        _guard: Box<dyn std::any::Any + Send + Sync>,
    },
}

/// Talks to the admin API: over HTTP to a running server, or in-process to a router
/// over the data dir when no server runs. Both take the same code path on the server
/// side, so the CLI behaves the same either way.
pub struct AdminClient {
    target: Target,
    token: Token,
}

impl fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = match &self.target {
            Target::Remote(a) => a.to_string(),
            Target::Local { .. } => "in-process".to_owned(),
        };
        f.debug_struct("AdminClient").field("target", &target).finish_non_exhaustive()
    }
}

impl AdminClient {
    /// A client for the server at `addr`.
    pub fn remote(addr: SocketAddr, token: Token) -> Self {
        Self { target: Target::Remote(addr), token }
    }

    /// A client calling `router` in-process, keeping `guard` alive as long as it.
    pub fn local(router: Router, token: Token, guard: impl std::any::Any + Send + Sync) -> Self {
        Self { target: Target::Local { router, _guard: Box::new(guard) }, token }
    }

    /// True if this client talks to a running server.
    pub fn is_remote(&self) -> bool {
        matches!(self.target, Target::Remote(_))
    }

    /// GET `path` as text (PEM endpoints).
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let body = self.call(Method::GET, path, None).await?;
        String::from_utf8(body.to_vec()).map_err(|e| ClientError::Http(e.to_string()))
    }

    /// GET `path`, read as `T`.
    pub async fn get_as<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let body = self.call(Method::GET, path, None).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Http(format!("answer of GET {path}: {e}")))
    }

    /// POST `body` as JSON to `path`, the answer read as `T`.
    pub async fn post_as<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, ClientError> {
        let json = serde_json::to_vec(body).map_err(|e| ClientError::Http(e.to_string()))?;
        let body = self.call(Method::POST, path, Some((Bytes::from(json), "application/json"))).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Http(format!("answer of POST {path}: {e}")))
    }

    /// Registers a device; its one-time enrollment token is in the answer.
    pub async fn register_device(
        &self,
        id: &str,
        group: Option<&str>,
        token_ttl: Option<&str>,
    ) -> Result<wire::DeviceRegistered, ClientError> {
        self.post_as("/v1/devices", &serde_json::json!({ "id": id, "group": group, "token_ttl": token_ttl }))
            .await
    }

    /// Another one-time enrollment token for a device.
    pub async fn new_token(&self, id: &str, ttl: Option<&str>) -> Result<wire::TokenIssued, ClientError> {
        self.post_as(&format!("/v1/devices/{}/tokens", component(id)), &serde_json::json!({ "ttl": ttl }))
            .await
    }

    /// Every device.
    pub async fn devices(&self) -> Result<wire::DeviceList, ClientError> {
        self.get_as("/v1/devices").await
    }

    /// One device with its certificates.
    pub async fn device(&self, id: &str) -> Result<wire::DeviceDetail, ClientError> {
        self.get_as(&format!("/v1/devices/{}", component(id))).await
    }

    /// `suspend`, `resume` or `revoke` a device.
    pub async fn change_device(
        &self,
        id: &str,
        action: &str,
        reason: Option<&str>,
    ) -> Result<wire::DeviceChanged, ClientError> {
        self.post_as(
            &format!("/v1/devices/{}/{action}", component(id)),
            &serde_json::json!({ "reason": reason }),
        )
        .await
    }

    /// Replaces a device's source addresses.
    pub async fn set_addresses(
        &self,
        id: &str,
        addresses: &[String],
    ) -> Result<wire::DeviceChanged, ClientError> {
        self.post_as(
            &format!("/v1/devices/{}/addresses", component(id)),
            &serde_json::json!({ "addresses": addresses }),
        )
        .await
    }

    /// Every certificate (newest first), optionally of one device.
    pub async fn certificates(&self, device: Option<&str>) -> Result<wire::CertificateList, ClientError> {
        match device {
            Some(d) => self.get_as(&format!("/v1/certificates?device={}", component(d))).await,
            None => self.get_as("/v1/certificates").await,
        }
    }

    /// One certificate.
    pub async fn certificate(&self, serial: &str) -> Result<wire::CertificateDetail, ClientError> {
        self.get_as(&format!("/v1/certificates/{}", component(serial))).await
    }

    /// Revokes one certificate with an RFC 5280 reason name.
    pub async fn revoke_certificate(
        &self,
        serial: &str,
        reason: &str,
        note: Option<&str>,
    ) -> Result<wire::CertificateRevoked, ClientError> {
        self.post_as(
            &format!("/v1/certificates/{}/revoke", component(serial)),
            &serde_json::json!({ "reason": reason, "note": note }),
        )
        .await
    }

    /// The DNS query log; `query` is the query string (with its `?`), if any.
    pub async fn dns_log(&self, query: &str) -> Result<wire::DnsLog, ClientError> {
        self.get_as(&format!("/v1/dns/log{query}")).await
    }

    /// The most often blocked names; `query` as for [`Self::dns_log`].
    pub async fn dns_top_blocked(&self, query: &str) -> Result<wire::TopBlocked, ClientError> {
        self.get_as(&format!("/v1/dns/top-blocked{query}")).await
    }

    /// The DNS policies and lists in force.
    pub async fn dns_policies(&self) -> Result<wire::DnsPolicies, ClientError> {
        self.get_as("/v1/dns/policies").await
    }

    /// The gateway's routes and their counts.
    pub async fn gateway_routes(&self) -> Result<wire::Routes, ClientError> {
        self.get_as("/v1/gateway/routes").await
    }

    /// Reloads the running server's configuration (`config`: the file the caller means).
    pub async fn reload(&self, config: Option<&std::path::Path>) -> Result<wire::Reloaded, ClientError> {
        self.post_as("/v1/gateway/reload", &serde_json::json!({ "config": config })).await
    }

    /// Saves a profile (a JSON document; the server checks and normalises it).
    pub async fn put_profile(&self, name: &str, profile: &Value) -> Result<wire::ProfileSaved, ClientError> {
        self.post_as("/v1/profiles", &serde_json::json!({ "name": name, "profile": profile })).await
    }

    /// Imports a MUD file (RFC 8520) as a profile.
    pub async fn import_mud(
        &self,
        name: Option<&str>,
        mud: &Value,
    ) -> Result<wire::ProfileSaved, ClientError> {
        self.post_as("/v1/profiles/import-mud", &serde_json::json!({ "name": name, "mud": mud })).await
    }

    /// Every profile and its devices.
    pub async fn profiles(&self) -> Result<wire::ProfileList, ClientError> {
        self.get_as("/v1/profiles").await
    }

    /// Assigns a profile to a device, or clears it.
    pub async fn set_device_profile(
        &self,
        id: &str,
        profile: Option<&str>,
    ) -> Result<wire::DeviceChanged, ClientError> {
        self.post_as(
            &format!("/v1/devices/{}/profile", component(id)),
            &serde_json::json!({ "profile": profile }),
        )
        .await
    }

    /// Starts an audit run (or plans one: `dry_run`); the request as the API takes it.
    pub async fn start_audit(&self, request: &Value) -> Result<wire::AuditStarted, ClientError> {
        self.post_as("/v1/audit/runs", request).await
    }

    /// One audit run (`latest`: the newest finished one).
    pub async fn audit_run(&self, id: &str) -> Result<wire::AuditRunDetail, ClientError> {
        self.get_as(&format!("/v1/audit/runs/{}", component(id))).await
    }

    /// Audit runs, newest first.
    pub async fn audit_runs(&self) -> Result<wire::AuditRuns, ClientError> {
        self.get_as("/v1/audit/runs").await
    }

    /// POST raw bytes (an upload) to `path`, the answer read as `T`.
    pub async fn post_bytes_as<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: Bytes,
    ) -> Result<T, ClientError> {
        let body = self.call(Method::POST, path, Some((body, "application/octet-stream"))).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Http(format!("answer of POST {path}: {e}")))
    }

    /// Publishes an image; `query` carries hardware, version, name (and notes, downgrade).
    pub async fn publish_firmware(
        &self,
        query: &str,
        image: Bytes,
    ) -> Result<wire::FirmwarePublished, ClientError> {
        self.post_bytes_as(&format!("/v1/firmware/targets?{query}"), image).await
    }

    /// Stages an image for a signed-offline import.
    pub async fn upload_firmware(&self, image: Bytes) -> Result<wire::FirmwareUploaded, ClientError> {
        self.post_bytes_as("/v1/firmware/uploads", image).await
    }

    /// Imports targets metadata signed offline (its images uploaded first).
    pub async fn import_firmware(&self, signed: Bytes) -> Result<wire::FirmwareTargets, ClientError> {
        self.post_bytes_as("/v1/firmware/import", signed).await
    }

    /// The published images.
    pub async fn firmware_targets(&self) -> Result<wire::FirmwareTargets, ClientError> {
        self.get_as("/v1/firmware/targets").await
    }

    /// The fleet view, optionally of one hardware model.
    pub async fn firmware_status(&self, hardware: Option<&str>) -> Result<wire::FleetStatus, ClientError> {
        match hardware {
            Some(h) => self.get_as(&format!("/v1/firmware/status?hardware={}", component(h))).await,
            None => self.get_as("/v1/firmware/status").await,
        }
    }

    /// Re-signs snapshot and timestamp if due.
    pub async fn refresh_firmware(&self) -> Result<wire::Refreshed, ClientError> {
        self.post_as("/v1/firmware/refresh", &serde_json::json!({})).await
    }

    /// Creates a rollout.
    pub async fn create_rollout(&self, request: &Value) -> Result<wire::RolloutStatus, ClientError> {
        self.post_as("/v1/firmware/rollouts", request).await
    }

    /// `advance`, `pause`, `resume` or `abort` a rollout.
    pub async fn change_rollout(&self, id: i64, action: &str) -> Result<wire::RolloutStatus, ClientError> {
        self.post_as(&format!("/v1/firmware/rollouts/{id}/{}", component(action)), &serde_json::json!({}))
            .await
    }

    /// One rollout.
    pub async fn rollout(&self, id: i64) -> Result<wire::RolloutStatus, ClientError> {
        self.get_as(&format!("/v1/firmware/rollouts/{id}")).await
    }

    /// Every rollout.
    pub async fn rollouts(&self) -> Result<wire::Rollouts, ClientError> {
        self.get_as("/v1/firmware/rollouts").await
    }

    /// The event log, optionally of one device.
    pub async fn events(&self, device: Option<&str>) -> Result<wire::EventList, ClientError> {
        match device {
            Some(d) => self.get_as(&format!("/v1/events?device={}", component(d))).await,
            None => self.get_as("/v1/events").await,
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &str)>,
    ) -> Result<Bytes, ClientError> {
        let host = match &self.target {
            Target::Remote(a) => a.to_string(),
            Target::Local { .. } => "localhost".to_owned(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, host)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token.expose()));
        let payload = match body {
            Some((bytes, content_type)) => {
                req = req.header(header::CONTENT_TYPE, content_type);
                bytes
            }
            None => Bytes::new(),
        };
        let (status, bytes) = match &self.target {
            Target::Remote(addr) => {
                let req = req.body(Full::new(payload)).map_err(|e| ClientError::Http(e.to_string()))?;
                let tcp = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|source| ClientError::Connect { addr: *addr, source })?;
                let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .map_err(|e| ClientError::Http(e.to_string()))?;
                tokio::spawn(conn);
                let resp = send.send_request(req).await.map_err(|e| ClientError::Http(e.to_string()))?;
                let status = resp.status();
                let bytes = resp.into_body().collect().await.map_err(|e| ClientError::Http(e.to_string()))?;
                (status, bytes.to_bytes())
            }
            Target::Local { router, .. } => {
                let req = req
                    .body(axum::body::Body::from(payload))
                    .map_err(|e| ClientError::Http(e.to_string()))?;
                let resp = router.clone().oneshot(req).await.map_err(|e| ClientError::Http(e.to_string()))?;
                let status = resp.status();
                let bytes = resp.into_body().collect().await.map_err(|e| ClientError::Http(e.to_string()))?;
                (status, bytes.to_bytes())
            }
        };
        if status.is_success() {
            return Ok(bytes);
        }
        let detail = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("detail").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
        Err(ClientError::Problem { status: status.as_u16(), detail })
    }
}

impl ClientError {
    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Problem { status, .. } => StatusCode::from_u16(*status).ok(),
            _ => None,
        }
    }
}

/// One path segment or query value, percent-encoded (ids and serials are plain, but the
/// CLI passes whatever the operator typed). RFC 3986 unreserved characters stay.
pub fn component(v: &str) -> String {
    const UNRESERVED: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
    percent_encoding::utf8_percent_encode(v, UNRESERVED).to_string()
}
