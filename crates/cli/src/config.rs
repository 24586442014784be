//! `portcullis.toml`: parsed into a raw struct, then validated into [`Config`] whose
//! errors name the offending key. Every field has a default, so no file is needed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use portcullis_core::{TrustDomain, parse_duration};
pub use portcullis_dns::config::{DnsConfig, DnsPolicyConfig, ListFrom, ListSource};
use portcullis_gateway::openapi::Action;
use portcullis_gateway::{Forwarded, ListenerConfig, Rate, RouteConfig};
use portcullis_pki::IssuancePolicy;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Raw {
    data_dir: Option<PathBuf>,
    trust_domain: Option<String>,
    device: RawDevice,
    admin: RawAdmin,
    pki: RawPki,
    gateway: RawGateway,
    dns: RawDns,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDns {
    enabled: bool,
    addr: Option<String>,
    dot_addr: Option<String>,
    upstreams: Option<Vec<String>>,
    upstream_ca: Option<PathBuf>,
    upstream_timeout: String,
    unknown_clients: String,
    default_policy: Option<String>,
    per_client: Option<RawRate>,
    max_tcp_connections: usize,
    tcp_connections_per_ip: usize,
    tcp_idle_timeout: String,
    tcp_session_timeout: String,
    max_udp_in_flight: usize,
    max_upstream_in_flight: usize,
    cache: RawDnsCache,
    log_queries: bool,
    log_retention: String,
    log_max_rows: u64,
    lists: std::collections::BTreeMap<String, RawList>,
    policies: Vec<RawPolicy>,
}

impl Default for RawDns {
    fn default() -> Self {
        Self {
            enabled: true,
            addr: None,
            dot_addr: None,
            upstreams: None,
            upstream_ca: None,
            upstream_timeout: "2s".into(),
            unknown_clients: "refuse".into(),
            default_policy: None,
            per_client: None,
            max_tcp_connections: 1_000,
            tcp_connections_per_ip: 16,
            tcp_idle_timeout: "10s".into(),
            tcp_session_timeout: "5m".into(),
            max_udp_in_flight: 1_024,
            max_upstream_in_flight: 1_024,
            cache: RawDnsCache::default(),
            log_queries: true,
            log_retention: "7d".into(),
            log_max_rows: 1_000_000,
            lists: Default::default(),
            policies: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDnsCache {
    max_entries: usize,
    min_ttl: String,
    max_ttl: String,
    max_negative_ttl: String,
}

impl Default for RawDnsCache {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            min_ttl: "0s".into(),
            max_ttl: "1d".into(),
            max_negative_ttl: "1h".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawList {
    path: Option<PathBuf>,
    url: Option<String>,
    refresh: Option<String>,
    /// `exact` (default) or `subtree`.
    #[serde(rename = "match")]
    matching: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: String,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    devices: Vec<String>,
    mode: portcullis_dns::Mode,
    #[serde(default)]
    lists: Vec<String>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    block: portcullis_dns::BlockResponse,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawGateway {
    routes: Vec<RawRoute>,
    unauthenticated_per_ip: Option<RawRate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    prefix: String,
    upstream: String,
    #[serde(default)]
    groups: Vec<String>,
    rate_limit: Option<RawRate>,
    max_body_bytes: Option<u64>,
    timeout: Option<String>,
    #[serde(default)]
    client_cert_header: bool,
    forwarded: Option<String>,
    openapi: Option<PathBuf>,
    openapi_base: Option<String>,
    #[serde(default)]
    strict_query: bool,
    action: Option<String>,
    upstream_ca: Option<PathBuf>,
    #[serde(default)]
    bind_device: Vec<String>,
    #[serde(default)]
    allow_override_headers: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    per_second: f64,
    burst: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDevice {
    addr: String,
    server_names: Vec<String>,
    handshake_timeout: String,
    header_timeout: String,
    request_timeout: String,
    max_connections: usize,
    max_connections_per_ip: usize,
    handshakes_per_ip: Option<RawRate>,
    workers: usize,
    http2: RawHttp2,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHttp2 {
    max_concurrent_streams: u32,
    max_header_list_size: u32,
    max_pending_accept_reset_streams: usize,
    max_local_error_reset_streams: usize,
    control_frames: RawRate,
    window_updates_per_data_frame: u32,
    send_timeout: String,
}

impl Default for RawHttp2 {
    fn default() -> Self {
        let d = portcullis_gateway::H2Limits::default();
        Self {
            max_concurrent_streams: d.max_concurrent_streams,
            max_header_list_size: d.max_header_list_size,
            max_pending_accept_reset_streams: d.max_pending_accept_reset_streams,
            max_local_error_reset_streams: d.max_local_error_reset_streams,
            control_frames: RawRate {
                per_second: d.control_frames.per_second,
                burst: d.control_frames.burst,
            },
            window_updates_per_data_frame: d.window_updates_per_data_frame,
            send_timeout: format!("{}s", d.send_timeout.as_secs()),
        }
    }
}

fn http2_limits(raw: RawHttp2) -> anyhow::Result<portcullis_gateway::H2Limits> {
    let positive = |key: &str, v: u64| {
        if v == 0 { bail!("config key device.http2.{key}: must be greater than zero") } else { Ok(()) }
    };
    positive("max_concurrent_streams", raw.max_concurrent_streams.into())?;
    positive("max_pending_accept_reset_streams", raw.max_pending_accept_reset_streams as u64)?;
    positive("max_local_error_reset_streams", raw.max_local_error_reset_streams as u64)?;
    if raw.max_header_list_size < 1024 {
        bail!("config key device.http2.max_header_list_size: at least 1024 bytes");
    }
    Ok(portcullis_gateway::H2Limits {
        max_concurrent_streams: raw.max_concurrent_streams,
        max_header_list_size: raw.max_header_list_size,
        max_pending_accept_reset_streams: raw.max_pending_accept_reset_streams,
        max_local_error_reset_streams: raw.max_local_error_reset_streams,
        control_frames: rate("device.http2.control_frames", Some(raw.control_frames))?
            .unwrap_or(portcullis_gateway::H2Limits::default().control_frames),
        window_updates_per_data_frame: raw.window_updates_per_data_frame,
        send_timeout: dur("device.http2.send_timeout", &raw.send_timeout)?,
    })
}

impl Default for RawDevice {
    fn default() -> Self {
        Self {
            addr: "0.0.0.0:8443".into(),
            server_names: Vec::new(),
            handshake_timeout: "10s".into(),
            header_timeout: "10s".into(),
            request_timeout: "30s".into(),
            max_connections: 10_000,
            max_connections_per_ip: 256,
            handshakes_per_ip: None,
            workers: 0,
            http2: RawHttp2::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    addr: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self { addr: "127.0.0.1:7080".into() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPki {
    device_cert_lifetime: String,
    token_ttl: String,
    crl_validity: String,
    server_cert_lifetime: String,
    reenroll_limit: RawCount,
}

/// `{ count = 10, per = "1h" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCount {
    count: u32,
    per: String,
}

impl Default for RawPki {
    fn default() -> Self {
        Self {
            device_cert_lifetime: "30d".into(),
            token_ttl: "24h".into(),
            crl_validity: "7d".into(),
            server_cert_lifetime: "90d".into(),
            reenroll_limit: RawCount { count: 10, per: "1h".into() },
        }
    }
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub trust_domain: TrustDomain,
    pub device_addr: SocketAddr,
    pub server_names: Vec<String>,
    pub listener: ListenerConfig,
    pub admin_addr: SocketAddr,
    pub policy: IssuancePolicy,
    pub server_cert_lifetime: Duration,
    pub routes: Vec<RouteConfig>,
    pub unauthenticated_per_ip: Option<Rate>,
    pub dns: Option<DnsConfig>,
}

/// The nameservers of /etc/resolv.conf, port 53.
fn system_resolvers() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

fn dns_config(raw: RawDns, dir: &Path) -> anyhow::Result<Option<DnsConfig>> {
    if !raw.enabled {
        return Ok(None);
    }
    let upstreams = match raw.upstreams {
        None => system_resolvers().iter().map(ToString::to_string).collect(),
        Some(list) => {
            let none = Arc::new(rustls::RootCertStore::empty());
            for u in &list {
                portcullis_dns::Upstream::parse(u, &none).context("config key dns.upstreams")?;
            }
            list
        }
    };
    let names: Vec<&str> = raw.policies.iter().map(|p| p.name.as_str()).collect();
    for (i, p) in raw.policies.iter().enumerate() {
        if names.iter().filter(|n| **n == p.name).count() > 1 {
            bail!("config key dns.policies[{i}].name: policy {:?} is defined twice", p.name);
        }
        for l in &p.lists {
            if !raw.lists.contains_key(l) {
                bail!("config key dns.policies[{i}].lists: no list named {l:?} under [dns.lists]");
            }
        }
    }
    let known = |key: &str, v: &Option<String>| -> anyhow::Result<()> {
        match v {
            Some(n) if !names.contains(&n.as_str()) => bail!("config key {key}: no policy named {n:?}"),
            _ => Ok(()),
        }
    };
    let unknown_clients = match raw.unknown_clients.as_str() {
        "refuse" => None,
        name => Some(name.to_owned()),
    };
    known("dns.unknown_clients", &unknown_clients)?;
    known("dns.default_policy", &raw.default_policy)?;
    let ttl = |key: &str, v: &str| {
        parse_duration(v).map_err(anyhow::Error::msg).with_context(|| format!("config key dns.cache.{key}"))
    };
    Ok(Some(DnsConfig {
        default_addrs: raw.addr.is_none() && raw.dot_addr.is_none(),
        addr: addr("dns.addr", raw.addr.as_deref().unwrap_or("127.0.0.1:5353"))?,
        upstream_ca: raw.upstream_ca.map(|p| dir.join(p)),
        dot_addr: match raw.dot_addr.as_deref() {
            None => Some(addr("dns.dot_addr", "127.0.0.1:8853")?),
            Some("") => None,
            Some(a) => Some(addr("dns.dot_addr", a)?),
        },
        upstreams,
        upstream_timeout: dur("dns.upstream_timeout", &raw.upstream_timeout)?,
        unknown_clients,
        default_policy: raw.default_policy,
        per_client: match raw.per_client {
            Some(r) => rate("dns.per_client", Some(r))?,
            None => Some(Rate { per_second: 200.0, burst: 400 }),
        },
        max_tcp_connections: raw.max_tcp_connections.max(1),
        tcp_connections_per_ip: raw.tcp_connections_per_ip.max(1),
        tcp_idle_timeout: dur("dns.tcp_idle_timeout", &raw.tcp_idle_timeout)?,
        tcp_session_timeout: dur("dns.tcp_session_timeout", &raw.tcp_session_timeout)?,
        max_udp_in_flight: raw.max_udp_in_flight.max(1),
        max_upstream_in_flight: raw.max_upstream_in_flight.max(1),
        cache: portcullis_dns::CacheConfig {
            max_entries: raw.cache.max_entries.max(1),
            min_ttl: ttl("min_ttl", &raw.cache.min_ttl)?,
            max_ttl: ttl("max_ttl", &raw.cache.max_ttl)?,
            max_negative_ttl: ttl("max_negative_ttl", &raw.cache.max_negative_ttl)?,
        },
        log_queries: raw.log_queries,
        log_retention: dur("dns.log_retention", &raw.log_retention)?,
        log_max_rows: raw.log_max_rows.max(1),
        lists: raw
            .lists
            .into_iter()
            .map(|(name, l)| {
                let key = |k: &str| format!("config key dns.lists.{name}.{k}");
                let (from, default_refresh) = match (l.path, l.url) {
                    (Some(p), None) => (ListFrom::File(dir.join(p)), Duration::from_secs(60)),
                    (None, Some(u)) if u.starts_with("http://") || u.starts_with("https://") => {
                        (ListFrom::Url(u), Duration::from_secs(86_400))
                    }
                    (None, Some(u)) => bail!("{}: {u:?} is not an http(s) URL", key("url")),
                    _ => bail!("config key dns.lists.{name}: give exactly one of path or url"),
                };
                let refresh = match l.refresh {
                    Some(r) => dur(&key("refresh"), &r)?,
                    None => default_refresh,
                };
                let matching = match l.matching.as_deref() {
                    None | Some("exact") => portcullis_dns::Match::Exact,
                    Some("subtree") => portcullis_dns::Match::Subtree,
                    Some(other) => bail!("{}: {other:?} is neither \"exact\" nor \"subtree\"", key("match")),
                };
                Ok(ListSource { name, from, refresh, matching })
            })
            .collect::<anyhow::Result<_>>()?,
        policies: raw
            .policies
            .into_iter()
            .map(|p| DnsPolicyConfig {
                name: p.name,
                groups: p.groups,
                devices: p.devices,
                mode: p.mode,
                lists: p.lists,
                allow: p.allow,
                deny: p.deny,
                block: p.block,
            })
            .collect(),
    }))
}

fn dur(key: &str, v: &str) -> anyhow::Result<Duration> {
    let d = parse_duration(v).map_err(anyhow::Error::msg).with_context(|| format!("config key {key}"))?;
    if d.is_zero() {
        bail!("config key {key}: must be greater than zero");
    }
    Ok(d)
}

fn rate(key: &str, raw: Option<RawRate>) -> anyhow::Result<Option<Rate>> {
    match raw {
        None => Ok(None),
        Some(r) if r.per_second > 0.0 && r.per_second.is_finite() && r.burst >= 1 => {
            Ok(Some(Rate { per_second: r.per_second, burst: r.burst }))
        }
        Some(_) => bail!("config key {key}: per_second must be > 0 and burst >= 1"),
    }
}

fn addr(key: &str, v: &str) -> anyhow::Result<SocketAddr> {
    v.parse().with_context(|| format!("config key {key}: {v:?} is not an address like 127.0.0.1:8443"))
}

fn default_names() -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() && h != "localhost" {
            names.push(h.to_owned());
        }
    }
    names
}

impl Config {
    /// Loads `path` (if given) and validates it.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let raw: Raw = match path {
            None => Raw::default(),
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("invalid config {}", p.display()))?
            }
        };
        // Files a route names are relative to the configuration file.
        let dir = path.and_then(Path::parent).unwrap_or(Path::new(""));
        Self::validate(raw, dir)
    }

    /// Parses configuration text (for tests of the example file).
    #[cfg(test)]
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        Self::validate(toml::from_str(text)?, Path::new(""))
    }

    fn validate(raw: Raw, dir: &Path) -> anyhow::Result<Self> {
        let trust_domain =
            TrustDomain::try_new(raw.trust_domain.unwrap_or_else(|| "portcullis.local".into()))
                .context("config key trust_domain")?;
        let mut server_names = raw.device.server_names;
        if server_names.is_empty() {
            server_names = default_names();
        }
        if raw.device.max_connections == 0 {
            bail!("config key device.max_connections: must be at least 1");
        }
        let mut routes = Vec::with_capacity(raw.gateway.routes.len());
        for (i, r) in raw.gateway.routes.into_iter().enumerate() {
            let key = |k: &str| format!("config key gateway.routes[{i}].{k}");
            let groups = r
                .groups
                .iter()
                .map(|g| portcullis_core::GroupName::try_new(g.as_str()))
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| key("groups"))?;
            let forwarded = match r.forwarded.as_deref() {
                None | Some("x-forwarded") => Forwarded::XForwarded,
                Some("rfc7239") => Forwarded::Rfc7239,
                Some("none") => Forwarded::None,
                Some(other) => {
                    bail!("{}: {other:?} is not \"x-forwarded\", \"rfc7239\" or \"none\"", key("forwarded"))
                }
            };
            let action = match r.action.as_deref() {
                None | Some("block") => Action::Block,
                Some("log") => Action::Log,
                Some(other) => bail!("{}: {other:?} is neither \"block\" nor \"log\"", key("action")),
            };
            routes.push(RouteConfig {
                prefix: r.prefix,
                upstream: r.upstream,
                groups,
                rate: rate(&key("rate_limit"), r.rate_limit)?,
                max_body_bytes: r.max_body_bytes.unwrap_or(1024 * 1024),
                timeout: match r.timeout {
                    Some(t) => dur(&key("timeout"), &t)?,
                    None => Duration::from_secs(30),
                },
                client_cert_header: r.client_cert_header,
                forwarded,
                openapi: r.openapi.map(|p| dir.join(p)),
                openapi_base: r.openapi_base,
                strict_query: r.strict_query,
                action,
                upstream_ca: r.upstream_ca.map(|p| dir.join(p)),
                bind_device: r.bind_device,
                allow_override_headers: r.allow_override_headers,
            });
        }
        // On unless configured otherwise: a flood without credentials gets 429s, not work.
        let unauthenticated_per_ip = match raw.gateway.unauthenticated_per_ip {
            Some(r) => rate("gateway.unauthenticated_per_ip", Some(r))?,
            None => Some(Rate { per_second: 10.0, burst: 50 }),
        };
        Ok(Self {
            dns: dns_config(raw.dns, dir)?,
            unauthenticated_per_ip,
            routes,
            data_dir: raw.data_dir.unwrap_or_else(|| PathBuf::from("portcullis-data")),
            trust_domain,
            device_addr: addr("device.addr", &raw.device.addr)?,
            server_names,
            listener: ListenerConfig {
                handshake_timeout: dur("device.handshake_timeout", &raw.device.handshake_timeout)?,
                header_timeout: dur("device.header_timeout", &raw.device.header_timeout)?,
                request_timeout: dur("device.request_timeout", &raw.device.request_timeout)?,
                max_connections: raw.device.max_connections,
                max_connections_per_ip: raw.device.max_connections_per_ip.max(1),
                conn_metrics: Default::default(),
                handshakes_per_ip: rate("device.handshakes_per_ip", raw.device.handshakes_per_ip)?,
                workers: raw.device.workers,
                http2: http2_limits(raw.device.http2)?,
            },
            admin_addr: addr("admin.addr", &raw.admin.addr)?,
            policy: IssuancePolicy {
                device_cert_lifetime: dur("pki.device_cert_lifetime", &raw.pki.device_cert_lifetime)?,
                token_ttl: dur("pki.token_ttl", &raw.pki.token_ttl)?,
                crl_validity: dur("pki.crl_validity", &raw.pki.crl_validity)?,
                reenroll_limit: raw.pki.reenroll_limit.count,
                reenroll_window: dur("pki.reenroll_limit.per", &raw.pki.reenroll_limit.per)?,
            },
            server_cert_lifetime: dur("pki.server_cert_lifetime", &raw.pki.server_cert_lifetime)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_file() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.device_addr.port(), 8443);
        assert_eq!(c.admin_addr.to_string(), "127.0.0.1:7080");
        assert_eq!(c.policy.device_cert_lifetime, Duration::from_secs(30 * 86400));
        assert!(c.server_names.iter().any(|n| n == "localhost"));
    }

    #[test]
    fn example_config_parses() {
        // Loaded from its place, so the document it names resolves beside it.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../portcullis.example.toml");
        let c = Config::load(Some(Path::new(path))).unwrap();
        assert_eq!(c.trust_domain.as_str(), "fleet.example.com");
        assert_eq!(c.routes.len(), 1);
        portcullis_gateway::RouteTable::try_new(c.routes).unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml("[pki]\ntoken_ttl = \"soon\"").unwrap_err();
        assert!(format!("{e:#}").contains("pki.token_ttl"), "{e:#}");
        let e = Config::from_toml("[device]\naddr = \"nowhere\"").unwrap_err();
        assert!(format!("{e:#}").contains("device.addr"), "{e:#}");
        let e = Config::from_toml("[device]\nbogus = 1").unwrap_err();
        assert!(format!("{e:#}").contains("bogus"), "{e:#}");
        let e = Config::from_toml("[dns.lists.t]\npath = \"t.txt\"\nmatch = \"prefix\"").unwrap_err();
        assert!(format!("{e:#}").contains("dns.lists.t.match"), "{e:#}");
    }
}
