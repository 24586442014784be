//! Authenticated reverse proxying: route by longest prefix, authenticate the device
//! against the live registry, check its group and rate, strip every header the gateway
//! owns, set the identity headers, forward with pooled connections.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use portcullis_http::Problem;
use portcullis_pki::{AuthenticatedDevice, Authority, PeerCertificate, est};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use crate::openapi::{Action, Caller, Violation};
use crate::outcome::{Outcome, RequestLabels, RouteCounters};
use crate::upstream::Outgoing;
use portcullis_net::{Limiter, Rate};

pub(crate) use crate::route::*;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

/// Gateway metrics, registered beside the CA's.
struct GatewayMetrics {
    requests: Family<RequestLabels, Counter>,
    violations: Family<RequestLabels, Counter>,
    latency: Family<RouteLabel, Histogram>,
    /// Requests that matched no route.
    no_route: Counter,
    /// Device-port workers: each route keeps one upstream pool per worker.
    workers: usize,
}

impl GatewayMetrics {
    /// Points each route's hot-path handles at its series in the families, and gives it
    /// one upstream pool per worker.
    fn bind(&self, table: &mut RouteTable) {
        for r in &mut table.routes {
            let route = r.cfg.prefix.clone();
            r.counters = RouteCounters::bind(&route, &self.requests, &self.violations);
            r.latency = self.latency.get_or_create(&RouteLabel { route }).clone();
            r.upstream.size_pools(self.workers);
        }
    }
}

/// The routes in force, as the admin API describes them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Routes {
    /// Longest prefix first (the order they are matched in).
    pub routes: Vec<RouteView>,
}

/// One route: its configuration, its OpenAPI document, and its counts.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RouteView {
    /// Path prefix.
    pub prefix: String,
    /// Upstream URL.
    pub upstream: String,
    /// Groups allowed (empty: all).
    pub groups: Vec<String>,
    /// Per-device rate.
    pub rate_limit: Option<RateView>,
    /// Largest request body.
    pub max_body_bytes: u64,
    /// Upstream timeout.
    pub timeout_ms: u64,
    /// Whether the client certificate is passed on (RFC 9440).
    pub client_cert_header: bool,
    /// Forwarding headers set.
    pub forwarded: crate::Forwarded,
    /// Identity-binding templates.
    pub bind_device: Vec<String>,
    /// The OpenAPI document's file.
    pub openapi: Option<String>,
    /// Its OpenAPI version.
    pub openapi_version: Option<String>,
    /// The base path its paths are under.
    pub openapi_base: Option<String>,
    /// How many operations it has.
    pub operations: Option<usize>,
    /// `block` or `log`.
    pub action: Action,
    /// Unknown query parameters refused.
    pub strict_query: bool,
    /// Requests by outcome (rejections grouped by reason; `violations_logged` counts
    /// violations forwarded in log mode).
    pub counts: std::collections::BTreeMap<String, u64>,
}

/// A rate as configured.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct RateView {
    /// Sustained requests per second.
    pub per_second: f64,
    /// Burst on top.
    pub burst: u32,
}

impl std::fmt::Debug for GatewayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayMetrics")
    }
}

/// The gateway: the current route table, a pooled upstream client, and the per-IP
/// limit on requests that fail authentication.
#[derive(Debug)]
pub struct Gateway {
    unauthenticated: Option<Limiter<IpAddr>>,
    table: RwLock<Arc<RouteTable>>,
    authority: Arc<Authority>,
    metrics: GatewayMetrics,
}

