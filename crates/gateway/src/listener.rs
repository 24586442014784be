use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use std::convert::Infallible;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use portcullis_pki::{ClientCertVerifier, PeerCertificate};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use tower_http::timeout::TimeoutLayer;

use crate::h2guard::{H2Guard, H2Limits, H2Metrics};
use portcullis_net::conns::{Busy, ConnLimits, ConnMetrics, Conns, Slot};
use portcullis_net::{Limiter, Rate};

/// Limits of the device port.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Deadline for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Deadline for a request head, counted from the end of the handshake or of the
    /// previous response: it bounds the wait for the first request, keep-alive idle time
    /// (HTTP/1.1) and an HTTP/2 connection with no open stream.
    pub header_timeout: Duration,
    /// Deadline for a whole request, body included; exceeded → 408.
    pub request_timeout: Duration,
    /// Most concurrent connections. At the cap the oldest idle connection without a
    /// device identity is closed to admit a new one; with none left the new one is
    /// closed at once.
    pub max_connections: usize,
    /// Most concurrent connections from one source address.
    pub max_connections_per_ip: usize,
    /// Where admissions, refusals and deadline closes are counted.
    pub conn_metrics: ConnMetrics,
    /// New connections (TLS handshakes) per source IP; beyond it the connection is
    /// closed before any TLS work. `None`: no limit.
    pub handshakes_per_ip: Option<Rate>,
    /// Worker threads accepting and serving connections, each with its own
    /// single-threaded runtime (0: one per CPU).
    pub workers: usize,
    /// HTTP/2 limits.
    pub http2: H2Limits,
}

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Index of the device-port worker running the caller (0 outside the workers).
pub(crate) fn worker_index() -> usize {
    WORKER.with(std::cell::Cell::get)
}

/// The number of workers `cfg` asks for.
pub(crate) fn worker_count(requested: usize) -> usize {
    if requested > 0 { requested } else { std::thread::available_parallelism().map(usize::from).unwrap_or(1) }
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            max_connections_per_ip: 256,
            conn_metrics: ConnMetrics::default(),
            handshakes_per_ip: None,
            workers: 0,
            http2: H2Limits::default(),
        }
    }
}

/// What the device port answers: its built-in endpoints (EST, CRL, …) and, for every
/// other path, the gateway.
#[derive(Debug)]
pub struct DeviceApp {
    /// Answers the built-in endpoints.
    pub built_in: Router,
    /// The exact paths `built_in` serves; every other path goes to the gateway.
    pub built_in_paths: Vec<&'static str>,
    /// Path prefixes (ending in `/`) `built_in` serves whole, e.g. `/firmware/`.
    pub built_in_prefixes: Vec<&'static str>,
    /// The gateway, called directly (no router in between) on the hot path.
    pub gateway: Arc<crate::Gateway>,
}

