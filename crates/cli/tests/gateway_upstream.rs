//! The gateway's HTTP/1.1 exchange with its upstream, against a scripted upstream that
//! answers byte for byte what a test asks for: every way a response can be framed,
//! streamed request bodies, broken and truncated answers, and an upstream that closes an
//! idle pooled connection. Driven with curl and a device certificate.
#![allow(clippy::unwrap_used)]

mod harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::upstream::enroll;
use harness::*;

/// One request as the scripted upstream read it.
#[derive(Debug, Clone)]
struct Got {
    method: String,
    path: String,
    /// "length" or "chunked": how the gateway framed the body.
    framing: &'static str,
    body: Vec<u8>,
}

/// An upstream on 127.0.0.1 that reads HTTP/1.1 requests by hand and answers each path
/// with fixed bytes (see `answer`).
struct Scripted {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
    connections: Arc<AtomicUsize>,
}

impl Scripted {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let got: Arc<Mutex<Vec<Got>>> = Arc::default();
        let connections: Arc<AtomicUsize> = Arc::default();
        let (g, c) = (got.clone(), connections.clone());
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { return };
                c.fetch_add(1, Ordering::SeqCst);
                let g = g.clone();
                std::thread::spawn(move || serve(tcp, g));
            }
        });
        Self { addr, got, connections }
    }

    fn last(&self) -> Got {
        self.got.lock().unwrap().last().cloned().unwrap()
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }
}

fn serve(tcp: TcpStream, got: Arc<Mutex<Vec<Got>>>) {
    let mut out = tcp.try_clone().unwrap();
    let mut r = BufReader::new(tcp);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let mut length = None;
        let mut chunked = false;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (name, value) = h.split_once(':').unwrap();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = Some(value.trim().parse::<usize>().unwrap()),
                "transfer-encoding" => chunked = value.trim().eq_ignore_ascii_case("chunked"),
                _ => {}
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                r.read_line(&mut size).unwrap();
                let n = usize::from_str_radix(size.trim(), 16).unwrap();
                let mut chunk = vec![0; n + 2];
                r.read_exact(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            r.read_exact(&mut body).unwrap();
        }
        let framing = if chunked { "chunked" } else { "length" };
        let len = body.len();
        got.lock().unwrap().push(Got { method: method.clone(), path: path.clone(), framing, body });
        if !answer(&mut out, &method, &path, len, framing) {
            return;
        }
    }
}

/// Writes the scripted answer for `path`; false when the connection is to be closed.
fn answer(out: &mut TcpStream, method: &str, path: &str, len: usize, framing: &str) -> bool {
    match path {
        "/raw/chunked" => {
            let body = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n\
                        6;note=first\r\nhello \r\n5\r\nworld\r\n0\r\nX-Checksum: 1\r\n\r\n";
            out.write_all(body.as_bytes()).unwrap();
            true
        }
        "/raw/until-close" => {
            out.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nread until the end").unwrap();
            let _ = out.shutdown(std::net::Shutdown::Both);
            false
        }
        "/raw/big" => {
            let big: Vec<u8> = (0..1_048_576u32).map(|i| (i % 251) as u8).collect();
            out.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", big.len()).as_bytes())
                .unwrap();
            for piece in big.chunks(10_000) {
                out.write_all(piece).unwrap();
            }
            true
        }
        "/raw/interim" => {
            out.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
                .unwrap();
            true
        }
        "/raw/garbage" => {
            out.write_all(b"SPDY/9 what\r\n\r\n").unwrap();
            false
        }
        "/raw/truncated" => {
            out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b").unwrap();
            let _ = out.shutdown(std::net::Shutdown::Both);
            false
        }
        "/raw/idle-close" => {
            // Answers, then closes the idle connection a moment later without saying so.
            out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let _ = out.shutdown(std::net::Shutdown::Both);
            false
        }
        _ => {
            let reply = format!("{method} {path} {framing} {len}");
            let head = if method == "HEAD" { "" } else { reply.as_str() };
            out.write_all(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{head}", reply.len()).as_bytes(),
            )
            .unwrap();
            true
        }
    }
}

fn config(up: SocketAddr) -> String {
    format!(
        r#"
[[gateway.routes]]
prefix = "/raw/"
upstream = "http://{up}"
max_body_bytes = 4194304
"#
    )
}

