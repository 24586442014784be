//! Hostile load on the device port: floods of idle TLS connections from many addresses,
//! one address holding too many, HTTP/2 connections kept open with nothing to do. The
//! fleet's devices keep being served throughout, and every idle connection is closed by
//! its deadline.
#![allow(clippy::unwrap_used)]

mod harness;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::upstream::Upstream;
use harness::*;
use portcullis_core::{DeviceId, Token};
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Enrolls `id` with the agent library (async: these tests run on tokio).
async fn enroll_device(s: &Server, id: &str) {
    let token = s.add_device(id, &["--group", "cameras"]);
    portcullis_agent::enroll(
        &s.url(),
        &s.root_pem(),
        &DeviceId::try_new(id).unwrap(),
        &Token::from_presented(&token),
        &s.path(id),
    )
    .await
    .unwrap();
}

fn raise_fd_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap()
}

/// The `n`-th of many loopback source addresses: 127.1.x.y.
fn source(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (n / 250) as u8, (n % 250 + 1) as u8))
}

/// A TLS connection from `from` that completes the handshake (ALPN `alpn`, no client
/// certificate) and then says nothing.
async fn idle_tls(
    to: SocketAddr,
    from: IpAddr,
    tls: TlsConnector,
) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(from, 0))?;
    let tcp = sock.connect(to).await?;
    tls.connect("localhost".try_into().unwrap(), tcp).await
}

fn client_tls(root: &[u8], alpn: &[&[u8]]) -> TlsConnector {
    let mut cfg = (*tls_client(root)).clone();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    TlsConnector::from(Arc::new(cfg))
}

/// Opens `n` idle TLS connections spread over `addrs` source addresses, `parallel` at a
/// time; returns those that completed their handshake.
async fn flood(
    to: SocketAddr,
    root: &[u8],
    n: usize,
    addrs: usize,
    parallel: usize,
) -> Vec<TlsStream<tokio::net::TcpStream>> {
    let h1 = client_tls(root, &[b"http/1.1"]);
    let h2 = client_tls(root, &[b"h2"]);
    let gate = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let tls = if i % 2 == 0 { h1.clone() } else { h2.clone() };
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            tokio::time::timeout(Duration::from_secs(30), idle_tls(to, source(i % addrs), tls)).await
        }));
    }
    let mut open = Vec::with_capacity(n);
    for t in tasks {
        if let Ok(Ok(Ok(s))) = t.await {
            open.push(s);
        }
    }
    open
}

async fn metrics(s: &Server) -> String {
    s.admin_client().get_text("/metrics").await.unwrap()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
        .unwrap_or(0.0)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Whether the peer closed `s` (reads EOF or an error within `wait`).
async fn closed_by_peer(s: &mut TlsStream<tokio::net::TcpStream>, wait: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(wait, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // e.g. an HTTP/2 SETTINGS or GOAWAY frame
        }
    }
}

