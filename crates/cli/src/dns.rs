//! The DNS port: policies from the configuration, lists read from their files.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use portcullis_dns::{DomainSet, Policy, PolicyTable};
use tokio::net::{TcpListener, UdpSocket};

use crate::config::DnsConfig;

/// Reads every list and builds the policies; any unreadable list fails the whole table
/// (the caller keeps the previous one). Junk lines are counted and logged, never fatal.
pub fn policy_table(cfg: &DnsConfig) -> anyhow::Result<PolicyTable> {
    let mut lists: HashMap<&str, Arc<DomainSet>> = HashMap::new();
    for (name, path) in &cfg.lists {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("dns list {name:?}: cannot read {}", path.display()))?;
        let (set, stats) = DomainSet::parse(&text);
        tracing::info!(list = %name, path = %path.display(), entries = stats.entries, comments = stats.comments,
            junk = stats.junk, "dns list loaded");
        if stats.junk > 0 {
            tracing::warn!(list = %name, junk = stats.junk, examples = ?stats.junk_examples,
                "dns list has lines that are no rule; skipped");
        }
        lists.insert(name, Arc::new(set));
    }
    let mut table = PolicyTable::default();
    let mut by_name: HashMap<&str, Arc<Policy>> = HashMap::new();
    for p in &cfg.policies {
        let rules = |what: &str, rules: &[String]| -> anyhow::Result<DomainSet> {
            let mut set = DomainSet::new();
            for r in rules {
                anyhow::ensure!(
                    set.add_rule(r),
                    "dns policy {:?}: {what} rule {r:?} is not a domain",
                    p.name
                );
            }
            Ok(set)
        };
        let policy = Arc::new(Policy {
            name: p.name.clone(),
            mode: p.mode,
            lists: p
                .lists
                .iter()
                .filter_map(|l| lists.get(l.as_str()).map(|s| (l.clone(), s.clone())))
                .collect(),
            allow: rules("allow", &p.allow)?,
            deny: rules("deny", &p.deny)?,
            block: p.block,
        });
        if p.mode == portcullis_dns::Mode::Allowlist {
            tracing::info!(policy = %p.name, groups = ?p.groups,
                "dns policy in allowlist mode: every name not on its lists or allow rules is DENIED");
        }
        for g in &p.groups {
            table.by_group.insert(g.clone(), policy.clone());
        }
        by_name.insert(&p.name, policy);
    }
    table.default = cfg.default_policy.as_deref().and_then(|n| by_name.get(n).cloned());
    table.unknown = cfg.unknown_clients.as_deref().and_then(|n| by_name.get(n).cloned());
    Ok(table)
}

/// Binds UDP and TCP on the same address (port 0: one free port for both).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<(UdpSocket, TcpListener)> {
    for _ in 0..20 {
        let udp = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("cannot bind the DNS port (udp) to {addr}"))?;
        let bound = udp.local_addr()?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(_) if addr.port() == 0 => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot bind the DNS port (tcp) to {addr}")),
        }
    }
    anyhow::bail!("no port free for DNS on both UDP and TCP at {addr}")
}

/// The registry's view for attribution: device addresses, rebuilt when the registry
/// generation moves (every address or state change bumps it).
#[derive(Default)]
struct AddressTable {
    exact: HashMap<std::net::IpAddr, portcullis_dns::Client>,
    /// Longest prefix first.
    blocks: Vec<(portcullis_core::Cidr, portcullis_dns::Client)>,
}

impl AddressTable {
    fn build(devices: &[portcullis_store::Device]) -> Self {
        let mut t = Self::default();
        for d in devices {
            let client = portcullis_dns::Client {
                device: d.id.to_string(),
                group: d.group.to_string(),
                active: d.state == portcullis_core::DeviceState::Active,
            };
            for a in &d.addresses {
                let Ok(cidr) = a.parse::<portcullis_core::Cidr>() else { continue };
                let full = if cidr.addr().is_ipv4() { 32 } else { 128 };
                if cidr.len() == full {
                    t.exact.insert(cidr.addr(), client.clone());
                } else {
                    t.blocks.push((cidr, client.clone()));
                }
            }
        }
        t.blocks.sort_by_key(|(c, _)| std::cmp::Reverse(c.len()));
        t
    }

    fn lookup(&self, ip: std::net::IpAddr) -> Option<portcullis_dns::Client> {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        self.exact
            .get(&ip)
            .cloned()
            .or_else(|| self.blocks.iter().find(|(c, _)| c.contains(ip)).map(|(_, d)| d.clone()))
    }
}

