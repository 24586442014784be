//! The route table: routes by prefix with their identity bindings, OpenAPI documents,
//! limits and counters, and each route's upstream client (verified TLS or plain http).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use portcullis_core::{DeviceId, GroupName};
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;
use std::path::PathBuf;

use crate::openapi::{Action, Spec, SpecOptions};
use crate::upstream::Upstream;
use portcullis_net::{Limiter, Rate};

/// Most devices whose rate state one route keeps.
pub(crate) const MAX_TRACKED_DEVICES: usize = 100_000;

/// Why a route could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The prefix is not an absolute path.
    #[error("route prefix {0:?} must start with '/'")]
    Prefix(String),
    /// Two routes share a prefix.
    #[error("route prefix {0:?} appears twice")]
    Duplicate(String),
    /// The upstream URL is unusable.
    #[error("route {prefix:?}: upstream {upstream:?}: {reason}")]
    Upstream {
        /// The route.
        prefix: String,
        /// The URL.
        upstream: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The OpenAPI document cannot be read or compiled.
    #[error("route {prefix:?}: OpenAPI document {path}: {reason}")]
    OpenApi {
        /// The route.
        prefix: String,
        /// The document.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The upstream's TLS trust cannot be set up.
    #[error("route {prefix:?}: upstream TLS: {reason}")]
    UpstreamTls {
        /// The route.
        prefix: String,
        /// What is wrong.
        reason: String,
    },
    /// A rate is not positive.
    #[error("route {0:?}: rate_limit needs per_second > 0 and burst >= 1")]
    Rate(String),
    /// A `bind_device` template is malformed.
    #[error("route {prefix:?}: bind_device template {template:?} {reason}")]
    Binding {
        /// The route.
        prefix: String,
        /// The template.
        template: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// The forwarding headers a route sets for its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Forwarded {
    /// `X-Forwarded-For` and `X-Forwarded-Proto` (the default).
    #[default]
    XForwarded,
    /// RFC 7239 `Forwarded: for=…;proto=https`.
    Rfc7239,
    /// None.
    None,
}

/// One route, validated.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Path prefix; the longest matching prefix wins.
    pub prefix: String,
    /// `http://host:port[/base]`.
    pub upstream: String,
    /// Groups allowed to use the route; empty = every group.
    pub groups: Vec<GroupName>,
    /// Per-device rate.
    pub rate: Option<Rate>,
    /// Largest request body forwarded.
    pub max_body_bytes: u64,
    /// Deadline for the upstream's response head.
    pub timeout: Duration,
    /// Send the device's certificate as RFC 9440 `Client-Cert`.
    pub client_cert_header: bool,
    /// Which forwarding headers the upstream gets (incoming ones are always stripped).
    pub forwarded: Forwarded,
    /// An OpenAPI 3.0/3.1 document (YAML or JSON) every request must match.
    pub openapi: Option<PathBuf>,
    /// Path the document's paths are relative to (default: its first `servers` URL).
    pub openapi_base: Option<String>,
    /// Refuse query parameters the matched operation does not declare.
    pub strict_query: bool,
    /// What to do with a request that violates the document.
    pub action: Action,
    /// CA certificates (PEM) trusted for an https upstream instead of the system roots.
    pub upstream_ca: Option<PathBuf>,
    /// Path templates binding a segment to the caller, e.g. `/api/devices/{device}`: a
    /// request whose path matches a template must name the calling device there (403
    /// otherwise). `{*}` matches any one segment.
    pub bind_device: Vec<String>,
    /// Forward method and path override headers (`X-HTTP-Method-Override`,
    /// `X-Original-URL`, …); off by default, because the upstream would then act on a
    /// method or path the gateway never checked.
    pub allow_override_headers: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Seg {
    Lit(String),
    Device,
    Any,
}

/// Compiles `/a/{device}/b` into segments; exactly one `{device}` is required.
pub(crate) fn compile_binding(prefix: &str, t: &str) -> Result<Vec<Seg>, RouteError> {
    let bad = |reason| RouteError::Binding { prefix: prefix.to_owned(), template: t.to_owned(), reason };
    let Some(rest) = t.strip_prefix('/') else { return Err(bad("must start with '/'")) };
    let segs: Vec<Seg> = rest
        .split('/')
        .map(|s| match s {
            "{device}" => Seg::Device,
            "{*}" => Seg::Any,
            lit => Seg::Lit(lit.to_owned()),
        })
        .collect();
    if segs.iter().filter(|s| **s == Seg::Device).count() != 1 {
        return Err(bad("needs exactly one {device} segment"));
    }
    if segs.iter().any(|s| matches!(s, Seg::Lit(l) if l.is_empty() || l.contains(['{', '}']))) {
        return Err(bad("has an empty or unknown {placeholder} segment"));
    }
    Ok(segs)
}

/// If `path` matches a binding template, the device segment it names, percent-decoded
/// (as OpenAPI matching and the upstream read it); `None` otherwise.
pub(crate) fn bound_device<'p>(bindings: &[Vec<Seg>], path: &'p str) -> Option<Cow<'p, str>> {
    let rest = path.strip_prefix('/')?;
    let decode = |seg: &'p str| percent_encoding::percent_decode_str(seg).decode_utf8_lossy();
    bindings.iter().find_map(|t| {
        let mut segs = rest.split('/');
        let mut named = None;
        for want in t {
            let seg = segs.next()?;
            match want {
                Seg::Lit(l) if *l != decode(seg) => return None,
                Seg::Device => named = Some(decode(seg)),
                _ => {}
            }
        }
        named
    })
}

