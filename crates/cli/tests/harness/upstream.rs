//! An HTTP(S) upstream on 127.0.0.1 that records every request it receives, and device
//! enrollment through the agent library: the two ends the gateway sits between.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use portcullis_core::{DeviceId, Token};

use super::Server;

#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub method: http::Method,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// An HTTP upstream on 127.0.0.1 that records every request; `/slow` answers after 3 s,
/// `/close` answers with `Connection: close` and then closes the connection.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// TCP connections accepted so far.
    pub connections: Arc<AtomicUsize>,
}

impl Upstream {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// An https upstream with the given server certificate chain and key.
    pub fn start_tls(
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> Self {
        let cfg =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap();
        Self::start_with(Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg))))
    }

    fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let rec = seen.clone();
        let connections: Arc<AtomicUsize> = Arc::default();
        let accepted = connections.clone();
        // Its own thread and runtime, so tests of either flavour can use it; it lives
        // until the test process ends.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(serve_upstream(std_listener, rec, accepted, tls));
        });
        Self { addr, seen, connections }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Seen {
        self.seen.lock().unwrap().last().cloned().expect("upstream saw nothing")
    }
}

async fn serve_upstream(
    std_listener: std::net::TcpListener,
    rec: Arc<Mutex<Vec<Seen>>>,
    accepted: Arc<AtomicUsize>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
    loop {
        let Ok((tcp, _)) = listener.accept().await else { return };
        accepted.fetch_add(1, Ordering::SeqCst);
        let rec = rec.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let rec = rec.clone();
                async move {
                    let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
                    let headers = req.headers().clone();
                    let method = req.method().clone();
                    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    if path.starts_with("/slow") {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                    }
                    let connection = if path.starts_with("/close") { "close" } else { "keep-alive" };
                    rec.lock().unwrap().push(Seen { path, method, headers, body });
                    Ok::<_, Infallible>(
                        http::Response::builder()
                            .header("content-type", "application/json")
                            .header("connection", connection)
                            .body(Full::new(Bytes::from_static(b"{\"upstream\":true}")))
                            .unwrap(),
                    )
                }
            });
            let h1 = hyper::server::conn::http1::Builder::new();
            match tls {
                None => {
                    let _ = h1.serve_connection(TokioIo::new(tcp), svc).await;
                }
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        let _ = h1.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
            }
        });
    }
}

/// Enrolls `id` in `group` with the agent library; returns (chain, key) paths.
pub fn enroll(s: &Server, id: &str, group: &str) -> (PathBuf, PathBuf) {
    let token = s.add_device(id, &["--group", group]);
    let dir = s.path(id);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(portcullis_agent::enroll(
        &s.url(),
        &s.root_pem(),
        &DeviceId::try_new(id).unwrap(),
        &Token::from_presented(&token),
        &dir,
    ))
    .unwrap();
    (dir.join("chain.pem"), dir.join("key.pem"))
}
