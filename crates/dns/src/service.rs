//! The DNS service around the resolver: lists read from files and URLs and refreshed,
//! policies built from the configuration and from device profiles, attribution of a
//! query to a device (by registered address, by DoT or DoH client certificate), the
//! query log, and the DoT and DoH front ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::{DomainSet, Policy, PolicyTable};
use tokio::net::{TcpListener, UdpSocket};

use std::path::PathBuf;

use crate::config::{DnsConfig, ListFrom, ListSource};

/// Why the DNS service could not start or take a new configuration. Messages name the
/// list, policy, address or key at fault (the binary prints them as they are).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// A list file could not be read.
    #[error("dns list {name:?}: {reason}")]
    List {
        /// The list's name under `[dns.lists]`.
        name: String,
        /// Why.
        reason: String,
    },
    /// An allow or deny rule that is not a domain.
    #[error("dns policy {policy:?}: {what} rule {rule:?} is not a domain")]
    Rule {
        /// The policy.
        policy: String,
        /// `allow` or `deny`.
        what: &'static str,
        /// The rule as written.
        rule: String,
    },
    /// The DNS port could not be bound.
    #[error("cannot bind the DNS port ({proto}) to {addr}: {error}")]
    Bind {
        /// `udp`, `tcp` or `dot`.
        proto: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The system's answer.
        error: std::io::Error,
    },
    /// Port 0 asked for, and no port was free on both UDP and TCP.
    #[error("no port free for DNS on both UDP and TCP at {0}")]
    NoFreePort(SocketAddr),
    /// `dns.upstream_ca` could not be used.
    #[error("dns.upstream_ca: {0}")]
    UpstreamCa(portcullis_client::tls::TlsError),
    /// An upstream that cannot be used.
    #[error("{0}")]
    Upstream(crate::BadUpstream),
    /// The registry could not be read.
    #[error("registry: {0}")]
    Registry(portcullis_store::Error),
    /// A panic elsewhere poisoned the lists' lock.
    #[error("dns lists lock poisoned")]
    Poisoned,
}

/// The lists in force and where they come from. Each refresh builds the new list beside
/// the old one and swaps the whole policy table at once: no query ever sees a half-built
/// list, and the old list's memory goes when the last query using it finishes.
pub struct DnsLists {
    state: std::sync::Mutex<ListState>,
    cache_dir: PathBuf,
    builder: ListBuilder,
}

impl std::fmt::Debug for DnsLists {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsLists").field("cache_dir", &self.cache_dir).finish_non_exhaustive()
    }
}

#[derive(Default)]
struct ListState {
    cfg: Option<DnsConfig>,
    sets: HashMap<String, (Arc<DomainSet>, u64)>,
    stats: HashMap<String, crate::ListStats>,
    next: HashMap<String, std::time::Instant>,
}

type Loaded = Result<Option<(Arc<DomainSet>, crate::ListStats, u64)>, String>;

enum BuildJob {
    Load {
        name: String,
        path: PathBuf,
        plain: crate::Match,
        known: Option<u64>,
        reply: std::sync::mpsc::Sender<Loaded>,
    },
    Retire(Arc<DomainSet>),
}

/// One thread reads, builds and frees every list: the file's text, the new list and,
/// once no policy table holds it any more, the replaced one. The allocator then gets all
/// of a list's memory back on the thread that allocated it and returns it to the system,
/// so refreshes do not ratchet memory up (memory freed from another, idle thread lingers).
#[derive(Clone)]
struct ListBuilder {
    jobs: std::sync::mpsc::Sender<BuildJob>,
}

/// Reads `path`; `None` when its digest is `known` (unchanged).
fn load_list(name: &str, path: &std::path::Path, plain: crate::Match, known: Option<u64>) -> Loaded {
    let fail = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(fail)?;
    let size = file.metadata().map(|m| m.len() as usize).unwrap_or(0);
    // Read and parsed in one pass; an unchanged list (same digest) is then dropped here.
    let (set, stats, d) =
        DomainSet::parse_reader(std::io::BufReader::new(file), size, plain).map_err(fail)?;
    if known == Some(d) {
        return Ok(None);
    }
    log_stats(name, &stats);
    Ok(Some((Arc::new(set), stats, d)))
}