/// Serves `app` over TLS on `listener` until `shutdown` turns true, then stops accepting
/// and gives open connections up to 5 seconds to finish.
///
/// Connections are served thread-per-core, the way nginx runs its workers: each worker
/// thread accepts on the shared socket and serves connections on its own single-threaded
/// runtime, so a request, its upstream connection and its response never hop between
/// threads. A worker hands a connection it accepted to the worker with the fewest open
/// connections before the TLS handshake (see [`Balance`]). Shared state (registry, route
/// table, limits) is `Sync`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    verifier: ClientCertVerifier,
    app: DeviceApp,
    cfg: ListenerConfig,
    shutdown: watch::Receiver<bool>,
) {
    let std_listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "device port: cannot hand the socket to the workers");
            return;
        }
    };
    let shared = Arc::new(Shared {
        acceptor: TlsAcceptor::from(tls),
        verifier,
        built_in: app
            .built_in
            .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, cfg.request_timeout)),
        built_in_paths: app.built_in_paths,
        built_in_prefixes: app.built_in_prefixes,
        gateway: app.gateway,
        conns: Conns::new(
            "device",
            ConnLimits { max: cfg.max_connections, per_ip: cfg.max_connections_per_ip },
            cfg.conn_metrics.clone(),
        ),
        per_ip: cfg.handshakes_per_ip.map(|r| Arc::new(Limiter::<IpAddr>::new(r, 100_000))),
        h2_metrics: H2Metrics::default(),
        cfg: cfg.clone(),
    });
    shared.gateway.authority().metrics().register(|r| shared.h2_metrics.register(r));
    let workers = worker_count(cfg.workers);
    let (balance, inboxes) = Balance::new(workers, shared.gateway.authority().metrics());
    let mut finished = Vec::new();
    for (index, inbox) in inboxes.into_iter().enumerate() {
        let socket = match std_listener.try_clone() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "device port: cannot share the socket with a worker");
                break;
            }
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let shared = Arc::new(Shared::clone(&shared));
        let shutdown = shutdown.clone();
        let balance = balance.clone();
        let spawned = std::thread::Builder::new().name(format!("device-port-{index}")).spawn(move || {
            WORKER.with(|w| w.set(index));
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "device port: worker runtime failed to start");
                    return;
                }
            };
            rt.block_on(async move {
                tokio::spawn(upkeep(shared.gateway.clone()));
                match TcpListener::from_std(socket) {
                    Ok(listener) => accept_loop(listener, shared, shutdown, index, balance, inbox).await,
                    Err(e) => tracing::error!(error = %e, "device port: worker cannot register the socket"),
                }
            });
            drop(done_tx);
        });
        match spawned {
            Ok(_) => finished.push(done_rx),
            Err(e) => tracing::error!(error = %e, "device port: cannot start a worker thread"),
        }
    }
    for done in finished {
        let _ = done.await;
    }
}

/// What every worker shares. Each worker holds its own copy (the fields are handles to
/// the shared state), so the per-request clone of its `Arc` never bounces a reference
/// count between cores.
#[derive(Clone)]
struct Shared {
    acceptor: TlsAcceptor,
    verifier: ClientCertVerifier,
    built_in: Router,
    built_in_paths: Vec<&'static str>,
    built_in_prefixes: Vec<&'static str>,
    gateway: Arc<crate::Gateway>,
    conns: Arc<Conns>,
    per_ip: Option<Arc<Limiter<IpAddr>>>,
    h2_metrics: H2Metrics,
    cfg: ListenerConfig,
}

impl Shared {
    /// One request: a built-in endpoint through its router, anything else straight to
    /// the gateway, both under the whole-request deadline (408).
    async fn respond(&self, req: http::Request<Body>) -> Response {
        let path = req.uri().path();
        if self.built_in_paths.contains(&path) || self.built_in_prefixes.iter().any(|p| path.starts_with(p)) {
            return match self.built_in.clone().oneshot(req).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            };
        }
        match tokio::time::timeout(self.cfg.request_timeout, self.gateway.handle(req)).await {
            Ok(resp) => resp,
            Err(_) => portcullis_http::Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "request-timeout",
                format!("request not completed within {} s", self.cfg.request_timeout.as_secs()),
            )
            .into_response(),
        }
    }
}

/// A worker's once-a-second chores: closing idle upstream connections that expired or
/// were closed by the upstream.
///
/// Its timer also keeps the worker's next timer wake-up within a second. Tokio's time
/// driver writes to the runtime's eventfd whenever a newly registered deadline is earlier
/// than the one it last parked with, and a request registers deadlines of different
/// lengths (10 s for the next request head, 30 s for the request, the route's upstream
/// timeout): without a nearer timer, about one request in three paid a system call and
/// an extra wake-up for that (measured with `perf stat -e syscalls:sys_enter_write`).
async fn upkeep(gateway: Arc<crate::Gateway>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        gateway.evict_idle();
    }
}