#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) cfg: RouteConfig,
    /// Handles into the metric families for the hot path, resolved once per load: the
    /// one set of counters behind both `/metrics` and `describe`.
    pub(crate) counters: crate::outcome::RouteCounters,
    pub(crate) latency: Histogram,
    pub(crate) bindings: Vec<Vec<Seg>>,
    pub(crate) base: Uri,
    /// `Host` for the upstream: the authority of `base`.
    pub(crate) host: Option<HeaderValue>,
    pub(crate) limiter: Option<Limiter<DeviceId>>,
    pub(crate) spec: Option<Spec>,
    /// Pooled upstream connections, one pool per device-port worker (sized when the
    /// gateway takes the table), so a request and its upstream connection stay on one
    /// thread.
    pub(crate) upstream: Upstream,
}

/// The loaded routes. Replaced whole on reload.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub(crate) routes: Vec<Route>,
}

impl RouteTable {
    /// Validates `configs` into a table; any error leaves the caller's current table alone.
    pub fn try_new(configs: Vec<RouteConfig>) -> Result<Self, RouteError> {
        let mut routes: Vec<Route> = Vec::with_capacity(configs.len());
        for cfg in configs {
            if !cfg.prefix.starts_with('/') {
                return Err(RouteError::Prefix(cfg.prefix));
            }
            if routes.iter().any(|r| r.cfg.prefix == cfg.prefix) {
                return Err(RouteError::Duplicate(cfg.prefix));
            }
            let bad = |reason| RouteError::Upstream {
                prefix: cfg.prefix.clone(),
                upstream: cfg.upstream.clone(),
                reason,
            };
            let base: Uri = cfg.upstream.parse().map_err(|_| bad("not a URL"))?;
            let tls = match base.scheme_str() {
                Some("http") if cfg.upstream_ca.is_some() => {
                    return Err(bad("upstream_ca needs an https upstream"));
                }
                Some("http") => None,
                Some("https") => Some(upstream_tls(&cfg)?),
                _ => return Err(bad("scheme must be http or https")),
            };
            if base.authority().is_none() {
                return Err(bad("no host"));
            }
            if base.query().is_some() {
                return Err(bad("must not have a query"));
            }
            let limiter = match cfg.rate {
                Some(r) if !(r.per_second > 0.0 && r.burst >= 1) => return Err(RouteError::Rate(cfg.prefix)),
                Some(r) => Some(Limiter::new(r, MAX_TRACKED_DEVICES)),
                None => None,
            };
            let bindings = cfg
                .bind_device
                .iter()
                .map(|t| compile_binding(&cfg.prefix, t))
                .collect::<Result<Vec<_>, _>>()?;
            let spec = match &cfg.openapi {
                None => None,
                Some(path) => {
                    let fail = |reason: String| RouteError::OpenApi {
                        prefix: cfg.prefix.clone(),
                        path: path.display().to_string(),
                        reason,
                    };
                    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
                    let opts =
                        SpecOptions { base_path: cfg.openapi_base.clone(), strict_query: cfg.strict_query };
                    Some(Spec::load(&bytes, &opts).map_err(|e| fail(e.to_string()))?)
                }
            };
            let target = Uri::builder()
                .scheme(base.scheme_str().unwrap_or("http"))
                .authority(base.authority().map(|a| a.as_str()).unwrap_or_default())
                .path_and_query("/")
                .build()
                .map_err(|_| bad("not a URL"))?;
            let upstream = Upstream::new(connector(tls), target);
            routes.push(Route {
                spec,
                upstream,
                counters: Default::default(),
                latency: Histogram::new(std::iter::empty()),
                cfg,
                bindings,
                host: base.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
                base,
                limiter,
            });
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.cfg.prefix.len()));
        Ok(Self { routes })
    }

    pub(crate) fn find(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| path.starts_with(&r.cfg.prefix))
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// True when no route is loaded.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// Client TLS for an https upstream: the route's CA file, else the system roots; the
/// upstream's certificate is always verified.
pub(crate) fn upstream_tls(cfg: &RouteConfig) -> Result<rustls::ClientConfig, RouteError> {
    let fail = |e: portcullis_client::tls::TlsError| {
        let reason = match (&e, &cfg.upstream_ca) {
            (portcullis_client::tls::TlsError::NoSystemRoots, _) => format!("{e}; set upstream_ca"),
            _ => e.to_string(),
        };
        RouteError::UpstreamTls { prefix: cfg.prefix.clone(), reason }
    };
    let roots = portcullis_client::tls::trust_roots(cfg.upstream_ca.as_deref()).map_err(fail)?;
    portcullis_client::tls::client_config(roots).map_err(fail)
}

/// The connector for one route: https verified with `tls` (only), or plain http.
pub(crate) fn connector(tls: Option<rustls::ClientConfig>) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    http.enforce_http(false);
    match tls {
        Some(cfg) => hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(cfg)
            .https_only()
            .enable_http1()
            .wrap_connector(http),
        // An http route never speaks TLS: the connector refuses https outright.
        None => HttpsConnector::from((http, Arc::new(no_tls()))),
    }
}

/// A client config that trusts nothing (for plain-http routes).
pub(crate) fn no_tls() -> rustls::ClientConfig {
    match portcullis_client::tls::client_config(rustls::RootCertStore::empty()) {
        Ok(cfg) => cfg,
        // ring supports the default versions; should that ever change, fall back to the
        // process default, which trusts nothing either.
        Err(_) => rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    }
}