impl Gateway {
    /// A gateway over `table` that authenticates with `authority`; requests that fail
    /// authentication are limited to `unauthenticated_per_ip` per source address.
    /// `workers` is the device port's (`device.workers`; 0: one per CPU).
    pub fn new(
        authority: Arc<Authority>,
        table: RouteTable,
        unauthenticated_per_ip: Option<Rate>,
        workers: usize,
    ) -> Self {
        let requests: Family<RequestLabels, Counter> = Family::default();
        let no_route =
            requests.get_or_create(&RequestLabels { route: "none".into(), outcome: "no_route" }).clone();
        let metrics = GatewayMetrics {
            requests,
            no_route,
            workers: crate::listener::worker_count(workers),
            violations: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new([
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                ])
            }),
        };
        authority.metrics().register(|r| {
            r.register("gateway_requests", "Gateway requests by route and outcome", metrics.requests.clone());
            r.register(
                "gateway_violations_logged",
                "OpenAPI violations forwarded in log (shadow) mode, by route and reason",
                metrics.violations.clone(),
            );
            r.register(
                "gateway_request_duration_seconds",
                "Gateway request latency by route, upstream included",
                metrics.latency.clone(),
            );
        });
        let mut table = table;
        metrics.bind(&mut table);
        Self {
            unauthenticated: unauthenticated_per_ip.map(|r| Limiter::new(r, 100_000)),
            table: RwLock::new(Arc::new(table)),
            authority,
            metrics,
        }
    }

    /// The authority that authenticates devices (and holds the metrics registry).
    pub(crate) fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Swaps in a new table; requests in flight finish on the old one.
    pub fn replace(&self, mut table: RouteTable) {
        self.metrics.bind(&mut table);
        if let Ok(mut t) = self.table.write() {
            *t = Arc::new(table);
        }
    }

    fn current(&self) -> Arc<RouteTable> {
        self.table.read().map(|t| t.clone()).unwrap_or_default()
    }

    /// Closes the calling worker's idle upstream connections that timed out or that their
    /// upstream closed.
    pub(crate) fn evict_idle(&self) {
        for route in &self.current().routes {
            route.upstream.evict_idle();
        }
    }

    /// The routes and their counters, for the admin API.
    pub fn describe(&self) -> Routes {
        let table = self.current();
        let routes = table
            .routes
            .iter()
            .map(|r| RouteView {
                prefix: r.cfg.prefix.clone(),
                upstream: r.cfg.upstream.clone(),
                groups: r.cfg.groups.iter().map(ToString::to_string).collect(),
                rate_limit: r.cfg.rate.map(|x| RateView { per_second: x.per_second, burst: x.burst }),
                max_body_bytes: r.cfg.max_body_bytes,
                timeout_ms: r.cfg.timeout.as_millis() as u64,
                client_cert_header: r.cfg.client_cert_header,
                forwarded: r.cfg.forwarded,
                bind_device: r.cfg.bind_device.clone(),
                openapi: r.cfg.openapi.as_ref().map(|p| p.display().to_string()),
                openapi_version: r.spec.as_ref().map(|s| s.version().to_owned()),
                openapi_base: r.spec.as_ref().map(|s| s.base_path().to_owned()),
                operations: r.spec.as_ref().map(|s| s.operations()),
                action: r.cfg.action,
                strict_query: r.cfg.strict_query,
                counts: r.counters.describe(),
            })
            .collect();
        Routes { routes }
    }
}

/// Why a request path is refused before any decision is made on it; `None` for a
/// canonical path.
///
/// Every decision (routing, identity binding, OpenAPI matching) and the upstream must see
/// the same path, so every form that some backend normalises into something else is
/// refused with 400 rather than canonicalised: dot and empty segments, backslashes,
/// `;` path parameters (Tomcat and Spring strip them: `/api/..;/admin` walks upward
/// there), percent-encoded `/`, `\`, `.`, other unreserved characters (`%64evices` is
/// `devices` to every backend) and control characters, and malformed escapes. What
/// passes has escapes only for characters that mean the same encoded or not to every
/// RFC 3986 normaliser, so the raw path is the canonical one.
fn path_problem(path: &str) -> Option<&'static str> {
    let b = path.as_bytes();
    let dots = |seg: &[u8]| seg == b"." || seg == b"..";
    // Start of the current segment: just after the last '/'.
    let mut seg = 0;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'\\' => return Some("path contains a backslash"),
            b';' => return Some("path parameters (';') are not accepted"),
            b'%' => {
                let hex = |j: usize| b.get(j).and_then(|&h| char::from(h).to_digit(16));
                let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
                    return Some("path contains a malformed percent escape");
                };
                let decoded = (hi * 16 + lo) as u8;
                if matches!(decoded, b'/' | b'\\' | b'.' | b';') {
                    return Some("path contains an encoded '/', '\\', '.' or ';'");
                }
                if decoded.is_ascii_alphanumeric() || matches!(decoded, b'-' | b'_' | b'~') {
                    return Some("path contains a percent-encoded unreserved character; send it unencoded");
                }
                if decoded < 0x20 || decoded == 0x7f {
                    return Some("path contains an encoded control character");
                }
            }
            b'/' => {
                // An empty segment between two slashes, or a dot segment.
                if (i > 0 && seg == i) || dots(&b[seg..i]) {
                    return Some("path contains dot segments or empty segments");
                }
                seg = i + 1;
            }
            _ => {}
        }
    }
    dots(&b[seg..]).then_some("path contains dot segments or empty segments")
}

