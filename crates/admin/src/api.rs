use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{StatusCode, header};
use portcullis_audit::{AuditError, AuditRequest, Auditor, Profile, Started};
use portcullis_core::{DeviceId, DeviceState, GroupName, Token, TokenHash, parse_duration};
use portcullis_http::Problem;

use crate::wire;
use portcullis_pki::{Authority, est};
use portcullis_store::{Actor, EventFilter};
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;

/// Who may call the admin API: the admin bearer token, held only as its hash, and
/// optionally a scrape token that may read `/metrics` and nothing else.
#[derive(Clone)]
pub struct AdminToken {
    admin: TokenHash,
    scrape: Option<Arc<ScrapeToken>>,
}

impl AdminToken {
    /// Accepts requests bearing `token`.
    pub fn new(token: &Token) -> Self {
        Self { admin: token.hash(), scrape: None }
    }

    /// Also accepts, for `GET /metrics` only, the token in the file at `path` (what a
    /// Prometheus `bearer_token_file` points at). The file is re-read when it changes,
    /// so rotating it takes effect without a restart; only its hash is kept.
    pub fn with_scrape_token_file(mut self, path: PathBuf) -> Self {
        self.scrape = Some(Arc::new(ScrapeToken { path, cached: Mutex::new(None) }));
        self
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// The scrape token file and the hash of what it held when last read.
struct ScrapeToken {
    path: PathBuf,
    cached: Mutex<Option<(SystemTime, u64, TokenHash)>>,
}

impl ScrapeToken {
    /// True if `presented` is the token the file holds now.
    fn accepts(&self, presented: &TokenHash) -> bool {
        let Ok(meta) = std::fs::metadata(&self.path) else { return false };
        let stamp = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len());
        let mut cached = self.cached.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let fresh = cached.as_ref().is_some_and(|(m, l, _)| (*m, *l) == stamp);
        if !fresh {
            let Ok(text) = std::fs::read_to_string(&self.path) else { return false };
            let text = text.trim();
            if text.is_empty() {
                *cached = None;
                return false;
            }
            *cached = Some((stamp.0, stamp.1, Token::from_presented(text).hash()));
        }
        cached.as_ref().is_some_and(|(_, _, h)| presented.matches(h))
    }
}

/// Re-reads the configuration the server runs with and hands each service its part.
/// The binary implements it: only it knows the file format.
pub trait Reload: Send + Sync {
    /// Reloads; returns how many gateway routes are in force. On error nothing changed.
    fn reload(&self) -> Result<usize, Box<dyn std::error::Error + Send + Sync>>;
}

/// The services of a running `portcullis up` that the admin API describes and reloads.
#[derive(Clone)]
pub struct Running {
    /// The device port's gateway (routes and their counters).
    pub gateway: Arc<portcullis_gateway::Gateway>,
    /// The DNS service, when the DNS port runs.
    pub dns: Option<Arc<portcullis_dns::Dns>>,
    /// Re-reads the configuration; on error the previous one keeps serving.
    pub reload: Arc<dyn Reload>,
    /// The configuration file the server runs with and reloads (absolute); `None` when
    /// it runs on the embedded defaults.
    pub config: Option<PathBuf>,
}

impl fmt::Debug for Running {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Running").field("dns", &self.dns.is_some()).field("config", &self.config).finish()
    }
}

#[derive(Clone)]
struct AppState {
    authority: Arc<Authority>,
    audit: Arc<Auditor>,
    actor: Actor,
    running: Option<Running>,
}