/// 12,000 idle TLS connections without a client certificate, from 250 addresses, against
/// a cap of 10,000: the oldest idle ones are shed to admit newer ones, an enrolled
/// device's open connection keeps being served, a new device enrolls, renews and calls a
/// gateway route, and every idle connection is closed by the first-request deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_never_locks_out_the_fleet() {
    let limit = raise_fd_limit();
    let total: usize = std::env::var("PORTCULLIS_FLOOD").ok().and_then(|v| v.parse().ok()).unwrap_or(12_000);
    assert!(limit >= total as u64 + 500, "open-file limit {limit} too low for {total} connections");
    let deadline = Duration::from_secs(60);
    let up = Upstream::start();
    let s = Server::start_with_config(&format!(
        r#"
[device]
max_connections = 10000
header_timeout = "{}s"

[[gateway.routes]]
prefix = "/api/"
upstream = "http://{}"
"#,
        deadline.as_secs(),
        up.addr
    ));
    let pid = s.child.as_ref().unwrap().id();
    let root = s.root_pem();

    // A device already connected before the flood, on a kept-alive connection.
    enroll_device(&s, "cam-01").await;
    let agent = portcullis_agent::AgentDir::open(&s.path("cam-01")).unwrap();
    let client =
        portcullis_agent::EstClient::new(&s.url(), &root, Some(agent.identity_pem().unwrap())).unwrap();
    let mut kept = client.open().await.unwrap();
    assert_eq!(kept.get("/api/before").await.unwrap().0, 200);
    let token = s.add_device("cam-02", &["--group", "cameras"]);

    let rss_before = rss_kib(pid);
    let started = Instant::now();
    let mut idle = flood(s.device, &root, total, 250, 256).await;
    let flood_time = started.elapsed();
    let m = metrics(&s).await;
    let open_now = metric(&m, r#"portcullis_connections_open{listener="device"}"#);
    let shed = metric(&m, r#"portcullis_connections_shed_total{listener="device"}"#);
    let rss_after = rss_kib(pid);
    let per_conn = (rss_after.saturating_sub(rss_before) as f64 * 1024.0) / open_now.max(1.0);
    eprintln!(
        "flood: {} of {total} handshakes completed in {:.1} s; open {open_now}, shed {shed}; \
         RSS {rss_before} -> {rss_after} KiB ({:.1} KiB per open connection)",
        idle.len(),
        flood_time.as_secs_f64(),
        per_conn / 1024.0
    );
    assert!(flood_time < deadline, "the flood took longer than the deadline; the test proves nothing");
    assert_eq!(idle.len(), total, "every connection was admitted (older idle ones shed for newer)");
    assert!((9_000.0..=10_000.0).contains(&open_now), "open {open_now}");
    assert!(shed >= (total - 10_000) as f64, "shed {shed}");
    assert!(per_conn < 96.0 * 1024.0, "RSS per idle connection {per_conn} bytes");

    // The oldest were shed to make room: closed already.
    let mut shed_open = 0;
    for c in idle.iter_mut().take(100) {
        if !closed_by_peer(c, Duration::from_millis(100)).await {
            shed_open += 1;
        }
    }
    assert_eq!(shed_open, 0, "the oldest idle connections were not the ones shed");

    // The device already connected is still served on its connection...
    let t = Instant::now();
    assert_eq!(kept.get("/api/during").await.unwrap().0, 200);
    let kept_latency = t.elapsed();
    // ... and a new device enrolls, renews and calls a route on new connections.
    let t = Instant::now();
    portcullis_agent::enroll(
        &s.url(),
        &root,
        &DeviceId::try_new("cam-02").unwrap(),
        &Token::from_presented(&token),
        &s.path("cam-02"),
    )
    .await
    .unwrap();
    let enroll_latency = t.elapsed();
    let t = Instant::now();
    let renewed = portcullis_agent::renew(&s.path("cam-02"), true).await.unwrap();
    let renew_latency = t.elapsed();
    let agent2 = portcullis_agent::AgentDir::open(&s.path("cam-02")).unwrap();
    let client2 =
        portcullis_agent::EstClient::new(&s.url(), &root, Some(agent2.identity_pem().unwrap())).unwrap();
    let t = Instant::now();
    assert_eq!(client2.get("/api/new-device").await.unwrap().0, 200);
    let call_latency = t.elapsed();
    eprintln!(
        "during the flood: kept-alive request {kept_latency:?}, enroll {enroll_latency:?}, \
         renew {renew_latency:?} ({renewed:?}), gateway call {call_latency:?}"
    );
    for (what, took) in [
        ("kept-alive request", kept_latency),
        ("enroll", enroll_latency),
        ("renew", renew_latency),
        ("gateway call", call_latency),
    ] {
        // 1 s is the requirement; the bound leaves room for a loaded shared machine.
        assert!(took < Duration::from_secs(5), "{what} took {took:?}");
    }

    // The idle connections are closed by the first-request deadline: none is left open
    // a few seconds after it passed.
    tokio::time::sleep((flood_time + deadline + Duration::from_secs(5)).saturating_sub(started.elapsed()))
        .await;
    let mut still_open = 0;
    for s in idle.iter_mut().rev().take(200) {
        if !closed_by_peer(s, Duration::from_millis(50)).await {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "idle connections outlived the deadline");
    let m = metrics(&s).await;
    let open_after = metric(&m, r#"portcullis_connections_open{listener="device"}"#);
    assert!(open_after <= 5.0, "open after the deadline: {open_after}");
    assert!(
        metric(&m, r#"portcullis_connections_closed_idle_total{listener="device",reason="http1_idle"}"#)
            > 0.0
    );
    assert!(
        metric(&m, r#"portcullis_connections_closed_idle_total{listener="device",reason="http2_idle"}"#)
            > 0.0
    );
    drop(idle);
}

/// One address may hold `max_connections_per_ip`; the next is closed at once, before any
/// TLS work, and counted; other addresses are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_more_than_its_share() {
    raise_fd_limit();
    let s = Server::start_with_config("[device]\nmax_connections_per_ip = 20\n");
    let root = s.root_pem();
    let tls = client_tls(&root, &[b"http/1.1"]);
    let from = IpAddr::V4(Ipv4Addr::new(127, 3, 0, 1));
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(idle_tls(s.device, from, tls.clone()).await.unwrap());
    }
    // The 21st: closed before the handshake.
    let refused = idle_tls(s.device, from, tls.clone()).await;
    assert!(refused.is_err(), "a 21st connection from one address was admitted");
    // Another address still gets in.
    let mut other = idle_tls(s.device, IpAddr::V4(Ipv4Addr::new(127, 3, 0, 2)), tls.clone()).await.unwrap();
    assert!(!closed_by_peer(&mut other, Duration::from_millis(200)).await);
    let m = metrics(&s).await;
    assert_eq!(metric(&m, r#"portcullis_connections_refused_total{listener="device",reason="per_ip"}"#), 1.0);
    // One leaves: the address may connect again.
    held.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = idle_tls(s.device, from, tls).await;
    assert!(again.is_ok(), "{again:?}");
}

/// The protocol comes from ALPN, never from waiting for the client's first bytes; a
/// connection that says nothing after its handshake, an HTTP/1.1 connection idle after a
/// response, and an HTTP/2 connection with no open stream (which answers PINGs) are each
/// closed by the deadline; HTTP/2 with a GOAWAY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_state_has_a_deadline() {
    let up = Upstream::start();
    let s = Server::start_with_config(&format!(
        "[device]\nheader_timeout = \"2s\"\n[[gateway.routes]]\nprefix = \"/api/\"\nupstream = \"http://{}\"\n",
        up.addr
    ));
    let root = s.root_pem();
    enroll_device(&s, "cam-01").await;
    let agent = portcullis_agent::AgentDir::open(&s.path("cam-01")).unwrap();
    let identity = agent.identity_pem().unwrap();
    let local = IpAddr::V4(Ipv4Addr::LOCALHOST);

    // Silent after the handshake, each ALPN (and none): closed after ~2 s, not before.
    for alpn in [&[b"http/1.1" as &[u8]][..], &[b"h2"], &[]] {
        let mut c = idle_tls(s.device, local, client_tls(&root, alpn)).await.unwrap();
        let t = Instant::now();
        assert!(closed_by_peer(&mut c, Duration::from_secs(10)).await, "alpn {alpn:?}: never closed");
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(1500), "alpn {alpn:?}: closed after {took:?}");
    }

    // HTTP/1.1 keep-alive after a response: closed once idle for the deadline.
    let client = portcullis_agent::EstClient::new(&s.url(), &root, Some(identity.clone())).unwrap();
    let mut kept = client.open().await.unwrap();
    assert_eq!(kept.get("/api/one").await.unwrap().0, 200);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(kept.get("/api/two").await.unwrap().0, 200, "closed while still in use");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(kept.get("/api/three").await.is_err(), "an idle keep-alive connection outlived the deadline");

    // HTTP/2 that answers every PING but opens no stream: GOAWAY, then closed.
    let tls = {
        let mut cfg = (*tls_client(&root)).clone();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&identity.0)
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&identity.1).unwrap();
        let cfg =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(cfg_roots(&root))
                .with_client_auth_cert(certs, key)
                .unwrap();
        let mut cfg = cfg;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        TlsConnector::from(Arc::new(cfg))
    };
    let stream = idle_tls(s.device, local, tls).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(500))
        .keep_alive_while_idle(true)
        .handshake::<_, http_body_util::Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let req = http::Request::get(format!("{}/api/h2", s.url())).body(http_body_util::Empty::new()).unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 200);
    let t = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(15), driver).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection (answering PINGs) was kept open");
    assert!(t.elapsed() >= Duration::from_millis(1500), "closed after {:?}", t.elapsed());
    let m = metrics(&s).await;
    assert!(
        metric(&m, r#"portcullis_connections_closed_idle_total{listener="device",reason="http2_idle"}"#)
            >= 1.0
    );
}

fn cfg_roots(root: &[u8]) -> rustls::RootCertStore {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(root) {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}