const X_PORTCULLIS_DEVICE: HeaderName = HeaderName::from_static("x-portcullis-device");
const X_PORTCULLIS_GROUP: HeaderName = HeaderName::from_static("x-portcullis-group");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const CLIENT_CERT: HeaderName = HeaderName::from_static("client-cert");

/// Headers only the gateway may set: identity, forwarding, client certificate, and the
/// client-address claims some backends trust.
fn owned_by_gateway(name: &str) -> bool {
    name.starts_with("x-portcullis-")
        || name.starts_with("x-forwarded-")
        || matches!(
            name,
            "forwarded"
                | "client-cert"
                | "client-cert-chain"
                | "x-real-ip"
                | "true-client-ip"
                | "cf-connecting-ip"
                | "x-client-ip"
                | "x-cluster-client-ip"
        )
}

/// Headers that make a backend act on another method or path than the one checked.
fn overrides_request(name: &str) -> bool {
    matches!(
        name,
        "x-http-method-override" | "x-http-method" | "x-method-override" | "x-original-url" | "x-rewrite-url"
    )
}

/// What [`strip`] removes besides hop-by-hop headers.
#[derive(Clone, Copy)]
enum Strip {
    /// A response: hop-by-hop headers only.
    HopByHop,
    /// A request: also gateway-owned headers, and override headers unless `keep_overrides`.
    Request { keep_overrides: bool },
}

/// True if a request header must not reach the upstream. Names are compared after
/// mapping `_` to `-`: CGI, Rack, PHP and WSGI backends read `X_Portcullis_Device` as
/// the real `X-Portcullis-Device`.
fn doomed_request_header(k: &str, keep_overrides: bool) -> bool {
    let check =
        |n: &str| is_hop_by_hop(n) || owned_by_gateway(n) || (!keep_overrides && overrides_request(n));
    if k.contains('_') { check(&k.replace('_', "-")) } else { check(k) }
}

/// Removes hop-by-hop headers (RFC 9110 7.6.1: the fixed list and every header the
/// Connection header names) and, for a request, every header the gateway owns or that
/// overrides the method or path. Runs twice per proxied request (request and response):
/// one pass over the names with string compares, removals by `HeaderName` (no
/// re-parsing), no allocation for up to eight.
fn strip(headers: &mut HeaderMap, what: Strip) {
    let mut doomed: [Option<HeaderName>; 8] = Default::default();
    let mut more: Vec<HeaderName> = Vec::new();
    {
        // The tokens of Connection, read once.
        let mut tokens: [&str; 8] = [""; 8];
        let mut count = 0;
        let mut spilled: Vec<&str> = Vec::new();
        for v in headers.get_all(header::CONNECTION) {
            for t in v.to_str().unwrap_or_default().split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if count < tokens.len() {
                    tokens[count] = t;
                    count += 1;
                } else {
                    spilled.push(t);
                }
            }
        }
        let mut n = 0;
        for key in headers.keys() {
            let k = key.as_str();
            // Every fixed name starts with one of these letters: most names need no compare.
            let listed = matches!(k.as_bytes().first(), Some(b'c' | b'f' | b'k' | b'p' | b't' | b'u' | b'x'))
                && match what {
                    Strip::HopByHop => is_hop_by_hop(k),
                    Strip::Request { keep_overrides } => doomed_request_header(k, keep_overrides),
                };
            let hop = listed || tokens[..count].iter().chain(&spilled).any(|t| t.eq_ignore_ascii_case(k));
            if hop {
                if n < doomed.len() {
                    doomed[n] = Some(key.clone());
                    n += 1;
                } else {
                    more.push(key.clone());
                }
            }
        }
    }
    for name in doomed.iter().flatten().chain(&more) {
        headers.remove(name);
    }
}