/// The admin API. `operator` names who acts in the event log; `running` is present when
/// the API runs inside `portcullis up`.
pub fn router(
    authority: Arc<Authority>,
    token: AdminToken,
    operator: &str,
    running: Option<Running>,
    audit: Arc<Auditor>,
    firmware: Arc<portcullis_firmware::service::Firmware>,
) -> Router {
    let actor = Actor::Operator(operator.to_owned());
    let fw = crate::firmware::routes(crate::firmware::FwState { firmware, actor: actor.clone() });
    let state = AppState { authority, audit, actor, running };
    let big = || axum::extract::DefaultBodyLimit::max(1 << 20);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/devices", get(list_devices).post(add_device))
        .route("/v1/devices/{id}", get(show_device))
        .route("/v1/devices/{id}/suspend", post(suspend))
        .route("/v1/devices/{id}/resume", post(resume))
        .route("/v1/devices/{id}/revoke", post(revoke))
        .route("/v1/devices/{id}/tokens", post(new_token))
        .route("/v1/devices/{id}/addresses", post(set_addresses))
        .route("/v1/devices/{id}/profile", post(set_profile))
        .route("/v1/profiles", get(list_profiles).post(put_profile))
        .route("/v1/profiles/import-mud", post(import_mud).layer(big()))
        .route("/v1/audit/runs", get(audit_runs).post(audit_start).layer(big()))
        .route("/v1/audit/runs/{id}", get(audit_run))
        .route("/v1/audit/runs/{id}/report", get(audit_report))
        .route("/v1/audit/findings", get(audit_findings))
        .route("/v1/dns/log", get(dns_log))
        .route("/v1/dns/policies", get(dns_policies))
        .route("/v1/dns/top-blocked", get(dns_top_blocked))
        .route("/v1/certificates", get(list_certificates))
        .route("/v1/certificates/{serial}", get(show_certificate))
        .route("/v1/certificates/{serial}/revoke", post(revoke_certificate))
        .route("/v1/groups", get(list_groups))
        .route("/v1/events", get(list_events))
        .route("/v1/ca/root", get(ca_root))
        .route("/v1/ca/chain", get(ca_chain))
        .route("/v1/ca/crl", get(ca_crl))
        .route("/v1/gateway/routes", get(gateway_routes))
        .route("/v1/gateway/reload", post(gateway_reload))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .fallback(not_found)
        .with_state(state)
        .merge(fw)
        .layer(middleware::from_fn_with_state(Arc::new(token), require_token))
}

/// Paths answered without a token: liveness and readiness, for container health checks
/// and load balancers (they say nothing a caller could use).
const OPEN_PATHS: [&str; 2] = ["/healthz", "/readyz"];

async fn require_token(State(expected): State<Arc<AdminToken>>, req: Request, next: Next) -> Response {
    if req.method() == http::Method::GET && OPEN_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(|t| Token::from_presented(t.trim()).hash());
    match presented {
        Some(h) if h.matches(&expected.admin) => next.run(req).await,
        Some(h)
            if req.method() == http::Method::GET
                && req.uri().path() == "/metrics"
                && expected.scrape.as_ref().is_some_and(|s| s.accepts(&h)) =>
        {
            next.run(req).await
        }
        Some(_) => {
            tracing::warn!(path = ?req.uri().path(), "admin API: wrong bearer token");
            unauthorized("wrong bearer token")
        }
        None => unauthorized("missing bearer token (Authorization: Bearer <token from admin.token>)"),
    }
}

fn unauthorized(detail: &str) -> Response {
    let mut r = Problem::new(StatusCode::UNAUTHORIZED, "admin-token", detail).into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
    r
}

async fn not_found(req: Request) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not-found",
        format!("no such endpoint: {} {}", req.method(), req.uri().path()),
    )
}

/// `Json<T>` whose rejections are problem documents.
struct Body<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // An empty body means "all defaults".
        let empty = req.headers().get(header::CONTENT_LENGTH).is_some_and(|v| v == "0");
        if empty {
            return serde_json::from_value(json!({})).map(Body).map_err(|e| {
                Problem::new(StatusCode::BAD_REQUEST, "invalid-body", format!("request body required: {e}"))
            });
        }
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(e) => {
                let status = match &e {
                    JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    _ => e.status(),
                };
                Err(Problem::new(status, "invalid-body", e.body_text()))
            }
        }
    }
}

