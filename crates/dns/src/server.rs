//! The resolver: attribute the query to a client, decide by its policy, answer from the
//! cache or the upstreams, inspect the CNAME chain; served over UDP and TCP.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, HINFO};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use portcullis_net::conns::{ConnLimits, ConnMetrics, Conns, Slot};
use portcullis_net::{Limiter, Rate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::cache::Cache;
use crate::policy::{BlockResponse, Policy, Rule, Verdict};
use crate::upstream::Upstreams;

/// Who asked: the device a query is attributed to.
#[derive(Debug, Clone)]
pub struct Client {
    /// Its device id.
    pub device: String,
    /// Its group (selects the policy).
    pub group: String,
    /// False for a suspended or revoked device: its queries are refused.
    pub active: bool,
    /// The allowlist derived from the device's profile (its allowed domains), if it has
    /// one: it beats the group's policy; a policy naming the device in the
    /// configuration beats it.
    pub profile: Option<Arc<Policy>>,
}

/// Attributes a source address to a device (from the registry).
pub type Identify = Arc<dyn Fn(IpAddr) -> Option<Client> + Send + Sync>;

/// How a query's client is known.
#[derive(Debug, Clone)]
pub enum Attribution {
    /// By its source address (registered device addresses).
    ByAddress,
    /// Already known (a verified client certificate); `active: false` refuses it.
    Device(Client),
    /// A client certificate that does not authenticate (another CA, expired, revoked,
    /// unknown, a suspended device): refused, never taken for no certificate (which may
    /// fall back to a more permissive policy).
    Refused(Arc<portcullis_pki::AuthError>),
}

/// Attributes one DoT connection's queries: called per query so that suspension and
/// revocation apply to open connections too.
pub type ConnAttribution =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Attribution> + Send>> + Send + Sync>;

/// Makes the [`ConnAttribution`] of a new DoT connection from the client certificate
/// chain it presented (if any), and says whether that chain verified against the CA (the
/// connection then belongs to a device and is never shed).
pub type TlsAttribution = Arc<
    dyn Fn(Option<Vec<rustls::pki_types::CertificateDer<'static>>>) -> (ConnAttribution, bool) + Send + Sync,
>;

/// One answered query, for the query log and metrics.
#[derive(Debug, Clone)]
pub struct QueryEvent {
    /// The client's address.
    pub client: IpAddr,
    /// The device it was attributed to.
    pub device: Option<String>,
    /// The name asked (lower case, no trailing dot).
    pub name: String,
    /// Its type.
    pub qtype: RecordType,
    /// `allowed`, `blocked`, `refused` or `failed`.
    pub action: &'static str,
    /// The rule or reason.
    pub reason: String,
    /// The response code sent.
    pub rcode: ResponseCode,
    /// Time the upstream took, when one was asked.
    pub upstream_us: Option<u64>,
}

/// Receives every [`QueryEvent`]; must not block.
pub type OnQuery = Arc<dyn Fn(QueryEvent) + Send + Sync>;

/// The policies in force. Replaced whole on reload.
#[derive(Debug, Default)]
pub struct PolicyTable {
    /// By device id: overrides the group's.
    pub by_device: HashMap<String, Arc<Policy>>,
    /// By group name.
    pub by_group: HashMap<String, Arc<Policy>>,
    /// For devices whose group has no policy.
    pub default: Option<Arc<Policy>>,
    /// For queries no device is attributed to; `None`: refused.
    pub unknown: Option<Arc<Policy>>,
}

/// Listener limits.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Queries per second per source address (beyond it they are dropped).
    pub per_client: Option<Rate>,
    /// TCP connections at once (and DoT connections at once, separately). At the cap
    /// the oldest idle connection without a device certificate is closed for a new one.
    pub max_tcp_connections: usize,
    /// TCP (and DoT) connections at once from one address.
    pub tcp_connections_per_ip: usize,
    /// Most time from the end of an answer (or the handshake) to the whole next query:
    /// a client that trickles bytes gets no more than this per query.
    pub tcp_idle_timeout: Duration,
    /// Most time one TCP or DoT connection stays open, however busy.
    pub tcp_session_timeout: Duration,
    /// UDP queries being answered at once; beyond it new ones are dropped (counted).
    pub max_udp_in_flight: usize,
    /// Where connection admissions are counted.
    pub conn_metrics: ConnMetrics,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            per_client: Some(Rate { per_second: 200.0, burst: 400 }),
            max_tcp_connections: 1_000,
            tcp_connections_per_ip: 16,
            tcp_idle_timeout: Duration::from_secs(10),
            tcp_session_timeout: Duration::from_secs(300),
            max_udp_in_flight: 1_024,
            conn_metrics: ConnMetrics::default(),
        }
    }
}

