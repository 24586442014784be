use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use http::StatusCode;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use portcullis_pki::{ClientCertVerifier, PeerCertificate};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use tower_http::timeout::TimeoutLayer;

use crate::ratelimit::{Limiter, Rate};

/// Limits of the device port.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Deadline for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Deadline for receiving a request head (also bounds idle keep-alive waits).
    pub header_timeout: Duration,
    /// Deadline for a whole request, body included; exceeded → 408.
    pub request_timeout: Duration,
    /// Most concurrent connections; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// New connections (TLS handshakes) per source IP; beyond it the connection is
    /// closed before any TLS work. `None`: no limit.
    pub handshakes_per_ip: Option<Rate>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            handshakes_per_ip: None,
        }
    }
}

/// Serves `app` over TLS on `listener` until `shutdown` turns true, then stops accepting
/// and gives open connections up to 5 seconds to finish.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    verifier: ClientCertVerifier,
    app: Router,
    cfg: ListenerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let app = app.layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, cfg.request_timeout));
    let permits = Arc::new(Semaphore::new(cfg.max_connections));
    let per_ip = cfg.handshakes_per_ip.map(|r| Limiter::<IpAddr>::new(r, 100_000));
    let (conn_done_tx, mut conn_done_rx) = watch::channel(());
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        if let Some(limiter) = &per_ip
            && limiter.check(&remote.ip(), std::time::Instant::now()).is_err()
        {
            tracing::debug!(peer = %remote, "handshake rate limit exceeded; connection closed");
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let verifier = verifier.clone();
        let app = app.clone();
        let cfg = cfg.clone();
        let mut shutdown = shutdown.clone();
        let done = conn_done_tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _done = done;
            let tls = match tokio::time::timeout(cfg.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %remote, "TLS handshake timed out");
                    return;
                }
            };
            let peer = tls.get_ref().1.peer_certificates().map(|chain| {
                let chain: Vec<_> = chain.iter().map(|c| c.clone().into_owned()).collect();
                let verified = verifier.verify(&chain);
                if let Err(e) = &verified {
                    tracing::info!(peer = %remote, error = %e, "client certificate not verified");
                }
                PeerCertificate::new(chain, verified)
            });
            let svc = app.map_request(move |mut req: http::Request<Incoming>| {
                if let Some(p) = &peer {
                    req.extensions_mut().insert(p.clone());
                }
                req.extensions_mut().insert(ConnectInfo(remote));
                req
            });
            // HTTP/2 when ALPN says so (or the client sends its preface), else HTTP/1.1.
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(cfg.header_timeout)
                .max_buf_size(64 * 1024);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(128)
                .max_header_list_size(64 * 1024)
                .keep_alive_interval(Some(cfg.header_timeout))
                .keep_alive_timeout(cfg.header_timeout);
            let conn = builder.serve_connection(TokioIo::new(tls), TowerToHyperService::new(svc));
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(peer = %remote, error = %e, "connection ended with error");
                    }
                }
                _ = shutdown.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(conn_done_tx);
    // Every connection task holds a clone of the sender; wait for them to finish.
    let _ =
        tokio::time::timeout(Duration::from_secs(5), async { while conn_done_rx.changed().await.is_ok() {} })
            .await;
}
