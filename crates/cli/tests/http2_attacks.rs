//! Known HTTP/2 attacks against the device port, with a raw HTTP/2 client (the `h2`
//! crate) on real sockets: the attacking connection is cut off with GOAWAY, and an
//! enrolled device on another connection keeps being served.
#![allow(clippy::unwrap_used)]

mod harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::upstream::{Upstream, enroll};
use harness::*;

/// An anonymous TLS connection with ALPN h2 and an HTTP/2 client on it.
async fn h2_connect(
    s: &Server,
) -> (h2::client::SendRequest<bytes::Bytes>, tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let mut cfg = (*tls_client(&s.root_pem())).clone();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(s.device).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    (send, tokio::spawn(conn))
}

/// curl --http2 with the device's certificate; the status.
fn device_call(s: &Server, cert: &std::path::Path, key: &std::path::Path) -> u16 {
    curl_mtls(s, cert, key, "/api/devices/cam-01/telemetry", &["--http2", "--data", "{}"]).status
}

/// CVE-2023-44487: streams opened and cancelled at once, as fast as the client can.
#[test]
fn rapid_reset_is_cut_off_and_a_device_is_served() {
    let up = Upstream::start();
    let s = Server::start_with_config(&format!(
        "[[gateway.routes]]\nprefix = \"/api/\"\nupstream = \"http://{}\"\n",
        up.addr
    ));
    let (cert, key) = enroll(&s, "cam-01", "cameras");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (ended, sent) = rt.block_on(async {
        let (mut send, conn) = h2_connect(&s).await;
        let started = Instant::now();
        let mut sent = 0;
        while sent < 100_000 && started.elapsed() < Duration::from_secs(10) {
            let Ok(ready) = send.clone().ready().await else { break };
            send = ready;
            let req = http::Request::get("https://localhost/api/x").body(()).unwrap();
            let Ok((_resp, mut stream)) = send.send_request(req, false) else { break };
            stream.send_reset(h2::Reason::CANCEL);
            sent += 1;
        }
        let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
        (ended, sent)
    });
    // The connection ended with GOAWAY, long before the client ran out of streams.
    let err = match ended {
        Ok(Ok(Err(e))) => e,
        other => panic!("connection not cut off after {sent} reset streams: {other:?}"),
    };
    assert!(err.is_go_away() || err.is_remote() || err.is_io(), "{err:?}");
    assert!(sent < 100_000, "every one of {sent} streams was accepted");
    println!("rapid reset: cut off after {sent} streams: {err}");
    // The device, on its own connection, is served.
    assert_eq!(device_call(&s, &cert, &key), 200);
}