/// Queries answered at once on one TCP or DoT connection (RFC 7766 pipelining); the
/// connection is not read further while this many are in flight.
const PIPELINE: usize = 32;

/// Counters of what the resolver did.
#[derive(Debug, Default)]
pub struct Stats {
    /// Queries answered (any outcome).
    pub queries: AtomicU64,
    /// Names blocked by policy (question or CNAME chain).
    pub blocked: AtomicU64,
    /// Queries refused because no device and no unknown-client policy applied.
    pub refused_unknown: AtomicU64,
    /// Answers served from the cache.
    pub cache_hits: AtomicU64,
    /// Queries no upstream answered (SERVFAIL).
    pub upstream_failures: AtomicU64,
    /// Malformed queries (FORMERR or dropped).
    pub malformed: AtomicU64,
    /// Queries dropped by the per-client rate limit (shared with `/metrics`).
    pub rate_limited: prometheus_client::metrics::counter::Counter,
    /// UDP queries dropped because `max_udp_in_flight` were waiting for upstreams
    /// (shared with `/metrics`).
    pub dropped_overload: prometheus_client::metrics::counter::Counter,
}

/// The filtering resolver.
pub struct Resolver {
    table: RwLock<Arc<PolicyTable>>,
    identify: Identify,
    upstreams: Upstreams,
    cache: Cache,
    on_query: Option<OnQuery>,
    /// What it did so far.
    pub stats: Stats,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").field("upstreams", &self.upstreams).field("cache", &self.cache).finish()
    }
}