#[test]
fn every_response_framing_is_relayed_and_broken_answers_are_502() {
    let up = Scripted::start();
    let s = Server::start_with_config(&config(up.addr));
    let (cam, key) = enroll(&s, "cam-01", "cameras");

    // Chunked, with a chunk extension and a trailer: decoded, re-framed for the device.
    let r = curl_mtls(&s, &cam, &key, "/raw/chunked", &[]);
    assert_eq!((r.status, r.body.as_slice()), (200, b"hello world".as_slice()));
    // Delimited by the upstream closing the connection.
    let r = curl_mtls(&s, &cam, &key, "/raw/until-close", &[]);
    assert_eq!((r.status, r.body.as_slice()), (200, b"read until the end".as_slice()));
    // 1 MiB, streamed through.
    let r = curl_mtls(&s, &cam, &key, "/raw/big", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 1_048_576);
    assert!(r.body.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8), "body corrupted");
    // An interim 103 is skipped; the final answer is relayed.
    let r = curl_mtls(&s, &cam, &key, "/raw/interim", &[]);
    assert_eq!((r.status, r.body.as_slice()), (201, b"ok".as_slice()));
    // HEAD: the upstream's Content-Length describes a body that is not sent.
    let r = curl_mtls(&s, &cam, &key, "/raw/head", &["-I"]);
    assert_eq!(r.status, 200);
    assert_eq!(up.last().method, "HEAD");

    // Not HTTP at all: 502 problem, and the gateway keeps serving.
    let r = curl_mtls(&s, &cam, &key, "/raw/garbage", &[]);
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["type"].as_str().map(|t| t.ends_with("upstream-unavailable")),
        Some(true),
        "{:?}",
        r.json()
    );
    // Cut short after the head: the device's transfer fails rather than looking complete.
    let (root, _) = s.ca_files();
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "--cacert"])
        .arg(&root)
        .arg("--cert")
        .arg(&cam)
        .arg("--key")
        .arg(&key)
        .arg(format!("{}/raw/truncated", s.url()))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a truncated response must not look complete");
    let r = curl_mtls(&s, &cam, &key, "/raw/after", &[]);
    assert_eq!((r.status, r.body.as_slice()), (200, b"GET /raw/after length 0".as_slice()));
}

#[test]
fn request_bodies_stream_with_their_framing() {
    let up = Scripted::start();
    let s = Server::start_with_config(&config(up.addr));
    let (cam, key) = enroll(&s, "cam-01", "cameras");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    let blob: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&file, &blob).unwrap();
    let data = format!("@{}", file.display());

    // Known length: streamed with the same Content-Length.
    let r = curl_mtls(
        &s,
        &cam,
        &key,
        "/raw/upload",
        &["-H", "Content-Type: application/octet-stream", "--data-binary", &data],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(String::from_utf8_lossy(&r.body), "POST /raw/upload length 3000000");
    let got = up.last();
    assert_eq!((got.path.as_str(), got.framing), ("/raw/upload", "length"));
    assert_eq!(got.body, blob);
    // Unknown length (chunked from the device): chunked to the upstream.
    let r = curl_mtls(
        &s,
        &cam,
        &key,
        "/raw/upload",
        &[
            "-H",
            "Content-Type: application/octet-stream",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &data,
        ],
    );
    assert_eq!(String::from_utf8_lossy(&r.body), "POST /raw/upload chunked 3000000");
    assert_eq!(up.last().body, blob);
    // Over HTTP/2 (no length on the wire unless the client sends one).
    let r = curl_mtls(
        &s,
        &cam,
        &key,
        "/raw/upload",
        &["--http2", "-H", "Content-Type: application/octet-stream", "--data-binary", &data],
    );
    assert_eq!(r.status, 200);
    assert_eq!(up.last().body, blob);
    // An empty POST announces its empty body; a GET announces none.
    let r = curl_mtls(&s, &cam, &key, "/raw/empty", &["-X", "POST"]);
    assert_eq!(String::from_utf8_lossy(&r.body), "POST /raw/empty length 0");
    assert_eq!(up.last().framing, "length");
}

#[test]
fn an_idle_connection_the_upstream_closed_is_not_reused() {
    let up = Scripted::start();
    let s = Server::start_with_config(&config(up.addr));
    let (cam, key) = enroll(&s, "cam-01", "cameras");
    // The upstream closes its side 200 ms after answering. A POST half a second later must
    // not be written to that dead connection (a POST is never retried: it may have had an
    // effect), so it goes out on a new one and succeeds.
    let post = ["-X", "POST", "-H", "Content-Type: application/json", "-d", "{}"];
    let r = curl_mtls(&s, &cam, &key, "/raw/idle-close", &post);
    assert_eq!(r.status, 200);
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        let r = curl_mtls(&s, &cam, &key, "/raw/idle-close", &post);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(up.count(), 4);
    assert_eq!(up.connections.load(Ordering::SeqCst), 4);
}