/// An address as a header value; IPv4 without the formatting machinery (every request
/// of an X-Forwarded-For route carries one).
fn ip_header(ip: IpAddr) -> HeaderValue {
    match ip {
        IpAddr::V4(v4) => {
            let mut buf = [0u8; 15];
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    buf[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    buf[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                buf[n] = b'0' + octet % 10;
                n += 1;
            }
            HeaderValue::from_bytes(&buf[..n]).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
        }
        IpAddr::V6(v6) => {
            HeaderValue::from_str(&v6.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
        }
    }
}

fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

impl Gateway {
    /// Routes, authenticates, checks and forwards one request; every refusal is a
    /// problem document.
    pub async fn handle(&self, req: Request) -> Response {
        proxy(self, req).await
    }
}

async fn proxy(gw: &Gateway, req: Request) -> Response {
    let started = Instant::now();
    // A clone of the URI shares its bytes (for the access log after `parts` is moved).
    let uri = req.uri().clone();
    let path = uri.path();
    let table = gw.current();
    let (parts, body) = req.into_parts();
    let Some(route) = table.find(path) else {
        gw.metrics.no_route.inc();
        portcullis_http::drain(body).await;
        return Problem::new(StatusCode::NOT_FOUND, "no-route", format!("no route for {path}"))
            .into_response();
    };
    let mut body = Some(body);
    let (outcome, resp) = match forward(gw, route, parts, &mut body).await {
        Ok(done) | Err(done) => done,
    };
    if let Some(unsent) = body {
        // Refused before forwarding: read (a bounded amount of) what the client is still
        // sending, so an HTTP/2 client gets the answer instead of a stream reset.
        portcullis_http::drain(unsent).await;
    }
    route.counters.count(outcome.outcome);
    route.latency.observe(started.elapsed().as_secs_f64());
    tracing::info!(
        target: "portcullis::access",
        route = %route.cfg.prefix,
        path = %path,
        device = outcome.device.as_ref().map(|d| d.id.as_str()).unwrap_or("-"),
        operation = outcome.operation.unwrap_or("-"),
        status = resp.status().as_u16(),
        outcome = outcome.outcome.label(),
        violation = outcome.logged.unwrap_or("-"),
        latency_us = started.elapsed().as_micros() as u64,
        "request"
    );
    resp
}

/// 429 with `Retry-After` in whole seconds, rounded up.
fn too_many(wait: Duration, what: &str) -> Response {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut resp = Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate-limited",
        format!("rate limit exceeded for {what}; retry in {secs} s"),
    )
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

/// What is logged and counted of one request.
struct Record<'r> {
    device: Option<Arc<AuthenticatedDevice>>,
    outcome: Outcome,
    operation: Option<&'r str>,
    /// A violation forwarded in log mode.
    logged: Option<&'static str>,
}

impl Record<'_> {
    fn of(device: Option<Arc<AuthenticatedDevice>>, outcome: Outcome) -> Self {
        Self { device, outcome, operation: None, logged: None }
    }
}

/// A request refused at some step: what to record, and the answer.
type Refused<'r> = (Record<'r>, Response);

fn refuse<'r>(device: Option<Arc<AuthenticatedDevice>>, outcome: Outcome, p: Problem) -> Refused<'r> {
    (Record::of(device, outcome), p.into_response())
}

fn violation_response(v: Violation) -> Response {
    let allow = v.allow.clone();
    let mut resp = Problem::new(v.status, v.kind, v.detail).with_invalid_params(v.params).into_response();
    if let Some(a) = allow
        && let Ok(h) = HeaderValue::from_str(&a)
    {
        resp.headers_mut().insert(header::ALLOW, h);
    }
    resp
}

/// Decides on and, if admitted, forwards one request: [`admit`] (path, identity,
/// binding, group, rate), [`validate`] (headers, size, OpenAPI), [`rewrite`] (headers
/// and target for the upstream), [`send`]. Each step either hands the request on or
/// refuses it with what to record. The body is taken out of `body` only when it is read
/// or forwarded; the caller drains what is left.
async fn forward<'r>(
    gw: &Gateway,
    route: &'r Route,
    parts: http::request::Parts,
    body: &mut Option<Body>,
) -> Result<(Record<'r>, Response), Refused<'r>> {
    let (device, peer) = admit(gw, route, &parts).await?;
    let checked = validate(route, &device, &parts, body).await?;
    let (parts, outgoing, over_limit) = rewrite(route, &device, peer.as_ref(), parts, checked.buffered, body)
        .map_err(|p| refuse(Some(device.clone()), Outcome::BadPath, p))?;
    Ok(send(route, parts, outgoing, &over_limit, checked.record).await)
}

/// Who is calling, and may they use this route now: a canonical path, a device
/// certificate that authenticates against the live registry, the identity binding, the
/// route's groups and the device's rate.
async fn admit<'r>(
    gw: &Gateway,
    route: &'r Route,
    parts: &http::request::Parts,
) -> Result<(Arc<AuthenticatedDevice>, Option<PeerCertificate>), Refused<'r>> {
    if let Some(why) = path_problem(parts.uri.path()) {
        return Err(refuse(None, Outcome::BadPath, Problem::new(StatusCode::BAD_REQUEST, "bad-path", why)));
    }
    let peer = parts.extensions.get::<PeerCertificate>().cloned();
    let device = match gw.authority.authenticate(peer.as_ref()).await {
        Ok(d) => d,
        Err(e) => {
            // Unauthenticated floods (the Mirai case) are throttled per source address.
            if let (Some(limiter), Some(ConnectInfo(addr))) =
                (&gw.unauthenticated, parts.extensions.get::<ConnectInfo<SocketAddr>>())
                && let Err(wait) = limiter.check(&addr.ip(), Instant::now())
            {
                return Err((
                    Record::of(None, Outcome::UnauthenticatedRateLimited),
                    too_many(wait, "unauthenticated requests from your address"),
                ));
            }
            let outcome = if e.is_forbidden() { Outcome::Forbidden } else { Outcome::Unauthenticated };
            return Err(refuse(None, outcome, est::auth_problem(&e)));
        }
    };
    let id = Some(device.clone());
    if let Some(named) = bound_device(&route.bindings, parts.uri.path())
        && named != device.id.as_str()
    {
        let detail = format!("path names device {named:?} but the caller is {}", device.id);
        let p = Problem::new(StatusCode::FORBIDDEN, "identity-binding", detail);
        return Err(refuse(id, Outcome::BindingMismatch, p));
    }
    if !route.cfg.groups.is_empty() && !route.cfg.groups.contains(&device.group) {
        let detail = format!("group {} may not use route {}", device.group, route.cfg.prefix);
        let p = Problem::new(StatusCode::FORBIDDEN, "group-denied", detail);
        return Err(refuse(id, Outcome::GroupDenied, p));
    }
    if let Some(limiter) = &route.limiter
        && let Err(wait) = limiter.check(&device.id, Instant::now())
    {
        let what = format!("requests of this device on route {}", route.cfg.prefix);
        return Err((Record::of(id, Outcome::RateLimited), too_many(wait, &what)));
    }
    Ok((device, peer))
}