/// Most UDP payload a client without EDNS may receive (RFC 1035).
const CLASSIC_UDP: usize = 512;
/// Most UDP payload we send even to a client that offers more (DNS flag day 2020).
const MAX_UDP: usize = 1232;

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Resolver {
    /// A resolver over `table` that attributes clients with `identify`.
    pub fn new(table: PolicyTable, identify: Identify, upstreams: Upstreams, cache: Cache) -> Self {
        Self {
            table: RwLock::new(Arc::new(table)),
            identify,
            upstreams,
            cache,
            on_query: None,
            stats: Stats::default(),
        }
    }

    /// Calls `f` with every answered query (the query log, metrics).
    pub fn on_query(mut self, f: OnQuery) -> Self {
        self.on_query = Some(f);
        self
    }

    fn emit(&self, ev: QueryEvent) {
        // The record of every query is the query log (`portcullis dns log`); a text line
        // per query on stderr would cost more than answering it (a fifth of the
        // instructions per query at info): `PORTCULLIS_LOG=info,portcullis::dns::query=debug`.
        tracing::debug!(target: "portcullis::dns::query", client = %ev.client, device = ev.device.as_deref().unwrap_or("-"),
            name = %ev.name, qtype = %ev.qtype, action = ev.action, reason = %ev.reason, rcode = %ev.rcode,
            upstream_us = ev.upstream_us, "query");
        if let Some(f) = &self.on_query {
            f(ev);
        }
    }

    /// Swaps in new policies; queries in flight finish on the old ones.
    pub fn replace(&self, table: PolicyTable) {
        if let Ok(mut t) = self.table.write() {
            *t = Arc::new(table);
        }
    }

    fn current(&self) -> Arc<PolicyTable> {
        self.table.read().map(|t| t.clone()).unwrap_or_default()
    }

    /// Answers one query in wire format from `src`; `None` means no answer at all (not
    /// a query, or too short to say whom to answer). `max_len`: the transport's limit
    /// (UDP); longer answers are truncated with TC set.
    pub async fn answer(&self, bytes: &[u8], src: IpAddr, udp: bool) -> Option<Vec<u8>> {
        self.answer_for(bytes, src, udp, Attribution::ByAddress).await
    }

    /// Like [`Self::answer`], with the client already attributed (by its certificate on
    /// DoT and DoH).
    pub async fn answer_for(
        &self,
        bytes: &[u8],
        src: IpAddr,
        udp: bool,
        who: Attribution,
    ) -> Option<Vec<u8>> {
        let req = match Message::from_vec(bytes) {
            Ok(m) => m,
            Err(e) => {
                bump(&self.stats.malformed);
                tracing::debug!(client = %src, error = %e, "malformed DNS message");
                return formerr(bytes);
            }
        };
        if req.metadata.message_type != MessageType::Query {
            bump(&self.stats.malformed);
            return None;
        }
        bump(&self.stats.queries);
        let limit = if udp {
            req.edns
                .as_ref()
                .map_or(CLASSIC_UDP, |e| usize::from(e.max_payload()).clamp(CLASSIC_UDP, MAX_UDP))
        } else {
            usize::from(u16::MAX)
        };
        let resp = self.respond(&req, src, who).await;
        encode(resp, limit)
    }

    async fn respond(&self, req: &Message, src: IpAddr, who: Attribution) -> Message {
        let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
        resp.metadata.recursion_desired = req.metadata.recursion_desired;
        resp.metadata.recursion_available = true;
        resp.metadata.checking_disabled = req.metadata.checking_disabled;
        // The question is echoed only when there is exactly one: a query with many
        // (compressed) questions gets FORMERR below, and echoing them would make a small
        // datagram a large answer (found by the dns_query fuzz target).
        if req.queries.len() == 1 {
            resp.add_queries(req.queries.iter().cloned());
        }
        if req.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(MAX_UDP as u16);
            resp.set_edns(edns);
        }
        if req.metadata.op_code != OpCode::Query {
            resp.metadata.response_code = ResponseCode::NotImp;
            return resp;
        }
        let [query] = req.queries.as_slice() else {
            resp.metadata.response_code = ResponseCode::FormErr;
            bump(&self.stats.malformed);
            return resp;
        };

        let table = self.current();
        let name = normalized_name(&query.name);
        let client = match who {
            Attribution::ByAddress => (self.identify)(src),
            Attribution::Device(c) => Some(c),
            Attribution::Refused(why) => {
                use portcullis_pki::AuthError;
                bump(&self.stats.refused_unknown);
                resp.metadata.response_code = ResponseCode::Refused;
                let (device, reason) = match &*why {
                    AuthError::DeviceSuspended(id) | AuthError::DeviceRevoked(id) => {
                        (Some(id.to_string()), "device is not active".to_owned())
                    }
                    other => (None, format!("client certificate refused: {other}")),
                };
                self.emit(QueryEvent {
                    client: src,
                    device,
                    name,
                    qtype: query.query_type,
                    action: "refused",
                    reason,
                    rcode: ResponseCode::Refused,
                    upstream_us: None,
                });
                return resp;
            }
        };
        let event = |action: &'static str, reason: String, rcode: ResponseCode, upstream_us: Option<u64>| {
            QueryEvent {
                client: src,
                device: client.as_ref().map(|c| c.device.clone()),
                name: name.clone(),
                qtype: query.query_type,
                action,
                reason,
                rcode,
                upstream_us,
            }
        };
        let policy = match &client {
            Some(c) if !c.active => {
                bump(&self.stats.refused_unknown);
                resp.metadata.response_code = ResponseCode::Refused;
                self.emit(event("refused", "device is not active".into(), ResponseCode::Refused, None));
                return resp;
            }
            Some(c) => table
                .by_device
                .get(&c.device)
                .or(c.profile.as_ref())
                .or_else(|| table.by_group.get(&c.group))
                .or(table.default.as_ref()),
            None => table.unknown.as_ref(),
        };
        let Some(policy) = policy else {
            bump(&self.stats.refused_unknown);
            resp.metadata.response_code = ResponseCode::Refused;
            let why = if client.is_some() { "no policy for the device's group" } else { "unknown client" };
            self.emit(event("refused", why.into(), ResponseCode::Refused, None));
            return resp;
        };
        let verdict = if name.is_empty() { Verdict::Allow(Rule::Root) } else { policy.decide(&name) };
        if let Verdict::Block(rule) = verdict {
            bump(&self.stats.blocked);
            block(&mut resp, query, policy.block);
            self.emit(event("blocked", rule.to_text(), resp.metadata.response_code, None));
            return resp;
        }
        if query.query_type == RecordType::ANY {
            // RFC 8482: a minimal answer instead of everything.
            resp.add_answer(Record::from_rdata(
                query.name.clone(),
                3600,
                RData::HINFO(HINFO::new("RFC8482".into(), String::new())),
            ));
            self.emit(event(
                "allowed",
                "ANY answered minimally (RFC 8482)".into(),
                ResponseCode::NoError,
                None,
            ));
            return resp;
        }

        let started = Instant::now();
        let now = Instant::now();
        let (upstream, cached) = match self.cache.get(&query.name, query.query_type, query.query_class, now) {
            Some(m) => {
                bump(&self.stats.cache_hits);
                (m, true)
            }
            None => match self.upstreams.resolve(query).await {
                Ok(m) => {
                    self.cache.put(&query.name, query.query_type, query.query_class, &m, Instant::now());
                    (m, false)
                }
                Err(e) => {
                    bump(&self.stats.upstream_failures);
                    if matches!(e, crate::UpstreamError::Overloaded(_)) {
                        // Under a flood this is every query: counted and logged per query
                        // in the query log, not as a warning each.
                        tracing::debug!(target: "portcullis::dns", client = %src, name = %name, error = %e,
                            "no upstream asked");
                    } else {
                        tracing::warn!(target: "portcullis::dns", client = %src, name = %name, error = %e,
                            "no upstream answered");
                    }
                    resp.metadata.response_code = ResponseCode::ServFail;
                    let us = started.elapsed().as_micros() as u64;
                    self.emit(event("failed", e.to_string(), ResponseCode::ServFail, Some(us)));
                    return resp;
                }
            },
        };
        // CNAME inspection: a blocked name anywhere in the chain blocks the answer.
        for r in &upstream.answers {
            if let RData::CNAME(target) = &r.data {
                let alias = target.0.to_ascii().trim_end_matches('.').to_ascii_lowercase();
                if let Verdict::Block(rule) = policy.decide_alias(&alias) {
                    bump(&self.stats.blocked);
                    block(&mut resp, query, policy.block);
                    let why = format!("{rule} (CNAME {alias})");
                    self.emit(event("blocked", why, resp.metadata.response_code, None));
                    return resp;
                }
            }
        }
        let upstream_us = (!cached).then(|| started.elapsed().as_micros() as u64);
        let mut reason = verdict.rule().to_text();
        if cached {
            reason.push_str(" (cached)");
        }
        self.emit(event("allowed", reason, upstream.metadata.response_code, upstream_us));
        resp.metadata.response_code = upstream.metadata.response_code;
        resp.metadata.authentic_data = upstream.metadata.authentic_data;
        resp.answers = upstream.answers;
        resp.authorities = upstream.authorities;
        resp.additionals = upstream.additionals;
        resp
    }

    /// Serves UDP on `sock` and TCP on `tcp` until `shutdown` turns true.
    pub async fn serve(
        self: Arc<Self>,
        sock: UdpSocket,
        tcp: TcpListener,
        cfg: ServeConfig,
        shutdown: watch::Receiver<bool>,
    ) {
        let limiter = cfg.per_client.map(|r| Arc::new(Limiter::<IpAddr>::new(r, 100_000)));
        let in_flight = Arc::new(Semaphore::new(cfg.max_udp_in_flight.max(1)));
        // One receive loop per core on the same socket: cached and blocked names are
        // answered inside the loop (no task per datagram), so one loop would answer on
        // one core only. The bound on queries waiting for upstreams stays global.
        let sock = Arc::new(sock);
        let loops = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
        let udp: Vec<_> = (0..loops)
            .map(|_| {
                tokio::spawn(self.clone().serve_udp(
                    sock.clone(),
                    limiter.clone(),
                    in_flight.clone(),
                    shutdown.clone(),
                ))
            })
            .collect();
        let tcp = tokio::spawn(self.serve_tcp(tcp, cfg, limiter, shutdown));
        // Every loop ends at shutdown.
        for u in udp {
            let _ = u.await;
        }
        let _ = tcp.await;
    }

    fn admit(&self, limiter: &Option<Arc<Limiter<IpAddr>>>, ip: IpAddr) -> bool {
        let ok = limiter.as_ref().is_none_or(|l| l.check(&ip, Instant::now()).is_ok());
        if !ok {
            self.stats.rate_limited.inc();
        }
        ok
    }

    async fn serve_udp(
        self: Arc<Self>,
        sock: Arc<UdpSocket>,
        limiter: Option<Arc<Limiter<IpAddr>>>,
        in_flight: Arc<Semaphore>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, src) = tokio::select! {
                r = sock.recv_from(&mut buf) => match r {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(error = %e, "dns udp receive failed");
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            if !self.admit(&limiter, src.ip()) {
                continue;
            }
            // Whatever can be answered at once (policy, cache, refusal, FORMERR) is, here,
            // without a task: polled once, the answer is ready unless an upstream has to
            // be asked.
            let packet = buf[..n].to_vec();
            let me = self.clone();
            let mut answering =
                Box::pin(async move { me.answer(&packet, src.ip(), true).await.map(|out| (out, src)) });
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            match answering.as_mut().poll(&mut cx) {
                std::task::Poll::Ready(Some((out, to))) => {
                    let _ = sock.try_send_to(&out, to);
                    continue;
                }
                std::task::Poll::Ready(None) => continue,
                std::task::Poll::Pending => {}
            }
            // A query waiting for an upstream holds memory and a socket: beyond the bound
            // it is dropped (the client retries), never queued without limit. Cached and
            // blocked names keep being answered above whatever the flood.
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                self.stats.dropped_overload.inc();
                continue;
            };
            let sock = sock.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Some((out, to)) = answering.await {
                    let _ = sock.send_to(&out, to).await;
                }
            });
        }
    }

    async fn serve_tcp(
        self: Arc<Self>,
        listener: TcpListener,
        cfg: ServeConfig,
        limiter: Option<Arc<Limiter<IpAddr>>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let conns = Conns::new(
            "dns_tcp",
            ConnLimits { max: cfg.max_tcp_connections, per_ip: cfg.tcp_connections_per_ip },
            cfg.conn_metrics.clone(),
        );
        while let Some((stream, src, slot)) =
            portcullis_net::next_admitted(&listener, &conns, &mut shutdown, "dns_tcp", |_| true).await
        {
            let me = self.clone();
            let limiter = limiter.clone();
            let cfg = cfg.clone();
            tokio::spawn(async move {
                let session_end = tokio::time::Instant::now() + cfg.tcp_session_timeout;
                me.serve_stream(stream, src.ip(), &cfg, session_end, limiter, None, slot).await;
            });
        }
    }
}