/// Spreads connections over the workers so each serves as many as the others (Envoy's
/// "exact balance"), and counts them for `/metrics`.
///
/// Every worker's epoll is woken by a new connection and the first to call `accept` gets
/// it, so a burst of connections tends to land on one worker: measured with ab's 32
/// keep-alive connections, one worker often served most of them while the other idled,
/// and the split changed from run to run. Long-lived device connections make such a
/// split last. Instead, the worker that accepted a connection hands it to the worker
/// with the fewest open connections (itself on a tie); the socket moves between the
/// runtimes before the TLS handshake, so everything after stays on one thread.
struct Balance {
    /// Open connections per worker (`portcullis_device_connections{worker}`).
    open: Vec<Gauge>,
    /// Each worker's inbox of connections handed to it.
    inbox: Vec<mpsc::UnboundedSender<Handoff>>,
    /// Workers whose inbox is closed (failed to start, or stopped).
    gone: Vec<AtomicBool>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct WorkerLabel {
    worker: String,
}

/// A connection accepted by one worker and handed to another.
struct Handoff {
    tcp: std::net::TcpStream,
    remote: SocketAddr,
    slot: Slot,
    open: Open,
}

/// Counts a connection as open on a worker until it ends.
struct Open(Gauge);

impl Open {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Balance {
    /// A balance for `workers` workers with its gauges registered in `metrics`, and each
    /// worker's inbox.
    fn new(
        workers: usize,
        metrics: &portcullis_pki::Metrics,
    ) -> (Arc<Self>, Vec<mpsc::UnboundedReceiver<Handoff>>) {
        let (senders, receivers) = (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
        let family = Family::<WorkerLabel, Gauge>::default();
        let open = (0..workers)
            .map(|i| family.get_or_create(&WorkerLabel { worker: i.to_string() }).clone())
            .collect();
        metrics
            .register(|r| r.register("device_connections", "Open device-port connections by worker", family));
        let gone = (0..workers).map(|_| AtomicBool::new(false)).collect();
        (Arc::new(Self { open, inbox: senders, gone }), receivers)
    }

    /// The worker that should serve the next connection: the one with the fewest open
    /// connections, `me` when it is among them.
    fn pick(&self, me: usize) -> usize {
        let mut best = me;
        let mut fewest = self.open[me].get();
        for (i, gauge) in self.open.iter().enumerate() {
            let n = gauge.get();
            if n < fewest && !self.gone[i].load(Ordering::Relaxed) {
                best = i;
                fewest = n;
            }
        }
        best
    }
}

/// One worker: accepts on the shared socket, serves what it accepted or hands it to a
/// less busy worker, and serves what other workers handed to it.
async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    me: usize,
    balance: Arc<Balance>,
    inbox: mpsc::UnboundedReceiver<Handoff>,
) {
    let (conn_done_tx, mut conn_done_rx) = watch::channel(());
    {
        let mut inbox = inbox;
        let shared = shared.clone();
        let mut shutdown = shutdown.clone();
        let done = conn_done_tx.clone();
        tokio::spawn(async move {
            loop {
                let handoff = tokio::select! {
                    h = inbox.recv() => match h { Some(h) => h, None => break },
                    _ = shutdown.changed() => break,
                };
                let Handoff { tcp, remote, slot, open } = handoff;
                match TcpStream::from_std(tcp) {
                    Ok(tcp) => serve_connection(tcp, remote, slot, open, &shared, &shutdown, &done),
                    Err(e) => {
                        tracing::warn!(peer = %remote, error = %e, "worker cannot register a connection")
                    }
                }
            }
        });
    }
    // Accepted at once, always; over the handshake rate or the caps, closed here.
    let handshake_rate = |remote: SocketAddr| match &shared.per_ip {
        Some(limiter) if limiter.check(&remote.ip(), std::time::Instant::now()).is_err() => {
            tracing::debug!(peer = %remote, "handshake rate limit exceeded; connection closed");
            false
        }
        _ => true,
    };
    while let Some((tcp, remote, slot)) =
        portcullis_net::next_admitted(&listener, &shared.conns, &mut shutdown, "device", handshake_rate).await
    {
        let _ = tcp.set_nodelay(true);
        let target = balance.pick(me);
        let open = Open::new(&balance.open[target]);
        if target == me {
            serve_connection(tcp, remote, slot, open, &shared, &shutdown, &conn_done_tx);
            continue;
        }
        let handoff = match tcp.into_std() {
            Ok(tcp) => Handoff { tcp, remote, slot, open },
            Err(e) => {
                tracing::warn!(peer = %remote, error = %e, "cannot hand a connection to another worker");
                continue;
            }
        };
        if let Err(refused) = balance.inbox[target].send(handoff) {
            // That worker never started or has stopped: never pick it again, and serve
            // this connection here.
            balance.gone[target].store(true, Ordering::Relaxed);
            let Handoff { tcp, remote, slot, open } = refused.0;
            drop(open);
            match TcpStream::from_std(tcp) {
                Ok(tcp) => {
                    let open = Open::new(&balance.open[me]);
                    serve_connection(tcp, remote, slot, open, &shared, &shutdown, &conn_done_tx);
                }
                Err(e) => tracing::warn!(peer = %remote, error = %e, "worker cannot register a connection"),
            }
        }
    }
    drop(conn_done_tx);
    // Every connection task holds a clone of the sender; wait for them to finish.
    let _ =
        tokio::time::timeout(Duration::from_secs(5), async { while conn_done_rx.changed().await.is_ok() {} })
            .await;
}

/// Runs one connection on the current worker: TLS handshake, client certificate check,
/// then HTTP/1.1 or HTTP/2 (as ALPN chose) until the peer leaves, a deadline passes, the
/// admission table sheds it, or the port shuts down.
fn serve_connection(
    tcp: TcpStream,
    remote: SocketAddr,
    slot: Slot,
    open: Open,
    shared: &Arc<Shared>,
    shutdown: &watch::Receiver<bool>,
    done: &watch::Sender<()>,
) {
    let acceptor = shared.acceptor.clone();
    let verifier = shared.verifier.clone();
    let shared = shared.clone();
    let cfg = shared.cfg.clone();
    let h2_metrics = shared.h2_metrics.clone();
    let mut shutdown = shutdown.clone();
    let done = done.clone();
    tokio::spawn(async move {
        let _open = open;
        let _done = done;
        let slot = Arc::new(slot);
        let tls = tokio::select! {
            r = tokio::time::timeout(cfg.handshake_timeout, acceptor.accept(tcp)) => match r {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    slot.conns().closed_idle("handshake");
                    tracing::debug!(peer = %remote, "TLS handshake timed out");
                    return;
                }
            },
            _ = slot.shed() => return,
        };
        let peer = tls.get_ref().1.peer_certificates().map(|chain| {
            let chain: Vec<_> = chain.iter().map(|c| c.clone().into_owned()).collect();
            let verified = verifier.verify(&chain);
            if let Err(e) = &verified {
                tracing::info!(peer = %remote, error = %e, "client certificate not verified");
            }
            PeerCertificate::new(chain, verified)
        });
        if peer.as_ref().is_some_and(|p| p.verified.is_ok()) {
            // A certificate of our CA: a device (or one that was), never shed.
            slot.identified();
        }
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let in_flight = slot.clone();
        let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
            let busy = in_flight.busy();
            // A response to HEAD carries the headers a GET would, never a body: hyper
            // drops it on HTTP/1.1, but on HTTP/2 the DATA frames went out and the client
            // reset the stream (no status at all). Headers, Content-Length included, stay.
            let head_over_h2 = h2 && req.method() == http::Method::HEAD;
            let mut req = req.map(Body::new);
            if let Some(p) = &peer {
                req.extensions_mut().insert(p.clone());
            }
            req.extensions_mut().insert(ConnectInfo(remote));
            let shared = shared.clone();
            let refused = host_problem(&req);
            async move {
                let mut resp = match refused {
                    Some(problem) => problem.into_response(),
                    None => shared.respond(req).await,
                };
                if head_over_h2
                    && !resp.headers().contains_key(http::header::CONTENT_LENGTH)
                    && let Some(n) = http_body::Body::size_hint(resp.body()).exact()
                {
                    resp.headers_mut().insert(http::header::CONTENT_LENGTH, n.into());
                }
                Ok::<_, Infallible>(resp.map(|body| Tracked {
                    body: if head_over_h2 { Body::empty() } else { body },
                    _busy: busy,
                }))
            }
        });
        if h2 {
            // HTTP/2 only when ALPN chose it: no waiting to sniff a preface.
            let limits = cfg.http2;
            let io = TokioIo::new(H2Guard::new(tls, limits, h2_metrics));
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(limits.max_concurrent_streams)
                .max_header_list_size(limits.max_header_list_size)
                .max_pending_accept_reset_streams(limits.max_pending_accept_reset_streams)
                .max_local_error_reset_streams(limits.max_local_error_reset_streams)
                .keep_alive_interval(Some(cfg.header_timeout))
                .keep_alive_timeout(cfg.header_timeout)
                .serve_connection(io, svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(peer = %remote, error = %e, "connection ended with error");
                    }
                    return;
                }
                _ = idle(&slot, cfg.header_timeout) => slot.conns().closed_idle("http2_idle"),
                _ = shutdown.changed() => {}
                _ = slot.shed() => return,
            }
            // GOAWAY, then a bounded wait for streams still open.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        } else {
            // hyper's head deadline runs from the start of the connection and again after
            // every response: it bounds the first request and keep-alive idle time.
            let io = TokioIo::new(tls);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(cfg.header_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(io, svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        if e.is_timeout() {
                            slot.conns().closed_idle("http1_idle");
                        }
                        tracing::debug!(peer = %remote, error = %e, "connection ended with error");
                    }
                }
                _ = shutdown.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
                _ = slot.shed() => {}
            }
        }
    });
}

