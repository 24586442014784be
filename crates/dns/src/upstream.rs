//! Forwarding to upstream resolvers: plain DNS over UDP (TCP when the answer is
//! truncated), DNS over TCP and DNS over TLS (RFC 7858; one kept-alive connection per
//! upstream with queries pipelined on it, see [`crate::pipeline`]) and DNS over HTTPS
//! (RFC 8484, pooled), each tried in turn with its own deadline until one answers.
//! Encrypted upstreams are always verified. The queries waiting for upstreams at once
//! are bounded: each holds a socket or a slot on a stream, and a flood of names in a
//! slow zone must not run the process out of descriptors.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::pipeline::{Pipeline, Stream};

/// Why no upstream answered.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// None configured.
    #[error("no upstream resolver configured")]
    NoUpstreams,
    /// Every upstream failed; the last failure.
    #[error("all upstream resolvers failed; last: {0}")]
    AllFailed(String),
    /// Too many queries already wait for the upstreams.
    #[error("{0} queries already wait for the upstreams")]
    Overloaded(usize),
}

/// Why an upstream spec does not parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "upstream {0:?}: expected IP[:port], tcp://IP[:port], tls://IP[:port]#server-name or https://host[:port]/path"
)]
pub struct BadUpstream(pub String);

type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

/// One upstream resolver.
pub enum Upstream {
    /// Plain DNS, UDP then TCP on truncation.
    Plain(SocketAddr),
    /// Plain DNS over TCP only, pipelined on a kept-alive connection.
    Tcp {
        /// Where.
        addr: SocketAddr,
        /// The kept-alive connection.
        pipe: Box<Pipeline>,
    },
    /// DNS over TLS, verified for `name`.
    Tls {
        /// Where.
        addr: SocketAddr,
        /// The name its certificate must carry.
        name: ServerName<'static>,
        /// Client TLS (ALPN `dot`).
        tls: tokio_rustls::TlsConnector,
        /// The kept-alive connection.
        pipe: Box<Pipeline>,
    },
    /// DNS over HTTPS (POST).
    Https {
        /// The URL, e.g. `https://dns.example/dns-query`.
        url: http::Uri,
        /// Pooled client.
        client: Box<HttpsClient>,
    },
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

impl Upstream {
    /// Parses `IP[:port]` (port 53), `tcp://IP[:port]` (port 53), `tls://IP[:port]#name` (port 853; the name the
    /// certificate must carry, default the IP) or `https://host[:port]/path`; encrypted
    /// upstreams are verified against `roots`.
    pub fn parse(spec: &str, roots: &Arc<rustls::RootCertStore>) -> Result<Self, BadUpstream> {
        let bad = || BadUpstream(spec.to_owned());
        let provider = portcullis_client::tls::provider();
        let client_tls = |alpn: &[&[u8]]| -> Result<rustls::ClientConfig, BadUpstream> {
            let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|_| bad())?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
            Ok(c)
        };
        if let Some(rest) = spec.strip_prefix("tls://") {
            let (host, name) = match rest.split_once('#') {
                Some((h, n)) => (h, Some(n)),
                None => (rest, None),
            };
            let addr = host
                .parse::<SocketAddr>()
                .or_else(|_| host.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 853)))
                .map_err(|_| bad())?;
            let name = match name {
                Some(n) => ServerName::try_from(n.to_owned()).map_err(|_| bad())?,
                None => ServerName::from(addr.ip()),
            };
            let tls = tokio_rustls::TlsConnector::from(Arc::new(client_tls(&[b"dot"])?));
            return Ok(Self::Tls { addr, name, tls, pipe: Box::default() });
        }
        if let Some(host) = spec.strip_prefix("tcp://") {
            let addr = host
                .parse::<SocketAddr>()
                .or_else(|_| host.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| bad())?;
            return Ok(Self::Tcp { addr, pipe: Box::default() });
        }
        if spec.starts_with("https://") {
            let url: http::Uri = spec.parse().map_err(|_| bad())?;
            url.authority().ok_or_else(bad)?;
            let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
            http.enforce_http(false);
            http.set_connect_timeout(Some(Duration::from_secs(5)));
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(client_tls(&[])?)
                .https_only()
                .enable_http1()
                .enable_http2()
                .wrap_connector(http);
            let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(https);
            return Ok(Self::Https { url, client: Box::new(client) });
        }
        let addr = spec
            .parse::<SocketAddr>()
            .or_else(|_| spec.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
            .map_err(|_| bad())?;
        Ok(Self::Plain(addr))
    }

    /// How the upstream is named in logs.
    pub fn label(&self) -> String {
        match self {
            Self::Plain(a) => a.to_string(),
            Self::Tcp { addr, .. } => format!("tcp://{addr}"),
            Self::Tls { addr, name, .. } => format!("tls://{addr}#{}", name.to_str()),
            Self::Https { url, .. } => url.to_string(),
        }
    }
}

/// The configured upstream resolvers.
#[derive(Debug)]
pub struct Upstreams {
    /// Tried in this order.
    servers: Vec<Upstream>,
    /// Deadline for one server's answer.
    timeout: Duration,
    /// Queries waiting for an upstream at once.
    in_flight: tokio::sync::Semaphore,
    max_in_flight: usize,
}

pub(crate) fn random_id() -> u16 {
    let mut b = [0u8; 2];
    // SystemRandom only fails if the OS has no randomness; a fixed id then still works
    // since answers are matched on the question and the socket as well.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u16::from_be_bytes(b)
}