impl Resolver {
    /// Answers length-prefixed messages (RFC 1035 section 4.2.2; RFC 7858) on one
    /// connection until it idles out, closes, reaches its session deadline, is shed, or
    /// its client exceeds its rate. Queries are answered concurrently (up to
    /// [`PIPELINE`]) and each answer is written as soon as it is ready (RFC 7766
    /// section 6.2.1.1), so one slow name does not hold up the others. `who` attributes
    /// each query (DoT: the certificate); `None`: by address.
    #[allow(clippy::too_many_arguments)]
    async fn serve_stream<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static>(
        self: Arc<Self>,
        stream: S,
        src: IpAddr,
        cfg: &ServeConfig,
        session_end: tokio::time::Instant,
        limiter: Option<Arc<Limiter<IpAddr>>>,
        who: Option<ConnAttribution>,
        slot: Slot,
    ) {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(PIPELINE);
        let pipeline = Arc::new(Semaphore::new(PIPELINE));
        let idle = cfg.tcp_idle_timeout;
        let slot = Arc::new(slot);
        let reader = {
            let slot = slot.clone();
            async move {
                loop {
                    // The whole next query, length and body, within the idle deadline:
                    // trickling a byte at a time buys no extra time.
                    let next = async {
                        let len = rd.read_u16().await?;
                        if usize::from(len) < 12 {
                            // Shorter than a DNS header: nothing to answer, and a client
                            // that sends such frames is not speaking DNS. Close.
                            return Err(std::io::ErrorKind::InvalidData.into());
                        }
                        let mut msg = vec![0u8; usize::from(len)];
                        rd.read_exact(&mut msg).await?;
                        Ok::<_, std::io::Error>(msg)
                    };
                    let deadline = (tokio::time::Instant::now() + idle).min(session_end);
                    let Ok(Ok(msg)) = tokio::time::timeout_at(deadline, next).await else {
                        slot.conns().closed_idle("dns_idle");
                        return;
                    };
                    if !self.admit(&limiter, src) || tx.is_closed() {
                        return;
                    }
                    let Ok(permit) = pipeline.clone().acquire_owned().await else { return };
                    let busy = slot.busy();
                    let (me, tx, who) = (self.clone(), tx.clone(), who.clone());
                    tokio::spawn(async move {
                        let _permit = permit;
                        let _busy = busy;
                        let attribution = match &who {
                            Some(w) => w().await,
                            None => Attribution::ByAddress,
                        };
                        let Some(out) = me.answer_for(&msg, src, false, attribution).await else { return };
                        let Ok(n) = u16::try_from(out.len()) else { return };
                        let mut framed = Vec::with_capacity(out.len() + 2);
                        framed.extend_from_slice(&n.to_be_bytes());
                        framed.extend_from_slice(&out);
                        let _ = tx.send(framed).await;
                    });
                }
            }
        };
        // Ends when the reader and every answer it started are done (all senders gone).
        let writer = async move {
            while let Some(framed) = rx.recv().await {
                if wr.write_all(&framed).await.is_err() || wr.flush().await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = async { tokio::join!(reader, writer) } => {}
            _ = tokio::time::sleep_until(session_end) => {}
            _ = slot.shed() => {}
        }
    }

    /// Serves DNS over TLS (RFC 7858) on `listener` until `shutdown` turns true: each
    /// connection's client certificate (if any) attributes its queries.
    pub async fn serve_tls(
        self: Arc<Self>,
        listener: TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
        attribute: TlsAttribution,
        cfg: ServeConfig,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let conns = Conns::new(
            "dns_tls",
            ConnLimits { max: cfg.max_tcp_connections, per_ip: cfg.tcp_connections_per_ip },
            cfg.conn_metrics.clone(),
        );
        let limiter = cfg.per_client.map(|r| Arc::new(Limiter::<IpAddr>::new(r, 100_000)));
        while let Some((tcp, src, slot)) =
            portcullis_net::next_admitted(&listener, &conns, &mut shutdown, "dns_tls", |_| true).await
        {
            let (me, acceptor, attribute, limiter) =
                (self.clone(), acceptor.clone(), attribute.clone(), limiter.clone());
            let cfg = cfg.clone();
            tokio::spawn(async move {
                let session_end = tokio::time::Instant::now() + cfg.tcp_session_timeout;
                let handshake = tokio::time::timeout(cfg.tcp_idle_timeout, acceptor.accept(tcp));
                let stream = tokio::select! {
                    r = handshake => match r {
                        Ok(Ok(s)) => s,
                        _ => {
                            tracing::debug!(client = %src, "dns-over-tls handshake failed or timed out");
                            return;
                        }
                    },
                    _ = slot.shed() => return,
                };
                let chain = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect::<Vec<_>>());
                let (who, verified) = attribute(chain);
                if verified {
                    // A certificate of our CA: a device's connection, never shed.
                    slot.identified();
                }
                me.serve_stream(stream, src.ip(), &cfg, session_end, limiter, Some(who), slot).await;
            });
        }
    }
}