/// A request whose target host is ambiguous: more than one `Host`, or a `Host` that
/// names another host than the request's authority (HTTP/2 `:authority`, or an HTTP/1.1
/// absolute-form target). RFC 9113 §8.3.1 calls such a request malformed; a backend or a
/// cache that went by the other one would see a different request than we checked.
fn host_problem<B>(req: &http::Request<B>) -> Option<portcullis_http::Problem> {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let host = hosts.next();
    let detail = if hosts.next().is_some() {
        "more than one Host header"
    } else {
        match (req.uri().authority(), host) {
            (Some(authority), Some(host))
                if !authority.as_str().as_bytes().eq_ignore_ascii_case(host.as_bytes()) =>
            {
                "the Host header names another host than the request's authority (:authority)"
            }
            _ => return None,
        }
    };
    Some(portcullis_http::Problem::new(StatusCode::BAD_REQUEST, "ambiguous-host", detail))
}

/// Completes once the connection has had no request in flight for `limit`.
async fn idle(slot: &Slot, limit: Duration) {
    loop {
        match slot.idle_for() {
            Some(d) if d >= limit => return,
            Some(d) => tokio::time::sleep(limit - d).await,
            None => tokio::time::sleep(limit).await,
        }
    }
}

/// A response body that keeps its request counted as in flight until it is sent or
/// dropped, so a long download is not taken for an idle connection.
struct Tracked {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_worker_with_fewest_connections_and_never_a_gone_one() {
        let metrics = portcullis_pki::Metrics::default();
        let (b, _inboxes) = Balance::new(3, &metrics);
        assert_eq!(b.pick(1), 1, "a tie keeps the connection where it was accepted");
        let held: Vec<Open> = [0, 0, 1].iter().map(|&w| Open::new(&b.open[w])).collect();
        assert_eq!(b.pick(0), 2);
        assert_eq!(b.pick(1), 2);
        b.gone[2].store(true, Ordering::Relaxed);
        assert_eq!(b.pick(0), 1);
        drop(held);
        assert_eq!(b.open.iter().map(Gauge::get).collect::<Vec<_>>(), vec![0, 0, 0]);
        assert!(
            metrics.encode().contains("portcullis_device_connections{worker=\"2\"} 0"),
            "{}",
            metrics.encode()
        );
    }
}