fn log_stats(name: &str, stats: &crate::ListStats) {
    tracing::info!(list = %name, entries = stats.entries, comments = stats.comments, junk = stats.junk,
        "dns list loaded");
    if stats.junk > 0 {
        tracing::warn!(list = %name, junk = stats.junk, examples = ?stats.junk_examples,
            "dns list has lines that are no rule; skipped");
    }
}

impl ListBuilder {
    fn start() -> Self {
        let (jobs, rx) = std::sync::mpsc::channel::<BuildJob>();
        let spawned = std::thread::Builder::new().name("dns-lists".into()).spawn(move || {
            let mut retired: Vec<Arc<DomainSet>> = Vec::new();
            loop {
                match rx.recv_timeout(std::time::Duration::from_millis(200)) {
                    Ok(BuildJob::Load { name, path, plain, known, reply }) => {
                        let _ = reply.send(load_list(&name, &path, plain, known));
                    }
                    Ok(BuildJob::Retire(set)) => retired.push(set),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
                // The last owner drops it, here.
                retired.retain(|s| Arc::strong_count(s) > 1);
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "dns: cannot start the list thread; lists are built in place");
        }
        Self { jobs }
    }

    /// Reads and parses on the list thread (in place if it is gone); blocks.
    fn load(&self, name: &str, path: &std::path::Path, plain: crate::Match, known: Option<u64>) -> Loaded {
        let (reply, rx) = std::sync::mpsc::channel();
        let job = BuildJob::Load { name: name.to_owned(), path: path.to_owned(), plain, known, reply };
        match self.jobs.send(job) {
            Ok(()) => rx.recv().map_err(|_| "the list thread stopped".to_owned())?,
            Err(_) => load_list(name, path, plain, known),
        }
    }

    fn retire(&self, set: Arc<DomainSet>) {
        let _ = self.jobs.send(BuildJob::Retire(set));
    }
}

impl DnsLists {
    /// Reads the file lists and the last good copies of URL lists (fetched again at the
    /// first refresh), and builds the policies.
    pub fn new(cfg: &DnsConfig, cache_dir: PathBuf) -> Result<(Self, PolicyTable), ServiceError> {
        let me = Self {
            state: std::sync::Mutex::new(ListState::default()),
            cache_dir,
            builder: ListBuilder::start(),
        };
        let table = me.reconfigure(cfg)?;
        Ok((me, table))
    }

    fn cache_file(&self, name: &str) -> PathBuf {
        self.cache_dir.join(format!("{name}.txt"))
    }

    /// Applies a (re)loaded configuration: file lists are read now; URL lists keep their
    /// current copy (or the cached one) until their refresh. Any unreadable file fails
    /// the whole reload and changes nothing.
    pub fn reconfigure(&self, cfg: &DnsConfig) -> Result<PolicyTable, ServiceError> {
        let mut st = self.state.lock().map_err(|_| ServiceError::Poisoned)?;
        let mut sets = HashMap::new();
        let mut next = HashMap::new();
        let mut stats = HashMap::new();
        let now = std::time::Instant::now();
        for src in &cfg.lists {
            let current = st.sets.get(&src.name).cloned();
            let known_stats = st.stats.get(&src.name).cloned();
            let (entry, found, due) = match &src.from {
                ListFrom::File(path) => {
                    let loaded = self
                        .builder
                        .load(&src.name, path, src.matching, current.as_ref().map(|(_, d)| *d))
                        .map_err(|reason| ServiceError::List { name: src.name.clone(), reason })?;
                    match (loaded, current) {
                        (Some((set, found, d)), _) => ((set, d), Some(found), now + src.refresh),
                        (None, Some(cur)) => (cur, known_stats, now + src.refresh),
                        (None, None) => ((Arc::new(DomainSet::new()), 0), None, now + src.refresh),
                    }
                }
                ListFrom::Url(url) => match current {
                    Some(cur) => (cur, known_stats, st.next.get(&src.name).copied().unwrap_or(now)),
                    None => {
                        match self.builder.load(&src.name, &self.cache_file(&src.name), src.matching, None) {
                            Ok(Some((set, found, d))) => {
                                tracing::info!(list = %src.name, url = %url,
                                "dns list: using the last good copy until it is fetched");
                                ((set, d), Some(found), now)
                            }
                            _ => ((Arc::new(DomainSet::new()), 0), None, now),
                        }
                    }
                },
            };
            sets.insert(src.name.clone(), entry);
            if let Some(f) = found {
                stats.insert(src.name.clone(), f);
            }
            next.insert(src.name.clone(), due);
        }
        let table = policy_table(cfg, &sets)?;
        let old = std::mem::replace(&mut *st, ListState { cfg: Some(cfg.clone()), sets, stats, next });
        for (_, (set, _)) in old.sets {
            self.builder.retire(set);
        }
        Ok(table)
    }

    /// Reads every list whose refresh is due; returns a new policy table if any changed.
    pub async fn refresh_due(&self) -> Option<PolicyTable> {
        let (cfg, due) = {
            let st = self.state.lock().ok()?;
            let cfg = st.cfg.clone()?;
            let now = std::time::Instant::now();
            let due: Vec<(ListSource, Option<u64>)> = cfg
                .lists
                .iter()
                .filter(|s| st.next.get(&s.name).is_none_or(|t| *t <= now))
                .map(|s| (s.clone(), st.sets.get(&s.name).map(|(_, d)| *d)))
                .collect();
            (cfg, due)
        };
        if due.is_empty() {
            return None;
        }
        let mut changed = Vec::new();
        for (src, known) in &due {
            let path = match &src.from {
                ListFrom::File(p) => Ok(p.clone()),
                // Fetched, kept as the last good copy, then read from there by the list thread.
                ListFrom::Url(u) => match fetch(u.as_str()).await {
                    Ok(text) => {
                        let _ = std::fs::create_dir_all(&self.cache_dir);
                        let tmp = self.cache_file(&format!(".{}", src.name));
                        let kept = std::fs::write(&tmp, &text)
                            .and_then(|()| std::fs::rename(&tmp, self.cache_file(&src.name)));
                        drop(text);
                        kept.map(|()| self.cache_file(&src.name))
                            .map_err(|e| format!("cannot keep the copy: {e}"))
                    }
                    Err(e) => Err(e),
                },
            };
            let loaded = match path {
                Ok(p) => {
                    let (builder, name, known, plain) =
                        (self.builder.clone(), src.name.clone(), *known, src.matching);
                    tokio::task::spawn_blocking(move || builder.load(&name, &p, plain, known))
                        .await
                        .unwrap_or_else(|e| Err(e.to_string()))
                }
                Err(e) => Err(e),
            };
            let retry = match &loaded {
                Ok(_) => src.refresh,
                // A list that cannot be read keeps its current copy; try again in a minute.
                Err(_) => src.refresh.min(std::time::Duration::from_secs(60)),
            };
            if let Ok(mut st) = self.state.lock() {
                st.next.insert(src.name.clone(), std::time::Instant::now() + retry);
            }
            match loaded {
                Ok(Some((set, found, d))) => changed.push((src.name.clone(), (set, d), found)),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(list = %src.name, error = %e, "dns list could not be read; keeping the current copy")
                }
            }
        }
        if changed.is_empty() {
            return None;
        }
        let mut st = self.state.lock().ok()?;
        for (name, set, found) in changed {
            st.stats.insert(name.clone(), found);
            if let Some((old, _)) = st.sets.insert(name, set) {
                self.builder.retire(old);
            }
        }
        match policy_table(&cfg, &st.sets) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "dns policies could not be rebuilt; the previous ones keep serving");
                None
            }
        }
    }
}