/// Fills `resp` with the policy's answer for a blocked name.
/// The name as policies and the log read it: lower case, no trailing dot. Plain
/// letter-digit-hyphen(-underscore) labels are copied in one pass; anything else takes
/// hickory's presentation form (escapes, IDNA), as before.
fn normalized_name(name: &Name) -> String {
    let plain = |l: &[u8]| l.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
    if !name.iter().all(plain) {
        return name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
    }
    let mut out: Vec<u8> = Vec::with_capacity(name.len());
    for label in name.iter() {
        if !out.is_empty() {
            out.push(b'.');
        }
        out.extend_from_slice(label);
    }
    out.make_ascii_lowercase();
    // Only ASCII letters, digits, `-`, `_` and `.` were copied.
    String::from_utf8(out).unwrap_or_default()
}

fn block(resp: &mut Message, query: &Query, how: BlockResponse) {
    match how {
        BlockResponse::Nxdomain => resp.metadata.response_code = ResponseCode::NXDomain,
        BlockResponse::Refused => resp.metadata.response_code = ResponseCode::Refused,
        BlockResponse::Null => {
            let data = match query.query_type {
                RecordType::A => Some(RData::A(A(std::net::Ipv4Addr::UNSPECIFIED))),
                RecordType::AAAA => Some(RData::AAAA(AAAA(std::net::Ipv6Addr::UNSPECIFIED))),
                _ => None,
            };
            if let Some(d) = data {
                resp.add_answer(Record::from_rdata(query.name.clone(), 60, d));
            }
        }
    }
}