/// A request that passed [`validate`]: what to record, and its body if it was read.
struct Checked<'r> {
    record: Record<'r>,
    buffered: Option<bytes::Bytes>,
}

/// Is the request what the route accepts: one Content-Type, a body within the limit,
/// and (with an OpenAPI document) an operation whose parameters and body pass. In log
/// mode a violation is recorded and the request goes on.
async fn validate<'r>(
    route: &'r Route,
    device: &Arc<AuthenticatedDevice>,
    parts: &http::request::Parts,
    body: &mut Option<Body>,
) -> Result<Checked<'r>, Refused<'r>> {
    let id = Some(device.clone());
    // The body is validated under the first Content-Type; a last-wins backend would read
    // it under another.
    if parts.headers.get_all(header::CONTENT_TYPE).iter().nth(1).is_some() {
        let p =
            Problem::new(StatusCode::BAD_REQUEST, "duplicate-header", "Content-Type is given more than once");
        return Err(refuse(id, Outcome::DuplicateHeader, p));
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared
        && len > route.cfg.max_body_bytes
    {
        let detail = format!(
            "request body exceeds the {} bytes allowed on {}",
            route.cfg.max_body_bytes, route.cfg.prefix
        );
        let p = Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large", detail);
        return Err(refuse(id, Outcome::BodyTooLarge, p));
    }
    let mut record = Record::of(id, Outcome::Forwarded);
    let Some(spec) = &route.spec else { return Ok(Checked { record, buffered: None }) };
    let caller = Caller { device: device.id.as_str(), group: device.group.as_str() };
    let (op, mut violation) =
        match spec.check(&parts.method, parts.uri.path(), parts.uri.query(), &parts.headers, caller) {
            Ok(op) => (Some(op), None),
            Err((op, v)) => (op, Some(v)),
        };
    record.operation = op.map(|o| o.id());
    let action = op.and_then(|o| o.action()).unwrap_or(route.cfg.action);
    let mut plan = None;
    if violation.is_none()
        && let Some(op) = op
    {
        let has_body = match declared {
            Some(len) => len > 0,
            None => body.as_ref().is_some_and(|b| !b.is_end_stream()),
        };
        let ct = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        match spec.body_plan(op, ct, has_body) {
            Ok(p) => plan = Some(p),
            Err(v) => violation = Some(v),
        }
    }
    let mut buffered = None;
    if let Some(p) = plan.as_ref().filter(|p| p.needs_body()) {
        let limit = usize::try_from(route.cfg.max_body_bytes).unwrap_or(usize::MAX);
        let unread = body.take().unwrap_or_default();
        match http_body_util::Limited::new(unread, limit).collect().await {
            Ok(collected) => {
                let bytes = collected.to_bytes();
                if let Err(v) = p.check(&bytes) {
                    violation = Some(v);
                }
                buffered = Some(bytes);
            }
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                let v = crate::openapi::too_large(route.cfg.max_body_bytes, &route.cfg.prefix);
                return Err((Record { outcome: Outcome::BodyTooLarge, ..record }, violation_response(v)));
            }
            Err(_) => {
                let p = Problem::new(StatusCode::BAD_REQUEST, "bad-body", "request body could not be read");
                return Err((Record { outcome: Outcome::BadBody, ..record }, p.into_response()));
            }
        }
    }
    if let Some(v) = violation {
        let outcome = Outcome::of_violation(v.reason);
        if action == Action::Block || v.always_enforced {
            return Err((Record { outcome, ..record }, violation_response(v)));
        }
        // Shadow mode: record what would have been refused, then forward.
        route.counters.count_logged(outcome);
        tracing::warn!(
            target: "portcullis::access",
            route = %route.cfg.prefix,
            device = %device.id,
            operation = record.operation.unwrap_or("-"),
            status = v.status.as_u16(),
            reason = v.reason,
            detail = %v.detail,
            "violation forwarded (action = log)"
        );
        record.logged = Some(v.reason);
    }
    Ok(Checked { record, buffered })
}