/// Attribution by registered address, kept within a quarter second of the registry.
pub async fn attribution(
    authority: Arc<portcullis_pki::Authority>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(portcullis_dns::Identify, tokio::task::JoinHandle<()>)> {
    let load = |a: Arc<portcullis_pki::Authority>| async move {
        let g = a.generation();
        let devices = a.store().devices().await?;
        anyhow::Ok((g, AddressTable::build(&devices)))
    };
    let (mut seen, first) = load(authority.clone()).await?;
    let table = Arc::new(std::sync::RwLock::new(Arc::new(first)));
    let identify: portcullis_dns::Identify = {
        let table = table.clone();
        Arc::new(move |ip| table.read().ok().and_then(|t| t.lookup(ip)))
    };
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
                _ = stop.changed() => return,
            }
            if authority.generation() == seen {
                continue;
            }
            match load(authority.clone()).await {
                Ok((g, fresh)) => {
                    seen = g;
                    if let Ok(mut t) = table.write() {
                        *t = Arc::new(fresh);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "dns: cannot reload device addresses; keeping the previous ones")
                }
            }
        }
    });
    Ok((identify, task))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ActionLabel {
    action: &'static str,
}

/// The query log (batched into the store, never blocking a query: when the writer falls
/// behind, entries are dropped and counted) and the Prometheus counters.
pub fn query_log(
    authority: Arc<portcullis_pki::Authority>,
    cfg: &DnsConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> (portcullis_dns::OnQuery, tokio::task::JoinHandle<()>) {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    let queries: Family<ActionLabel, Counter> = Family::default();
    let dropped: Counter = Counter::default();
    authority.metrics().register(|r| {
        r.register(
            "dns_queries",
            "DNS queries by action (allowed, blocked, refused, failed)",
            queries.clone(),
        );
        r.register(
            "dns_query_log_dropped",
            "Query-log entries dropped because the writer fell behind",
            dropped.clone(),
        );
    });
    let (tx, mut rx) = tokio::sync::mpsc::channel::<portcullis_store::DnsQueryRecord>(50_000);
    let enabled = cfg.log_queries;
    let on_query: portcullis_dns::OnQuery = Arc::new(move |ev: portcullis_dns::QueryEvent| {
        queries.get_or_create(&ActionLabel { action: ev.action }).inc();
        if !enabled {
            return;
        }
        let rec = portcullis_store::DnsQueryRecord {
            at: time::OffsetDateTime::now_utc(),
            client: ev.client.to_string(),
            device: ev.device,
            name: ev.name,
            qtype: ev.qtype,
            action: ev.action.to_owned(),
            reason: ev.reason,
            rcode: ev.rcode,
            upstream_us: ev.upstream_us,
        };
        if tx.try_send(rec).is_err() {
            dropped.inc();
        }
    });
    let (retention, max_rows) = (cfg.log_retention, cfg.log_max_rows);
    let task = tokio::spawn(async move {
        let store = authority.store().clone();
        let mut prune = tokio::time::interval(std::time::Duration::from_secs(60));
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                got = rx.recv_many(&mut batch, 2_000) => {
                    if got == 0 {
                        return;
                    }
                    if let Err(e) = store.log_dns_queries(std::mem::take(&mut batch)).await {
                        tracing::error!(error = %e, "dns: cannot write the query log");
                    }
                }
                _ = prune.tick() => {
                    let before = time::OffsetDateTime::now_utc() - retention;
                    match store.prune_dns_queries(before, max_rows).await {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(rows = n, "dns: query log pruned"),
                        Err(e) => tracing::error!(error = %e, "dns: cannot prune the query log"),
                    }
                }
                _ = stop.changed() => {
                    rx.close();
                    while let Ok(r) = rx.try_recv() {
                        batch.push(r);
                    }
                    let _ = store.log_dns_queries(batch).await;
                    return;
                }
            }
        }
    });
    (on_query, task)
}

/// What a verified (or refused) client certificate says about a DNS client.
async fn attribute_peer(
    authority: &portcullis_pki::Authority,
    peer: Option<&portcullis_pki::PeerCertificate>,
) -> portcullis_dns::Attribution {
    use portcullis_pki::AuthError;
    let Some(peer) = peer else { return portcullis_dns::Attribution::ByAddress };
    match authority.authenticate(Some(peer)).await {
        Ok(d) => portcullis_dns::Attribution::Device(portcullis_dns::Client {
            device: d.id.to_string(),
            group: d.group.to_string(),
            active: true,
        }),
        // A certificate that does not authenticate is refused, never treated as no
        // certificate (which may fall back to a more permissive policy).
        Err(e) => {
            let device = match &e {
                AuthError::DeviceSuspended(id) | AuthError::DeviceRevoked(id) => id.to_string(),
                _ => format!("(refused certificate: {e})"),
            };
            portcullis_dns::Attribution::Device(portcullis_dns::Client {
                device,
                group: String::new(),
                active: false,
            })
        }
    }
}