/// GETs a list over http(s) (system roots), at most 256 MiB, within 60 s.
async fn fetch(url: &str) -> Result<String, String> {
    use http_body_util::BodyExt;
    let tls = portcullis_client::tls::system_roots()
        .and_then(portcullis_client::tls::client_config)
        .map_err(|e| e.to_string())?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
    let uri: http::Uri = url.parse().map_err(|_| format!("{url}: not a URL"))?;
    let work = async {
        let resp = client.get(uri).await.map_err(|e| format!("{url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{url}: HTTP {}", resp.status()));
        }
        let body = http_body_util::Limited::new(resp.into_body(), 256 << 20)
            .collect()
            .await
            .map_err(|e| format!("{url}: {e}"))?
            .to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), work)
        .await
        .map_err(|_| format!("{url}: no complete answer within 60 s"))?
}

/// Builds the policies over the given lists.
fn policy_table(
    cfg: &DnsConfig,
    lists: &HashMap<String, (Arc<DomainSet>, u64)>,
) -> Result<PolicyTable, ServiceError> {
    let mut table = PolicyTable::default();
    let mut by_name: HashMap<&str, Arc<Policy>> = HashMap::new();
    for p in &cfg.policies {
        let rules = |what: &'static str, rules: &[String]| -> Result<DomainSet, ServiceError> {
            let mut set = DomainSet::new();
            for r in rules {
                if !set.add_rule(r) {
                    return Err(ServiceError::Rule { policy: p.name.clone(), what, rule: r.clone() });
                }
            }
            Ok(set)
        };
        let policy = Arc::new(Policy {
            name: p.name.clone(),
            mode: p.mode,
            lists: p
                .lists
                .iter()
                .filter_map(|l| lists.get(l.as_str()).map(|(s, _)| (l.clone(), s.clone())))
                .collect(),
            allow: rules("allow", &p.allow)?,
            deny: rules("deny", &p.deny)?,
            block: p.block,
        });
        if p.mode == crate::Mode::Allowlist {
            tracing::info!(policy = %p.name, groups = ?p.groups,
                "dns policy in allowlist mode: every name not on its lists or allow rules is DENIED");
        }
        for g in &p.groups {
            table.by_group.insert(g.clone(), policy.clone());
        }
        for d in &p.devices {
            table.by_device.insert(d.clone(), policy.clone());
        }
        by_name.insert(&p.name, policy);
    }
    table.default = cfg.default_policy.as_deref().and_then(|n| by_name.get(n).cloned());
    table.unknown = cfg.unknown_clients.as_deref().and_then(|n| by_name.get(n).cloned());
    Ok(table)
}