/// The request as the upstream gets it: the gateway's headers stripped and set (device,
/// group, forwarding, client certificate), origin-form target under the upstream's base
/// path, the upstream's `Host`, and the body (read, or streamed within the limit; the
/// flag says when a stream ran past it). Refused (400) if the target cannot be built.
fn rewrite(
    route: &Route,
    device: &AuthenticatedDevice,
    peer: Option<&PeerCertificate>,
    mut parts: http::request::Parts,
    buffered: Option<bytes::Bytes>,
    body: &mut Option<Body>,
) -> Result<(http::request::Parts, Outgoing, Arc<std::sync::atomic::AtomicBool>), Problem> {
    let remote = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    // The upstream exchange writes its own framing (Content-Length or chunked).
    let limit = usize::try_from(route.cfg.max_body_bytes).unwrap_or(usize::MAX);
    // A body streamed without a length that runs past the limit ends the upstream
    // exchange with an error; this flag tells that apart from an upstream failure, so
    // the client gets 413, not 502.
    let over_limit = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outgoing = match (buffered, body.take()) {
        (Some(bytes), _) => Outgoing::Full(bytes),
        (None, Some(b)) if !b.is_end_stream() => {
            let flag = over_limit.clone();
            Outgoing::Stream(Body::new(http_body_util::Limited::new(b, limit).map_err(move |e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    flag.store(true, Ordering::Relaxed);
                }
                e
            })))
        }
        (None, _) => Outgoing::Full(bytes::Bytes::new()),
    };
    strip(&mut parts.headers, Strip::Request { keep_overrides: route.cfg.allow_override_headers });
    let h = &mut parts.headers;
    let set = |h: &mut HeaderMap, name: HeaderName, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    set(h, X_PORTCULLIS_DEVICE, device.id.as_str());
    set(h, X_PORTCULLIS_GROUP, device.group.as_str());
    match (route.cfg.forwarded, remote) {
        (Forwarded::XForwarded, r) => {
            h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
            if let Some(r) = r {
                h.insert(X_FORWARDED_FOR, ip_header(r.ip()));
            }
        }
        (Forwarded::Rfc7239, Some(r)) => {
            // RFC 7239 section 6: an IPv6 node is quoted and bracketed.
            let node = match r.ip() {
                IpAddr::V4(ip) => ip.to_string(),
                IpAddr::V6(ip) => format!("\"[{ip}]\""),
            };
            set(h, header::FORWARDED, &format!("for={node};proto=https"));
        }
        (Forwarded::Rfc7239, None) => set(h, header::FORWARDED, "proto=https"),
        (Forwarded::None, _) => {}
    }
    if route.cfg.client_cert_header
        && let Some(leaf) = peer.and_then(|p| p.chain.first())
    {
        // RFC 9440: a structured-field byte sequence of the DER certificate.
        let v = format!(":{}:", base64::engine::general_purpose::STANDARD.encode(leaf));
        set(h, CLIENT_CERT, &v);
    }

    // Origin-form: the upstream's base path, then the request's path and query.
    let path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let base_path = route.base.path().trim_end_matches('/');
    let forwarded_uri = if base_path.is_empty() {
        // Reuses the parsed path and query as they are.
        let mut origin = http::uri::Parts::default();
        origin.path_and_query = parts.uri.path_and_query().cloned();
        Uri::from_parts(origin).map_err(|_| ())
    } else {
        let mut uri = String::with_capacity(base_path.len() + path_and_query.len());
        uri.push_str(base_path);
        uri.push_str(path_and_query);
        Uri::try_from(uri).map_err(|_| ())
    };
    parts.uri = forwarded_uri.map_err(|_| {
        Problem::new(StatusCode::BAD_REQUEST, "bad-path", "request target cannot be forwarded")
    })?;
    if let Some(host) = &route.host {
        parts.headers.insert(header::HOST, host.clone());
    }
    Ok((parts, outgoing, over_limit))
}