fn device_id(raw: &str) -> Result<DeviceId, Problem> {
    DeviceId::try_new(raw).map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid-name", e.to_string()))
}

fn duration(raw: Option<&str>, key: &str) -> Result<Option<Duration>, Problem> {
    raw.map(|s| {
        parse_duration(s)
            .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid-duration", format!("{key}: {e}")))
    })
    .transpose()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

fn err(e: portcullis_pki::Error) -> Problem {
    est::problem(&e)
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        s.authority.metrics().encode(),
    )
        .into_response()
}

/// Liveness: the process answers. No token.
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: the registry store answers (every request the server serves needs it).
/// No token; 503 when not ready.
async fn readyz(State(s): State<AppState>) -> Result<Json<Value>, Problem> {
    // One indexed lookup: the store answers, whatever the fleet's size.
    let probe = DeviceId::try_new("readiness-probe").map_err(|_| {
        Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "readiness probe id rejected")
    })?;
    s.authority.store().device(&probe).await.map_err(|e| {
        tracing::error!(error = %e, "readiness check: store unavailable");
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", "registry store unavailable")
    })?;
    Ok(Json(json!({ "status": "ready" })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddDevice {
    id: String,
    group: Option<String>,
    token_ttl: Option<String>,
}

async fn add_device(State(s): State<AppState>, Body(req): Body<AddDevice>) -> Result<Response, Problem> {
    let id = device_id(&req.id)?;
    let group = req
        .group
        .map(GroupName::try_new)
        .transpose()
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid-name", e.to_string()))?;
    let ttl = duration(req.token_ttl.as_deref(), "token_ttl")?;
    let r = s.authority.register(id, group, ttl, s.actor.clone()).await.map_err(err)?;
    let body = wire::DeviceRegistered {
        spiffe_id: s.authority.trust_domain().device_uri(&r.device.id),
        device: r.device,
        token: r.token.expose().to_owned(),
        token_expires_at: rfc3339(r.token_expires_at),
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn list_devices(State(s): State<AppState>) -> Result<Json<wire::DeviceList>, Problem> {
    let devices = s.authority.store().devices().await.map_err(|e| err(e.into()))?;
    Ok(Json(wire::DeviceList { devices }))
}

async fn show_device(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<wire::DeviceDetail>, Problem> {
    let id = device_id(&id)?;
    let store = s.authority.store();
    let device =
        store.device(&id).await.map_err(|e| err(e.into()))?.ok_or_else(|| {
            Problem::new(StatusCode::NOT_FOUND, "not-found", format!("device {id} not found"))
        })?;
    let certs = store.certificates(Some(&id)).await.map_err(|e| err(e.into()))?;
    Ok(Json(wire::DeviceDetail {
        device,
        spiffe_id: s.authority.trust_domain().device_uri(&id),
        certificates: certs,
    }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StateChange {
    reason: Option<String>,
}

async fn change(
    s: AppState,
    id: String,
    to: DeviceState,
    reason: Option<String>,
) -> Result<Json<wire::DeviceChanged>, Problem> {
    let id = device_id(&id)?;
    if reason.as_ref().is_some_and(|r| r.len() > 1024) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-body",
            "reason is longer than 1024 bytes",
        ));
    }
    let device = s.authority.set_state(&id, to, reason, s.actor.clone()).await.map_err(err)?;
    Ok(Json(wire::DeviceChanged { device }))
}

async fn suspend(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Body(b): Body<StateChange>,
) -> Result<Json<wire::DeviceChanged>, Problem> {
    change(s, id, DeviceState::Suspended, b.reason).await
}

async fn resume(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Body(b): Body<StateChange>,
) -> Result<Json<wire::DeviceChanged>, Problem> {
    change(s, id, DeviceState::Active, b.reason).await
}

async fn revoke(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Body(b): Body<StateChange>,
) -> Result<Json<wire::DeviceChanged>, Problem> {
    change(s, id, DeviceState::Revoked, b.reason).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewToken {
    ttl: Option<String>,
}

async fn new_token(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Body(b): Body<NewToken>,
) -> Result<Response, Problem> {
    let id = device_id(&id)?;
    let ttl = duration(b.ttl.as_deref(), "ttl")?;
    let (token, expires) = s.authority.new_token(&id, ttl, s.actor.clone()).await.map_err(err)?;
    let body = wire::TokenIssued {
        device: id,
        token: token.expose().to_owned(),
        token_expires_at: rfc3339(expires),
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Addresses {
    addresses: Vec<String>,
}

async fn set_addresses(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Body(b): Body<Addresses>,
) -> Result<Json<wire::DeviceChanged>, Problem> {
    let id = device_id(&id)?;
    if b.addresses.len() > 256 {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-body",
            "at most 256 addresses per device",
        ));
    }
    let mut parsed = Vec::with_capacity(b.addresses.len());
    for a in &b.addresses {
        parsed.push(
            a.parse::<portcullis_core::Cidr>().map_err(|e| {
                Problem::new(StatusCode::BAD_REQUEST, "invalid-body", format!("addresses: {e}"))
            })?,
        );
    }
    let device = s.authority.set_addresses(&id, &parsed, s.actor.clone()).await.map_err(err)?;
    Ok(Json(wire::DeviceChanged { device }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DnsLogQuery {
    device: Option<String>,
    blocked: Option<bool>,
    /// RFC 3339 time, or a duration back from now (`1h`, `7d`).
    since: Option<String>,
    limit: Option<u32>,
}

impl DnsLogQuery {
    fn filter(&self) -> Result<portcullis_store::DnsQueryFilter, Problem> {
        let since = match self.since.as_deref() {
            None => None,
            Some(v) => Some(
                time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
                    .ok()
                    .or_else(|| {
                        portcullis_core::parse_duration(v).ok().map(|d| time::OffsetDateTime::now_utc() - d)
                    })
                    .ok_or_else(|| {
                        Problem::new(
                            StatusCode::BAD_REQUEST,
                            "invalid-query",
                            "since: expected an RFC 3339 time or a duration like 1h",
                        )
                    })?,
            ),
        };
        Ok(portcullis_store::DnsQueryFilter {
            device: self.device.as_deref().map(device_id).transpose()?.map(|d| d.to_string()),
            blocked_only: self.blocked.unwrap_or(false),
            since,
            limit: self.limit,
        })
    }
}

async fn dns_policies(
    State(s): State<AppState>,
) -> Result<Json<portcullis_dns::service::DnsPolicies>, Problem> {
    match running(&s)?.dns.as_ref() {
        Some(dns) => Ok(Json(dns.describe())),
        None => {
            Err(Problem::new(StatusCode::SERVICE_UNAVAILABLE, "dns-not-running", "the DNS port is disabled"))
        }
    }
}

async fn dns_log(
    State(s): State<AppState>,
    Query(q): Query<DnsLogQuery>,
) -> Result<Json<wire::DnsLog>, Problem> {
    let queries = s.authority.store().dns_queries(q.filter()?).await.map_err(|e| err(e.into()))?;
    Ok(Json(wire::DnsLog { queries }))
}

async fn dns_top_blocked(
    State(s): State<AppState>,
    Query(q): Query<DnsLogQuery>,
) -> Result<Json<wire::TopBlocked>, Problem> {
    let top_blocked = s.authority.store().dns_top_blocked(q.filter()?).await.map_err(|e| err(e.into()))?;
    Ok(Json(wire::TopBlocked { top_blocked }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertQuery {
    device: Option<String>,
}

async fn list_certificates(
    State(s): State<AppState>,
    Query(q): Query<CertQuery>,
) -> Result<Json<wire::CertificateList>, Problem> {
    let device = q.device.as_deref().map(device_id).transpose()?;
    let certificates = s.authority.store().certificates(device.as_ref()).await.map_err(|e| err(e.into()))?;
    Ok(Json(wire::CertificateList { certificates }))
}

fn serial(s: &str) -> Result<portcullis_core::Serial, Problem> {
    portcullis_core::Serial::parse(s).ok_or_else(|| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-serial",
            format!("{s:?} is not a certificate serial (hex)"),
        )
    })
}

async fn show_certificate(
    State(s): State<AppState>,
    Path(sn): Path<String>,
) -> Result<Json<wire::CertificateDetail>, Problem> {
    let sn = serial(&sn)?;
    let status = s.authority.store().certificate(&sn).await.map_err(store_err)?.ok_or_else(|| {
        Problem::new(StatusCode::NOT_FOUND, "not-found", format!("certificate {sn} not found"))
    })?;
    Ok(Json(wire::CertificateDetail {
        pem: portcullis_pki::pem_encode("CERTIFICATE", &status.certificate.der),
        certificate: status.certificate,
        device_state: status.device_state,
        group: status.group,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeCertificate {
    /// An RFC 5280 reason name.
    reason: String,
    note: Option<String>,
}

async fn revoke_certificate(
    State(s): State<AppState>,
    Path(sn): Path<String>,
    Body(req): Body<RevokeCertificate>,
) -> Result<Json<wire::CertificateRevoked>, Problem> {
    let sn = serial(&sn)?;
    let certificate =
        s.authority.revoke_certificate(&sn, &req.reason, req.note, s.actor.clone()).await.map_err(err)?;
    Ok(Json(wire::CertificateRevoked { revoked: true, certificate }))
}

async fn list_groups(State(s): State<AppState>) -> Result<Json<wire::GroupList>, Problem> {
    let groups = s.authority.store().groups().await.map_err(|e| err(e.into()))?;
    Ok(Json(wire::GroupList { groups }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventQuery {
    device: Option<String>,
    after: Option<i64>,
    limit: Option<u32>,
}

async fn list_events(
    State(s): State<AppState>,
    Query(q): Query<EventQuery>,
) -> Result<Json<wire::EventList>, Problem> {
    let filter = EventFilter {
        device: q.device.as_deref().map(device_id).transpose()?,
        after_id: q.after,
        limit: q.limit,
    };
    let events = s.authority.store().events(filter).await.map_err(|e| err(e.into()))?;
    Ok(Json(wire::EventList { events }))
}

fn running(s: &AppState) -> Result<&Running, Problem> {
    s.running.as_ref().ok_or_else(|| {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "gateway-not-running",
            "the gateway runs only inside `portcullis up`",
        )
    })
}

async fn gateway_routes(State(s): State<AppState>) -> Result<Json<portcullis_gateway::Routes>, Problem> {
    Ok(Json(running(&s)?.gateway.describe()))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReloadRequest {
    /// The file the caller means (absolute): refused unless it is the server's own.
    config: Option<PathBuf>,
}

async fn gateway_reload(
    State(s): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Json<wire::Reloaded>, Problem> {
    let hooks = running(&s)?;
    let asked: ReloadRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ReloadRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            Problem::new(StatusCode::BAD_REQUEST, "bad-request", format!("reload request: {e}"))
        })?
    };
    if let Some(asked) = &asked.config
        && hooks.config.as_ref() != Some(asked)
    {
        // The server cannot adopt another file: listen addresses, data dir and
        // listeners come from the one it started with.
        let running = match &hooks.config {
            Some(p) => format!("was started with {} and reloads only that file", p.display()),
            None => "was started without --config (embedded defaults) and has no file to reload".to_owned(),
        };
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "config-mismatch",
            format!(
                "not reloaded: the server {running}; to run with {asked}, stop it and start it with \
                 `portcullis --config {asked} up`",
                asked = asked.display()
            ),
        ));
    }
    let config = hooks.config.as_ref().map(|p| p.display().to_string());
    match hooks.reload.reload() {
        Ok(routes) => Ok(Json(wire::Reloaded { reloaded: true, routes, config })),
        Err(e) => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "reload-failed",
            format!("configuration not reloaded, previous routes keep serving: {e}"),
        )),
    }
}

fn pem(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/x-pem-file")], body).into_response()
}

async fn ca_root(State(s): State<AppState>) -> Response {
    pem(s.authority.ca().root_pem())
}

async fn ca_chain(State(s): State<AppState>) -> Response {
    pem(format!("{}{}", s.authority.ca().issuing_pem(), s.authority.ca().root_pem()))
}

async fn ca_crl(State(s): State<AppState>) -> Response {
    pem(s.authority.crl_pem())
}

fn store_err(e: portcullis_store::Error) -> Problem {
    match e {
        portcullis_store::Error::NotFound { .. } => {
            Problem::new(StatusCode::NOT_FOUND, "not-found", e.to_string())
        }
        other => err(other.into()),
    }
}

async fn list_profiles(State(s): State<AppState>) -> Result<Json<wire::ProfileList>, Problem> {
    let profiles = s.authority.store().profiles().await.map_err(store_err)?;
    let devices = s.authority.store().devices().await.map_err(store_err)?;
    let profiles = profiles
        .into_iter()
        .map(|p| wire::ProfileUse {
            devices: devices
                .iter()
                .filter(|d| d.profile.as_deref() == Some(p.name.as_str()))
                .map(|d| d.id.to_string())
                .collect(),
            updated_at: rfc3339(p.updated_at),
            name: p.name,
            profile: p.document,
        })
        .collect();
    Ok(Json(wire::ProfileList { profiles }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutProfile {
    name: String,
    profile: Value,
}

fn checked_profile(name: &str, doc: Value) -> Result<Profile, Problem> {
    let bad = |e: String| Problem::new(StatusCode::BAD_REQUEST, "invalid-profile", e);
    portcullis_audit::profile::check_name(name).map_err(bad)?;
    let p: Profile = serde_json::from_value(doc).map_err(|e| bad(format!("profile: {e}")))?;
    p.checked().map_err(bad)
}

async fn put_profile(State(s): State<AppState>, Body(b): Body<PutProfile>) -> Result<Response, Problem> {
    let doc = checked_profile(&b.name, b.profile)?;
    let rec = s.authority.store().put_profile(&b.name, doc, s.actor.clone()).await.map_err(store_err)?;
    let saved = wire::ProfileSaved { name: rec.name, profile: rec.document, warnings: Vec::new() };
    Ok((StatusCode::CREATED, Json(saved)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportMud {
    name: Option<String>,
    mud: Value,
}

async fn import_mud(State(s): State<AppState>, Body(b): Body<ImportMud>) -> Result<Response, Problem> {
    let bytes = serde_json::to_vec(&b.mud).unwrap_or_default();
    let imported = portcullis_audit::mud::import(&bytes)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid-mud", e.to_string()))?;
    let name = b.name.unwrap_or(imported.suggested_name);
    let doc = checked_profile(&name, serde_json::to_value(&imported.profile).unwrap_or_default())?;
    let rec = s.authority.store().put_profile(&name, doc, s.actor.clone()).await.map_err(store_err)?;
    let saved = wire::ProfileSaved { name: rec.name, profile: rec.document, warnings: imported.warnings };
    Ok((StatusCode::CREATED, Json(saved)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetProfile {
    profile: Option<String>,
}

async fn set_profile(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Body(b): Body<SetProfile>,
) -> Result<Json<wire::DeviceChanged>, Problem> {
    let id = device_id(&id)?;
    let device = s
        .authority
        .store()
        .set_device_profile(&id, b.profile.as_deref(), s.actor.clone())
        .await
        .map_err(store_err)?;
    Ok(Json(wire::DeviceChanged { device }))
}

fn audit_err(e: AuditError) -> Problem {
    match e {
        AuditError::Refused(m) => Problem::new(StatusCode::BAD_REQUEST, "audit-refused", m),
        AuditError::Busy(_) => Problem::new(StatusCode::CONFLICT, "audit-busy", e.to_string()),
        AuditError::Store(e) => store_err(e),
    }
}

async fn audit_start(State(s): State<AppState>, Body(req): Body<AuditRequest>) -> Result<Response, Problem> {
    match s.audit.start(req, s.actor.clone()).await.map_err(audit_err)? {
        Started::Run(run) => {
            let started = wire::AuditStarted::Run { run, status: "running".into() };
            Ok((StatusCode::ACCEPTED, Json(started)).into_response())
        }
        Started::Plan(plan) => Ok(Json(wire::AuditStarted::Plan { dry_run: true, plan }).into_response()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    limit: Option<u32>,
}

async fn audit_runs(
    State(s): State<AppState>,
    Query(q): Query<RunsQuery>,
) -> Result<Json<wire::AuditRuns>, Problem> {
    let runs = s.authority.store().audit_runs(q.limit.unwrap_or(20)).await.map_err(store_err)?;
    Ok(Json(wire::AuditRuns { runs }))
}

async fn load_run(
    s: &AppState,
    id: &str,
) -> Result<(portcullis_store::AuditRunRecord, Vec<portcullis_store::FindingRecord>), Problem> {
    let store = s.authority.store();
    let id = if id == "latest" {
        store
            .audit_runs(50)
            .await
            .map_err(store_err)?
            .into_iter()
            .find(|r| r.status == "finished")
            .map(|r| r.id)
            .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, "not-found", "no finished audit run yet"))?
    } else {
        id.parse::<i64>().map_err(|_| {
            Problem::new(StatusCode::BAD_REQUEST, "invalid-name", format!("run {id:?} is not a run id"))
        })?
    };
    store
        .audit_run(id)
        .await
        .map_err(store_err)?
        .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, "not-found", format!("audit run {id} not found")))
}

async fn audit_run(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<wire::AuditRunDetail>, Problem> {
    let (run, findings) = load_run(&s, &id).await?;
    let progress = s.audit.progress(run.id);
    Ok(Json(wire::AuditRunDetail { run, progress, findings }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportQuery {
    format: Option<String>,
}

async fn audit_report(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<ReportQuery>,
) -> Result<Response, Problem> {
    let format: portcullis_audit::report::Format = q
        .format
        .as_deref()
        .unwrap_or("markdown")
        .parse()
        .map_err(|e: String| Problem::new(StatusCode::BAD_REQUEST, "invalid-query", e))?;
    let (run, findings) = load_run(&s, &id).await?;
    let body = portcullis_audit::report::render(&run, &findings, format);
    let ct = match format {
        portcullis_audit::report::Format::Json => "application/json",
        portcullis_audit::report::Format::Markdown => "text/markdown; charset=utf-8",
        portcullis_audit::report::Format::Html => "text/html; charset=utf-8",
    };
    Ok(([(header::CONTENT_TYPE, ct)], body).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FindingsQuery {
    device: Option<String>,
}

async fn audit_findings(
    State(s): State<AppState>,
    Query(q): Query<FindingsQuery>,
) -> Result<Json<wire::OpenFindings>, Problem> {
    let (run, findings) = load_run(&s, "latest").await?;
    let open: Vec<_> = findings
        .into_iter()
        .filter(|f| f.status != "resolved" && q.device.as_deref().is_none_or(|d| d == f.device))
        .collect();
    Ok(Json(wire::OpenFindings { run: run.id, findings: open }))
}