/// Binds UDP and TCP on the same address (port 0: one free port for both).
pub(crate) async fn bind(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), ServiceError> {
    for _ in 0..20 {
        let udp =
            UdpSocket::bind(addr).await.map_err(|error| ServiceError::Bind { proto: "udp", addr, error })?;
        let bound = udp.local_addr().map_err(|error| ServiceError::Bind { proto: "udp", addr, error })?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(_) if addr.port() == 0 => continue,
            Err(error) => return Err(ServiceError::Bind { proto: "tcp", addr, error }),
        }
    }
    Err(ServiceError::NoFreePort(addr))
}

/// Per device id, the allowlist policy derived from its profile's domains.
#[derive(Clone, Default)]
pub(crate) struct ProfilePolicies(Arc<std::sync::RwLock<Arc<ByDevice>>>);

impl std::fmt::Debug for ProfilePolicies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.read().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("ProfilePolicies").field("devices", &n).finish()
    }
}

type ByDevice = HashMap<String, Arc<Policy>>;

impl ProfilePolicies {
    fn get(&self, device: &str) -> Option<Arc<Policy>> {
        self.0.read().ok().and_then(|m| m.get(device).cloned())
    }

    fn set(&self, map: HashMap<String, Arc<Policy>>) {
        if let Ok(mut m) = self.0.write() {
            *m = Arc::new(map);
        }
    }
}

/// The allowlist a profile implies: its domains (and their subdomains) and nothing else.
fn profile_policies(
    devices: &[portcullis_store::Device],
    profiles: &[portcullis_store::ProfileRecord],
) -> HashMap<String, Arc<Policy>> {
    let mut by_profile: HashMap<&str, Arc<Policy>> = HashMap::new();
    for p in profiles {
        let domains = &p.document.domains;
        if domains.is_empty() {
            // A profile that names no domains says nothing about DNS: the group's policy applies.
            continue;
        }
        let mut allow = DomainSet::new();
        for d in domains {
            allow.add_rule(&format!("||{d}^"));
        }
        by_profile.insert(
            &p.name,
            Arc::new(Policy {
                name: format!("profile:{}", p.name),
                mode: crate::Mode::Allowlist,
                lists: Vec::new(),
                allow,
                deny: DomainSet::new(),
                block: crate::BlockResponse::default(),
            }),
        );
    }
    devices
        .iter()
        .filter_map(|d| {
            let p = by_profile.get(d.profile.as_deref()?)?;
            Some((d.id.to_string(), p.clone()))
        })
        .collect()
}