/// Sends the request upstream within the route's timeout; the answer with its
/// hop-by-hop headers stripped, or 413 / 502 / 504.
async fn send<'r>(
    route: &'r Route,
    parts: http::request::Parts,
    outgoing: Outgoing,
    over_limit: &std::sync::atomic::AtomicBool,
    record: Record<'r>,
) -> (Record<'r>, Response) {
    match tokio::time::timeout(route.cfg.timeout, route.upstream.send(&parts, outgoing)).await {
        Ok(Ok(resp)) => {
            let (mut parts, body) = resp.into_parts();
            strip(&mut parts.headers, Strip::HopByHop);
            (record, Response::from_parts(parts, Body::new(body)))
        }
        Ok(Err(_)) if over_limit.load(Ordering::Relaxed) => {
            let v = crate::openapi::too_large(route.cfg.max_body_bytes, &route.cfg.prefix);
            (Record { outcome: Outcome::BodyTooLarge, ..record }, violation_response(v))
        }
        Ok(Err(e)) => {
            tracing::warn!(route = %route.cfg.prefix, error = %e, "upstream request failed");
            let detail = format!("upstream of {} is unavailable", route.cfg.prefix);
            let p = Problem::new(StatusCode::BAD_GATEWAY, "upstream-unavailable", detail);
            (Record { outcome: Outcome::UpstreamError, ..record }, p.into_response())
        }
        Err(_) => {
            let detail = format!(
                "upstream of {} did not answer within {} ms",
                route.cfg.prefix,
                route.cfg.timeout.as_millis()
            );
            let p = Problem::new(StatusCode::GATEWAY_TIMEOUT, "upstream-timeout", detail);
            (Record { outcome: Outcome::UpstreamTimeout, ..record }, p.into_response())
        }
    }
}