/// DoT attribution: the connection's certificate, checked live at every query.
pub fn tls_attribution(
    authority: Arc<portcullis_pki::Authority>,
    verifier: portcullis_pki::ClientCertVerifier,
) -> portcullis_dns::TlsAttribution {
    Arc::new(move |chain| {
        let peer = chain.map(|c| {
            let verified = verifier.verify(&c);
            portcullis_pki::PeerCertificate::new(c, verified)
        });
        let authority = authority.clone();
        Arc::new(move || {
            let (authority, peer) = (authority.clone(), peer.clone());
            Box::pin(async move { attribute_peer(&authority, peer.as_ref()).await })
        })
    })
}

/// The TLS configuration of the DoT port: the device port's, with ALPN `dot` (RFC 7858).
pub fn dot_tls(device: &rustls::ServerConfig) -> Arc<rustls::ServerConfig> {
    let mut cfg = device.clone();
    cfg.alpn_protocols = vec![b"dot".to_vec()];
    Arc::new(cfg)
}

/// The path DNS-over-HTTPS answers at on the device port (RFC 8484).
pub const DOH_PATH: &str = "/dns-query";

#[derive(Clone)]
struct Doh {
    resolver: Arc<portcullis_dns::Resolver>,
    authority: Arc<portcullis_pki::Authority>,
}

/// DNS-over-HTTPS (RFC 8484): `GET /dns-query?dns=<base64url>` and `POST /dns-query` with
/// `application/dns-message`; the client certificate (if any) attributes the query.
pub fn doh_router(
    resolver: Arc<portcullis_dns::Resolver>,
    authority: Arc<portcullis_pki::Authority>,
) -> axum::Router {
    axum::Router::new()
        .route(DOH_PATH, axum::routing::get(doh_get).post(doh_post))
        .with_state(Doh { resolver, authority })
}

const DNS_MESSAGE: &str = "application/dns-message";

fn doh_problem(status: axum::http::StatusCode, detail: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    portcullis_pki::Problem::new(status, "dns-query", detail.to_owned()).into_response()
}

#[derive(serde::Deserialize)]
struct DohQuery {
    dns: Option<String>,
}

async fn doh_get(
    axum::extract::State(d): axum::extract::State<Doh>,
    axum::extract::Query(q): axum::extract::Query<DohQuery>,
    req: axum::extract::Request,
) -> axum::response::Response {
    use base64::Engine;
    let Some(b64) = q.dns else {
        return doh_problem(
            axum::http::StatusCode::BAD_REQUEST,
            "missing the dns query parameter (RFC 8484)",
        );
    };
    if b64.len() > 87_400 {
        return doh_problem(axum::http::StatusCode::URI_TOO_LONG, "dns parameter too long");
    }
    match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b64.trim_end_matches('=')) {
        Ok(bytes) => doh_answer(&d, req.extensions(), &bytes).await,
        Err(_) => doh_problem(axum::http::StatusCode::BAD_REQUEST, "dns parameter is not base64url"),
    }
}

async fn doh_post(
    axum::extract::State(d): axum::extract::State<Doh>,
    req: axum::extract::Request,
) -> axum::response::Response {
    let ct = req.headers().get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case(DNS_MESSAGE) {
        return doh_problem(
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/dns-message",
        );
    }
    let (parts, body) = req.into_parts();
    match axum::body::to_bytes(body, 65_535).await {
        Ok(bytes) => doh_answer(&d, &parts.extensions, &bytes).await,
        Err(_) => {
            doh_problem(axum::http::StatusCode::PAYLOAD_TOO_LARGE, "a DNS message is at most 65535 bytes")
        }
    }
}

async fn doh_answer(d: &Doh, ext: &axum::http::Extensions, bytes: &[u8]) -> axum::response::Response {
    use axum::response::IntoResponse;
    let peer = ext.get::<portcullis_pki::PeerCertificate>();
    let src = ext
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
    let who = attribute_peer(&d.authority, peer).await;
    match d.resolver.answer_for(bytes, src, false, who).await {
        Some(out) => ([(axum::http::header::CONTENT_TYPE, DNS_MESSAGE)], out).into_response(),
        None => doh_problem(axum::http::StatusCode::BAD_REQUEST, "not a DNS query"),
    }
}