/// The registry's view for attribution: device addresses, rebuilt when the registry
/// generation moves (every address or state change bumps it).
#[derive(Default)]
struct AddressTable {
    exact: HashMap<std::net::IpAddr, crate::Client>,
    /// Longest prefix first.
    blocks: Vec<(portcullis_core::Cidr, crate::Client)>,
}

impl AddressTable {
    fn build(devices: &[portcullis_store::Device], profiles: &HashMap<String, Arc<Policy>>) -> Self {
        let mut t = Self::default();
        for d in devices {
            let client = crate::Client {
                device: d.id.to_string(),
                group: d.group.to_string(),
                active: d.state == portcullis_core::DeviceState::Active,
                profile: profiles.get(d.id.as_str()).cloned(),
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

    fn lookup(&self, ip: std::net::IpAddr) -> Option<crate::Client> {
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

/// Attribution by registered address, rebuilt whenever the store announces a change
/// (device state, addresses, profiles).
pub(crate) async fn attribution(
    authority: Arc<portcullis_pki::Authority>,
    profiles: ProfilePolicies,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(crate::Identify, tokio::task::JoinHandle<()>), ServiceError> {
    let load = |a: Arc<portcullis_pki::Authority>, out: ProfilePolicies| async move {
        let g = a.generation();
        let devices = a.store().devices().await.map_err(ServiceError::Registry)?;
        let policies =
            profile_policies(&devices, &a.store().profiles().await.map_err(ServiceError::Registry)?);
        let table = AddressTable::build(&devices, &policies);
        out.set(policies);
        Ok::<_, ServiceError>((g, table))
    };
    let mut changes = authority.store().changes().subscribe();
    let (mut seen, first) = load(authority.clone(), profiles.clone()).await?;
    let table = Arc::new(std::sync::RwLock::new(Arc::new(first)));
    let identify: crate::Identify = {
        let table = table.clone();
        Arc::new(move |ip| table.read().ok().and_then(|t| t.lookup(ip)))
    };
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
            if authority.generation() == seen {
                continue;
            }
            match load(authority.clone(), profiles.clone()).await {
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
pub(crate) fn query_log(
    authority: Arc<portcullis_pki::Authority>,
    cfg: &DnsConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> (crate::OnQuery, tokio::task::JoinHandle<()>) {
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
    // The series of each action, resolved once: no label lookup per query.
    const ACTIONS: [&str; 4] = ["allowed", "blocked", "refused", "failed"];
    let by_action: [Counter; 4] =
        ACTIONS.map(|action| queries.get_or_create(&ActionLabel { action }).clone());
    let on_query: crate::OnQuery = Arc::new(move |ev: crate::QueryEvent| {
        match ACTIONS.iter().position(|a| *a == ev.action) {
            Some(i) => by_action[i].inc(),
            None => queries.get_or_create(&ActionLabel { action: ev.action }).inc(),
        };
        if !enabled {
            return;
        }
        let rec = portcullis_store::DnsQueryRecord {
            at: time::OffsetDateTime::now_utc(),
            client: ip_text(ev.client),
            device: ev.device,
            name: ev.name,
            qtype: std::borrow::Cow::Borrowed(ev.qtype.into()),
            action: std::borrow::Cow::Borrowed(ev.action),
            reason: ev.reason,
            rcode: std::borrow::Cow::Borrowed(ev.rcode.to_str()),
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
    profiles: &ProfilePolicies,
    peer: Option<&portcullis_pki::PeerCertificate>,
) -> crate::Attribution {
    let Some(peer) = peer else { return crate::Attribution::ByAddress };
    match authority.authenticate(Some(peer)).await {
        Ok(d) => crate::Attribution::Device(crate::Client {
            device: d.id.to_string(),
            group: d.group.to_string(),
            active: true,
            profile: profiles.get(d.id.as_str()),
        }),
        // A certificate that does not authenticate is refused, never treated as no
        // certificate (which may fall back to a more permissive policy).
        Err(e) => crate::Attribution::Refused(Arc::new(e)),
    }
}

/// DoT attribution: the connection's certificate, checked live at every query.
pub(crate) fn tls_attribution(
    authority: Arc<portcullis_pki::Authority>,
    verifier: portcullis_pki::ClientCertVerifier,
    profiles: ProfilePolicies,
) -> crate::TlsAttribution {
    Arc::new(move |chain| {
        let peer = chain.map(|c| {
            let verified = verifier.verify(&c);
            portcullis_pki::PeerCertificate::new(c, verified)
        });
        let verified = peer.as_ref().is_some_and(|p| p.verified.is_ok());
        let (authority, profiles) = (authority.clone(), profiles.clone());
        let attribution: crate::ConnAttribution = Arc::new(move || {
            let (authority, profiles, peer) = (authority.clone(), profiles.clone(), peer.clone());
            Box::pin(async move { attribute_peer(&authority, &profiles, peer.as_ref()).await })
        });
        (attribution, verified)
    })
}

/// The TLS configuration of the DoT port: the device port's, with ALPN `dot` (RFC 7858).
pub(crate) fn dot_tls(device: &rustls::ServerConfig) -> Arc<rustls::ServerConfig> {
    let mut cfg = device.clone();
    cfg.alpn_protocols = vec![b"dot".to_vec()];
    Arc::new(cfg)
}

/// The path DNS-over-HTTPS answers at on the device port (RFC 8484).
pub const DOH_PATH: &str = "/dns-query";

#[derive(Clone)]
struct Doh {
    resolver: Arc<crate::Resolver>,
    authority: Arc<portcullis_pki::Authority>,
    profiles: ProfilePolicies,
}

/// DNS-over-HTTPS (RFC 8484): `GET /dns-query?dns=<base64url>` and `POST /dns-query` with
/// `application/dns-message`; the client certificate (if any) attributes the query.
pub(crate) fn doh_router(
    resolver: Arc<crate::Resolver>,
    authority: Arc<portcullis_pki::Authority>,
    profiles: ProfilePolicies,
) -> axum::Router {
    axum::Router::new().route(DOH_PATH, axum::routing::get(doh_get).post(doh_post)).with_state(Doh {
        resolver,
        authority,
        profiles,
    })
}

const DNS_MESSAGE: &str = "application/dns-message";

fn doh_problem(status: axum::http::StatusCode, detail: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    portcullis_http::Problem::new(status, "dns-query", detail.to_owned()).into_response()
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
        // Read (a bounded amount of) what the client is still sending first: over HTTP/2
        // an answer sent before the request's DATA was read can reach the client as a
        // stream reset instead of the 415.
        portcullis_http::drain(req.into_body()).await;
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
    let who = attribute_peer(&d.authority, &d.profiles, peer).await;
    match d.resolver.answer_for(bytes, src, false, who).await {
        Some(out) => ([(axum::http::header::CONTENT_TYPE, DNS_MESSAGE)], out).into_response(),
        None => doh_problem(axum::http::StatusCode::BAD_REQUEST, "not a DNS query"),
    }
}

/// The configured upstreams; DoT and DoH ones verified against `upstream_ca` or the
/// system roots.
pub(crate) fn upstreams(cfg: &DnsConfig) -> Result<Vec<crate::Upstream>, ServiceError> {
    let roots = match &cfg.upstream_ca {
        Some(path) => portcullis_client::tls::roots_from_file(path).map_err(ServiceError::UpstreamCa)?,
        // Without system roots only plain-DNS upstreams work; a DoT or DoH one fails its
        // handshake and is reported per query, as before.
        None => portcullis_client::tls::system_roots().unwrap_or_else(|_| rustls::RootCertStore::empty()),
    };
    let roots = Arc::new(roots);
    cfg.upstreams.iter().map(|u| crate::Upstream::parse(u, &roots).map_err(ServiceError::Upstream)).collect()
}

impl DnsLists {
    /// The policies and lists in force, for the admin API and CLI.
    pub fn describe(&self) -> DnsPolicies {
        let empty = || DnsPolicies {
            policies: Vec::new(),
            lists: Vec::new(),
            unknown_clients: "refuse".into(),
            default_policy: None,
        };
        let Ok(st) = self.state.lock() else { return empty() };
        let Some(cfg) = &st.cfg else { return empty() };
        let policies = cfg
            .policies
            .iter()
            .map(|p| PolicyView {
                name: p.name.clone(),
                mode: p.mode,
                groups: p.groups.clone(),
                devices: p.devices.clone(),
                lists: p.lists.clone(),
                allow: p.allow.clone(),
                deny: p.deny.clone(),
                block: p.block,
                everything_else: match p.mode {
                    crate::Mode::Allowlist => "DENIED: only the lists and allow rules resolve",
                    crate::Mode::Blocklist => "resolved",
                }
                .into(),
            })
            .collect();
        let lists = cfg
            .lists
            .iter()
            .map(|l| {
                let (file, url) = match &l.from {
                    ListFrom::File(p) => (Some(p.display().to_string()), None),
                    ListFrom::Url(u) => (None, Some(u.clone())),
                };
                let stats = st.stats.get(&l.name);
                ListView {
                    name: l.name.clone(),
                    file,
                    url,
                    matching: l.matching,
                    refresh_s: l.refresh.as_secs(),
                    rules: st.sets.get(&l.name).map_or(0, |(s, _)| s.len() as u64),
                    comments: stats.map_or(0, |s| s.comments as u64),
                    junk: stats.map_or(0, |s| s.junk as u64),
                    junk_examples: stats.map(|s| s.junk_examples.clone()).unwrap_or_default(),
                }
            })
            .collect();
        DnsPolicies {
            policies,
            lists,
            unknown_clients: cfg.unknown_clients.clone().unwrap_or_else(|| "refuse".into()),
            default_policy: cfg.default_policy.clone(),
        }
    }
}

/// The DNS policies and lists in force, as the admin API describes them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DnsPolicies {
    /// Every policy.
    pub policies: Vec<PolicyView>,
    /// Every list.
    pub lists: Vec<ListView>,
    /// The policy for queries from no known device, or `refuse`.
    pub unknown_clients: String,
    /// The policy for devices no other policy names.
    pub default_policy: Option<String>,
}

/// One policy.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PolicyView {
    /// Its name.
    pub name: String,
    /// Blocklist or allowlist.
    pub mode: crate::Mode,
    /// The groups it applies to.
    pub groups: Vec<String>,
    /// The devices it applies to.
    pub devices: Vec<String>,
    /// Its lists.
    pub lists: Vec<String>,
    /// Names always resolved.
    pub allow: Vec<String>,
    /// Names never resolved.
    pub deny: Vec<String>,
    /// What a blocked name gets.
    pub block: crate::BlockResponse,
    /// What happens to every name no rule or list mentions.
    pub everything_else: String,
}

/// One list and what loading it found.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ListView {
    /// Its name.
    pub name: String,
    /// Read from this file,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// or fetched from this URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// How its plain names match.
    #[serde(rename = "match")]
    pub matching: crate::Match,
    /// Refresh period.
    pub refresh_s: u64,
    /// Rules loaded.
    pub rules: u64,
    /// Comment lines.
    pub comments: u64,
    /// Lines that were neither (skipped).
    pub junk: u64,
    /// A few of those: line number and text.
    pub junk_examples: Vec<(usize, String)>,
}

/// An address as text for the query log, without the formatter's machinery for IPv4
/// (a tenth of its cost; this runs for every query).
fn ip_text(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut out = String::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
            out
        }
        v6 => v6.to_string(),
    }
}

#[cfg(test)]
mod ip_text_tests {
    #[test]
    fn matches_the_standard_formatting() {
        for ip in
            ["0.0.0.0", "10.0.0.1", "127.0.0.1", "192.168.100.255", "255.255.255.255", "1.20.100.9", "::1"]
        {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(super::ip_text(ip), ip.to_string());
        }
    }
}