/// FORMERR for a message that did not parse, if its header at least says whom to tell.
fn formerr(bytes: &[u8]) -> Option<Vec<u8>> {
    if bytes.len() < 12 || bytes[2] & 0x80 != 0 {
        return None; // no header, or a response: never answer those
    }
    let mut out = vec![0u8; 12];
    out[..2].copy_from_slice(&bytes[..2]);
    // QR=1, the query's opcode, RD copied; RCODE=1 (FORMERR).
    out[2] = 0x80 | (bytes[2] & 0x79);
    out[3] = 0x01;
    Some(out)
}

/// Wire format, truncated (question only, TC set) when longer than `limit`.
fn encode(resp: Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = resp.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    let mut short = resp.truncate();
    short.metadata.truncation = true;
    let bytes = short.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    // Even the question does not fit: the header alone, with TC.
    let mut bare = Message::response(short.metadata.id, short.metadata.op_code);
    bare.metadata = short.metadata;
    bare.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the dns_query fuzz target: 48 questions whose names point into one another
    /// made a 200-byte datagram a FORMERR answer of several KiB (an amplifier).
    #[tokio::test]
    async fn many_questions_never_make_a_large_answer() {
        let policy = Arc::new(Policy {
            name: "t".into(),
            mode: crate::Mode::Blocklist,
            lists: vec![],
            allow: crate::DomainSet::new(),
            deny: crate::DomainSet::new(),
            block: BlockResponse::Nxdomain,
        });
        let table = PolicyTable { unknown: Some(policy), ..Default::default() };
        let r = Resolver::new(
            table,
            Arc::new(|_| None),
            Upstreams::new(vec![], Duration::from_millis(1), 4),
            Cache::new(crate::CacheConfig::default()),
        );
        let mut q = Message::query();
        q.metadata.id = 7;
        for i in 0..48 {
            let name = format!("{}.{}.example.", "a".repeat(60), i);
            q.add_query(Query::query(hickory_proto::rr::Name::from_ascii(&name).unwrap(), RecordType::A));
        }
        let wire = q.to_vec().unwrap();
        let out = r.answer(&wire, IpAddr::from([127, 0, 0, 1]), true).await.unwrap();
        assert!(out.len() <= CLASSIC_UDP, "{} bytes answered to a query of {}", out.len(), wire.len());
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(m.metadata.id, 7);
    }

    #[test]
    fn formerr_keeps_the_id_and_ignores_responses() {
        let q = [0xAB, 0xCD, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xFF];
        let out = formerr(&q).unwrap();
        assert_eq!(&out[..4], &[0xAB, 0xCD, 0x81, 0x01]);
        assert!(formerr(&[0; 5]).is_none());
        let mut r = q;
        r[2] |= 0x80;
        assert!(formerr(&r).is_none());
    }
}

#[cfg(test)]
mod name_tests {
    use super::*;

    #[test]
    fn normalized_names_are_hickorys_presentation_form_lowercased() {
        for text in
            [".", "Example.COM.", "a-b_c.x1.test", "xn--bcher-kva.example", "ExAmPlE", "_dmarc.Example.org."]
        {
            let name = Name::from_ascii(text).unwrap();
            assert_eq!(
                normalized_name(&name),
                name.to_ascii().trim_end_matches('.').to_ascii_lowercase(),
                "{text}"
            );
        }
        // Bytes a presentation form escapes take hickory's path.
        let odd = Name::from_labels(vec![b"a.b".to_vec(), b"C\x01".to_vec()]).unwrap();
        assert_eq!(normalized_name(&odd), odd.to_ascii().trim_end_matches('.').to_ascii_lowercase());
    }
}