#[cfg(test)]
mod ip_header_tests {
    #[test]
    fn ipv4_headers_match_display() {
        for ip in ["0.0.0.0", "10.20.30.40", "127.0.0.1", "255.255.255.255", "192.168.100.9"] {
            let a: std::net::IpAddr = ip.parse().unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
            assert_eq!(super::ip_header(a).to_str().unwrap_or_default(), ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(prefix: &str, upstream: &str) -> RouteConfig {
        RouteConfig {
            prefix: prefix.into(),
            upstream: upstream.into(),
            groups: vec![],
            rate: None,
            max_body_bytes: 1024,
            timeout: Duration::from_secs(1),
            client_cert_header: false,
            forwarded: Forwarded::XForwarded,
            openapi: None,
            openapi_base: None,
            strict_query: false,
            action: Action::Block,
            upstream_ca: None,
            bind_device: vec![],
            allow_override_headers: false,
        }
    }

    #[test]
    fn identity_binding_templates() {
        let b = vec![compile_binding("/api/", "/api/devices/{device}").unwrap()];
        assert_eq!(bound_device(&b, "/api/devices/cam-01/telemetry").as_deref(), Some("cam-01"));
        assert_eq!(bound_device(&b, "/api/devices/cam-01").as_deref(), Some("cam-01"));
        assert_eq!(bound_device(&b, "/api/devices/cam%2001").as_deref(), Some("cam 01"));
        assert_eq!(bound_device(&b, "/api/devices"), None);
        assert_eq!(bound_device(&b, "/api/other/cam-01"), None);
        let any = vec![compile_binding("/", "/{*}/by-device/{device}").unwrap()];
        assert_eq!(bound_device(&any, "/v1/by-device/x/y").as_deref(), Some("x"));
        assert!(compile_binding("/", "/no/placeholder").is_err());
        assert!(compile_binding("/", "/{device}/{device}").is_err());
        assert!(compile_binding("/", "relative/{device}").is_err());
        assert!(compile_binding("/", "/a/{dev}/{device}").is_err());
    }

    #[test]
    fn longest_prefix_wins() {
        let t = RouteTable::try_new(vec![
            cfg("/api/", "http://a:1"),
            cfg("/api/v2/", "http://b:1"),
            cfg("/", "http://c:1"),
        ])
        .unwrap();
        assert_eq!(t.find("/api/v2/x").unwrap().cfg.upstream, "http://b:1");
        assert_eq!(t.find("/api/v1").unwrap().cfg.upstream, "http://a:1");
        assert_eq!(t.find("/other").unwrap().cfg.upstream, "http://c:1");
    }

    #[test]
    fn invalid_routes_are_refused() {
        assert!(matches!(RouteTable::try_new(vec![cfg("api", "http://a:1")]), Err(RouteError::Prefix(_))));
        assert!(matches!(
            RouteTable::try_new(vec![cfg("/a", "http://a:1"), cfg("/a", "http://b:1")]),
            Err(RouteError::Duplicate(_))
        ));
        assert!(matches!(RouteTable::try_new(vec![cfg("/a", "ftp://a")]), Err(RouteError::Upstream { .. })));
        let mut ca = cfg("/a", "http://a:1");
        ca.upstream_ca = Some("ca.pem".into());
        assert!(matches!(RouteTable::try_new(vec![ca]), Err(RouteError::Upstream { .. })));
        let mut ca = cfg("/a", "https://a");
        ca.upstream_ca = Some("/nonexistent/ca.pem".into());
        assert!(matches!(RouteTable::try_new(vec![ca]), Err(RouteError::UpstreamTls { .. })));
        let mut with_spec = cfg("/a", "http://a:1");
        with_spec.openapi = Some("/nonexistent/spec.yaml".into());
        assert!(matches!(RouteTable::try_new(vec![with_spec]), Err(RouteError::OpenApi { .. })));
        let mut with_spec = cfg("/a", "http://a:1");
        with_spec.openapi =
            Some(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/telemetry.openapi.yaml").into());
        assert_eq!(RouteTable::try_new(vec![with_spec]).unwrap().len(), 1);
    }

    #[test]
    fn non_canonical_paths_are_refused() {
        for p in [
            "/api/../admin",
            "/api/./x",
            "/api//x",
            "/api/%2e%2e/x",
            "/api/a%2Fb",
            "/api\\x",
            "/api/%5C",
            "/api/..",
            "/.",
            "/api/%64evices/cam-02",
            "/api/cam%2D01",
            "/api/%7e",
            "/api/devices;x/cam-02",
            "/api/..;/admin",
            "/api/%3b",
            "/api/%00",
            "/api/%2",
            "/api/%zz",
        ] {
            assert!(path_problem(p).is_some(), "{p}");
        }
        for p in [
            "/api/devices/cam-01/telemetry",
            "/api/x/",
            "/api/a.b/..c/...",
            "/api/100%25",
            "/api/%C3%A9",
            "/",
        ] {
            assert_eq!(path_problem(p), None, "{p}");
        }
    }

    #[test]
    fn gateway_headers_are_stripped() {
        let strip_request = |names: &[&str], keep_overrides: bool| {
            let mut h = HeaderMap::new();
            for n in names {
                h.insert(HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_static("v"));
            }
            h.insert(header::CONNECTION, HeaderValue::from_static("x-keep"));
            h.insert("accept", HeaderValue::from_static("*/*"));
            strip(&mut h, Strip::Request { keep_overrides });
            h.keys().map(|k| k.as_str().to_owned()).collect::<Vec<_>>()
        };
        let owned = [
            "x-portcullis-device",
            "X_Portcullis_Device",
            "x_portcullis-group",
            "X-Forwarded-For",
            "x_forwarded_proto",
            "forwarded",
            "client-cert",
            "client_cert",
            "client-cert-chain",
            "connection",
            "x-keep",
            "x-real-ip",
            "X_Real_IP",
            "true-client-ip",
            "cf-connecting-ip",
            "x-client-ip",
            "transfer_encoding",
        ];
        assert_eq!(strip_request(&owned, false), ["accept"]);
        assert_eq!(strip_request(&owned, true), ["accept"]);
        let overrides = [
            "X-HTTP-Method-Override",
            "x-http-method",
            "x_method_override",
            "X-Original-URL",
            "x-rewrite-url",
        ];
        assert_eq!(strip_request(&overrides, false), ["accept"]);
        let mut kept = strip_request(&overrides, true);
        kept.sort();
        assert_eq!(
            kept,
            [
                "accept",
                "x-http-method",
                "x-http-method-override",
                "x-original-url",
                "x-rewrite-url",
                "x_method_override"
            ]
        );
        // A response keeps everything but hop-by-hop headers.
        let mut h = HeaderMap::new();
        h.insert("x-real-ip", HeaderValue::from_static("v"));
        h.insert("keep-alive", HeaderValue::from_static("v"));
        strip(&mut h, Strip::HopByHop);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-real-ip"]);
    }
}