fn request(id: u16, query: &Query) -> Result<Vec<u8>, String> {
    let mut req = Message::new(id, MessageType::Query, OpCode::Query);
    req.metadata.recursion_desired = true;
    req.add_query(query.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    req.set_edns(edns);
    req.to_vec().map_err(|e| e.to_string())
}

fn check(resp: Message, id: u16, query: &Query) -> Result<Message, String> {
    if resp.metadata.id != id || resp.queries.first() != Some(query) {
        return Err("answer does not match the question".into());
    }
    Ok(resp)
}

async fn framed_exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    bytes: &[u8],
) -> Result<Vec<u8>, String> {
    let len = u16::try_from(bytes.len()).map_err(|_| "query too long")?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    s.write_all(&framed).await.map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())?;
    let n = s.read_u16().await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; usize::from(n)];
    s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    Ok(buf)
}

impl Upstreams {
    /// `servers`, tried in order, each given `timeout` to answer; at most
    /// `max_in_flight` queries wait for them at once (more fail at once).
    pub fn new(servers: Vec<Upstream>, timeout: Duration, max_in_flight: usize) -> Self {
        let max_in_flight = max_in_flight.max(1);
        Self { servers, timeout, in_flight: tokio::sync::Semaphore::new(max_in_flight), max_in_flight }
    }

    /// Queries waiting for an upstream now.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.in_flight.available_permits()
    }

    /// Resolves `query` (recursion desired) through the first upstream that answers.
    pub async fn resolve(&self, query: &Query) -> Result<Message, UpstreamError> {
        if self.servers.is_empty() {
            return Err(UpstreamError::NoUpstreams);
        }
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return Err(UpstreamError::Overloaded(self.max_in_flight));
        };
        let mut last = String::new();
        for server in &self.servers {
            match tokio::time::timeout(self.timeout, ask(server, query, self.timeout)).await {
                Ok(Ok(m)) => return Ok(m),
                Ok(Err(e)) => last = format!("{}: {e}", server.label()),
                Err(_) => {
                    last = format!("{}: no answer within {} ms", server.label(), self.timeout.as_millis())
                }
            }
            tracing::debug!(error = %last, "upstream failed; trying the next");
        }
        Err(UpstreamError::AllFailed(last))
    }
}

async fn ask(server: &Upstream, query: &Query, deadline: Duration) -> Result<Message, String> {
    let id = random_id();
    let bytes = request(id, query)?;
    let parse = |buf: Vec<u8>| -> Result<Message, String> {
        let resp = Message::from_vec(&buf).map_err(|e| e.to_string())?;
        // The pipeline matched the id; the question must match too.
        if resp.queries.first() != Some(query) {
            return Err("answer does not match the question".into());
        }
        Ok(resp)
    };
    match server {
        Upstream::Plain(addr) => ask_udp(*addr, &bytes, id, query).await,
        Upstream::Tcp { addr, pipe } => {
            let addr = *addr;
            let connect = || async move {
                let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                let _ = tcp.set_nodelay(true);
                Ok(Box::new(tcp) as Box<dyn Stream>)
            };
            parse(pipe.exchange(&bytes, deadline, connect).await?)
        }
        Upstream::Tls { addr, name, tls, pipe } => {
            let connect = || async {
                let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                let _ = tcp.set_nodelay(true);
                let s = tls.connect(name.clone(), tcp).await.map_err(|e| format!("TLS: {e}"))?;
                Ok(Box::new(s) as Box<dyn Stream>)
            };
            parse(pipe.exchange(&bytes, deadline, connect).await?)
        }
        Upstream::Https { url, client } => {
            use http_body_util::BodyExt;
            let req = http::Request::post(url.clone())
                .header(http::header::CONTENT_TYPE, "application/dns-message")
                .header(http::header::ACCEPT, "application/dns-message")
                .body(http_body_util::Full::new(bytes::Bytes::from(bytes)))
                .map_err(|e| e.to_string())?;
            let resp = client.request(req).await.map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!("HTTP {}", resp.status()));
            }
            let body = http_body_util::Limited::new(resp.into_body(), 65_535)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            // RFC 8484 section 4.1: DoH uses id 0 on the wire in GET; POST may keep it.
            let resp = Message::from_vec(&body).map_err(|e| e.to_string())?;
            if resp.queries.first() != Some(query) {
                return Err("answer does not match the question".into());
            }
            Ok(resp)
        }
    }
}

async fn ask_udp(server: SocketAddr, bytes: &[u8], id: u16, query: &Query) -> Result<Message, String> {
    let bind: SocketAddr =
        if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().map_err(|_| "bind")?;
    let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    sock.connect(server).await.map_err(|e| e.to_string())?;
    sock.send(bytes).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = sock.recv(&mut buf).await.map_err(|e| e.to_string())?;
        let Ok(resp) = Message::from_vec(&buf[..n]) else { continue };
        if resp.metadata.id != id || resp.queries.first() != Some(query) {
            continue; // not ours: keep waiting (spoofing and stray answers)
        }
        if resp.metadata.truncation {
            let mut s = TcpStream::connect(server).await.map_err(|e| e.to_string())?;
            let buf = framed_exchange(&mut s, bytes).await?;
            return check(Message::from_vec(&buf).map_err(|e| e.to_string())?, id, query);
        }
        return Ok(resp);
    }
}
