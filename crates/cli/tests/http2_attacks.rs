//! Known HTTP/2 attacks against the device port, on real sockets: each attacking
//! connection is cut off with GOAWAY and counted
//! (`portcullis_device_http2_goaway_total{code,cause}`), requests smuggled towards the
//! HTTP/1.1 upstream are refused and never forwarded, and an enrolled device on another
//! connection keeps being served (curl --http2).
//!
//! Rapid reset uses the `h2` crate's client; everything else a raw client ([`Raw`]) that
//! writes frames byte by byte the way an attacker's tool would, which no well-behaved
//! HTTP/2 library lets one do.
#![allow(clippy::unwrap_used)]

mod harness;

use std::io::{Read, Write};
use std::path::Path;
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
    assert_eq!(goaways(&s, "ENHANCE_YOUR_CALM", "rapid_reset"), 1);
    // The device, on its own connection, is served.
    assert_eq!(device_call(&s, &cert, &key), 200);
}

// ---------------------------------------------------------------------------------------
// A raw HTTP/2 client.

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const PRIORITY: u8 = 2;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

const PROTOCOL_ERROR: u32 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix after the bits in `first` (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    let mut v = v - max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header field as a literal without indexing, new name, no Huffman: any bytes at all,
/// the way an attacker would send them.
fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name);
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// `block` as stream 1's HEADERS (END_STREAM) and CONTINUATION frames of 16,000 bytes,
/// END_HEADERS on the last.
fn header_frames(block: &[u8]) -> Vec<u8> {
    let chunks: Vec<&[u8]> = block.chunks(16000).collect();
    let last = chunks.len() - 1;
    let mut bytes = Vec::new();
    for (i, c) in chunks.into_iter().enumerate() {
        let (kind, flags) = if i == 0 { (HEADERS, END_STREAM) } else { (CONTINUATION, 0) };
        bytes.extend(frame(kind, flags | if i == last { END_HEADERS } else { 0 }, 1, c));
    }
    bytes
}

/// A request header block: the four pseudo-headers, then `extra`.
fn request_block(method: &str, path: &[u8], extra: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    literal(&mut b, b":method", method.as_bytes());
    literal(&mut b, b":scheme", b"https");
    literal(&mut b, b":authority", b"localhost");
    literal(&mut b, b":path", path);
    for (n, v) in extra {
        literal(&mut b, n, v);
    }
    b
}

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// What the server did with one stream.
#[derive(Debug, PartialEq)]
enum Outcome {
    Status(u16),
    Reset(u32),
    GoAway(u32),
    Closed,
}

/// A raw HTTP/2 client connection over TLS with ALPN h2.
struct Raw {
    tls: rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    buf: Vec<u8>,
    closed: bool,
    hpack: fluke_hpack::Decoder<'static>,
}

impl Raw {
    /// Connects as `identity` (chain and key PEM files; anonymous when `None`), sends the
    /// preface and a SETTINGS frame with `settings`. `rcvbuf` shrinks the socket's
    /// receive buffer (set before connecting, so the window is small from the start).
    fn connect(
        s: &Server,
        identity: Option<(&Path, &Path)>,
        settings: &[(u16, u32)],
        rcvbuf: Option<u32>,
    ) -> Self {
        let root = s.root_pem();
        let mut cfg = match identity {
            Some((chain, key)) => (*tls_client_cert(&root, chain, key)).clone(),
            None => (*tls_client(&root)).clone(),
        };
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(n) = rcvbuf {
            socket.set_recv_buffer_size(n).unwrap();
        }
        let tcp = std::thread::scope(|_| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async { socket.connect(s.device).await.unwrap().into_std().unwrap() })
        });
        tcp.set_nonblocking(false).unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        tcp.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let mut payload = Vec::new();
        for (id, v) in settings {
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&v.to_be_bytes());
        }
        hello.extend(frame(SETTINGS, 0, 0, &payload));
        tls.write_all(&hello).unwrap();
        assert_eq!(tls.conn.alpn_protocol(), Some(&b"h2"[..]));
        Self { tls, buf: Vec::new(), closed: false, hpack: fluke_hpack::Decoder::new() }
    }

    /// Writes `bytes`; false once the server has closed the connection.
    fn send(&mut self, bytes: &[u8]) -> bool {
        !self.closed && self.tls.write_all(bytes).and_then(|()| self.tls.flush()).is_ok()
    }

    /// The next frame, or `None` when none came within `wait` or the connection ended.
    fn next(&mut self, wait: Duration) -> Option<Frame> {
        let until = Instant::now() + wait;
        loop {
            if self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]])
                            & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    if f.kind == SETTINGS && f.flags & 1 == 0 {
                        // Acknowledge the server's settings, as any client must.
                        self.send(&frame(SETTINGS, 1, 0, &[]));
                    }
                    return Some(f);
                }
            }
            if self.closed || Instant::now() >= until {
                return None;
            }
            // rustls's own read would first flush what a failed write left buffered, and
            // fail on that: read the socket directly, so data that arrived before the
            // server closed (its GOAWAY) is still seen.
            let mut chunk = [0u8; 16384];
            match self.tls.conn.reader().read(&mut chunk) {
                Ok(0) => self.closed = true,
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => self.closed = true,
            }
            if self.closed {
                continue;
            }
            match self.tls.conn.read_tls(&mut self.tls.sock) {
                Ok(0) => self.closed = true,
                Ok(_) => {
                    if self.tls.conn.process_new_packets().is_err() {
                        self.closed = true;
                    }
                }
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => self.closed = true,
            }
        }
    }

    /// Reads until the server's GOAWAY (its code and debug data) or the end of the
    /// connection, for at most `wait`; `None` when no GOAWAY came.
    fn goaway(&mut self, wait: Duration) -> Option<(u32, String)> {
        let until = Instant::now() + wait;
        while Instant::now() < until {
            match self.next(until - Instant::now()) {
                Some(f) if f.kind == GOAWAY => {
                    let code = u32::from_be_bytes([f.payload[4], f.payload[5], f.payload[6], f.payload[7]]);
                    return Some((code, String::from_utf8_lossy(&f.payload[8..]).into_owned()));
                }
                Some(_) => {}
                None if self.closed => return None,
                None => {}
            }
        }
        None
    }

    /// True once the server has closed the connection (within `wait`).
    fn ends_within(&mut self, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        while !self.closed && Instant::now() < until {
            self.next(until - Instant::now());
        }
        self.closed
    }

    /// What became of `stream`: its response status, a reset, or the connection's end.
    fn outcome(&mut self, stream: u32) -> Outcome {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            match self.next(Duration::from_millis(500)) {
                Some(f) if f.kind == HEADERS && f.stream == stream => {
                    let fields = self.hpack.decode(&f.payload).unwrap();
                    let status = fields.iter().find(|(n, _)| n == b":status").unwrap();
                    return Outcome::Status(std::str::from_utf8(&status.1).unwrap().parse().unwrap());
                }
                Some(f) if f.kind == HEADERS => {
                    self.hpack.decode(&f.payload).unwrap();
                }
                Some(f) if f.kind == RST_STREAM && f.stream == stream => {
                    return Outcome::Reset(u32::from_be_bytes(f.payload[..4].try_into().unwrap()));
                }
                Some(f) if f.kind == GOAWAY => {
                    return Outcome::GoAway(u32::from_be_bytes(f.payload[4..8].try_into().unwrap()));
                }
                Some(_) => {}
                None if self.closed => return Outcome::Closed,
                None => {}
            }
        }
        panic!("no answer on stream {stream} within 10 s");
    }
}

/// The count of GOAWAYs the server sent with `code` for `cause`.
fn goaways(s: &Server, code: &str, cause: &str) -> u64 {
    let needle = format!("portcullis_device_http2_goaway_total{{code=\"{code}\",cause=\"{cause}\"}} ");
    s.metrics_now().lines().find_map(|l| l.strip_prefix(&needle)).map_or(0, |v| v.trim().parse().unwrap())
}

/// A server with the device route `/api/` to a recording upstream, and an enrolled
/// device cam-01 (its chain and key).
fn fleet(extra_config: &str) -> (Server, Upstream, std::path::PathBuf, std::path::PathBuf) {
    let up = Upstream::start();
    let s = Server::start_with_config(&format!(
        "[[gateway.routes]]\nprefix = \"/api/\"\nupstream = \"http://{}\"\n{extra_config}",
        up.addr
    ));
    let (cert, key) = enroll(&s, "cam-01", "cameras");
    (s, up, cert, key)
}

/// Floods `frames` in bursts until the server sends GOAWAY; its code and debug data.
fn flood_until_goaway(raw: &mut Raw, burst: &[u8], rounds: usize) -> (u32, String, usize) {
    for round in 1..=rounds {
        if !raw.send(burst) {
            return raw
                .goaway(Duration::from_secs(5))
                .map(|(c, d)| (c, d, round))
                .expect("closed without GOAWAY");
        }
        if let Some((code, debug)) = raw.goaway(Duration::from_millis(50)) {
            return (code, debug, round);
        }
    }
    panic!("no GOAWAY after {rounds} bursts");
}

#[test]
fn rapid_reset_is_counted() {
    let (s, _up, cert, key) = fleet("");
    let mut raw = Raw::connect(&s, None, &[], None);
    // HEADERS then RST_STREAM(CANCEL), stream after stream, without waiting.
    let mut burst = Vec::new();
    let mut id = 1u32;
    let block = request_block("GET", b"/api/x", &[]);
    for _ in 0..200 {
        burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
        burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
        id += 2;
    }
    let (code, debug, _) = flood_until_goaway(&mut raw, &burst, 50);
    assert_eq!((code, debug.as_str()), (ENHANCE_YOUR_CALM, "too_many_resets"));
    assert!(raw.ends_within(Duration::from_secs(5)), "connection left open after GOAWAY");
    assert_eq!(goaways(&s, "ENHANCE_YOUR_CALM", "rapid_reset"), 1);
    assert_eq!(device_call(&s, &cert, &key), 200);
}

#[test]
fn continuation_floods_are_cut_off() {
    let (s, up, cert, key) = fleet("");
    // Endless CONTINUATION frames after a HEADERS without END_HEADERS.
    let mut raw = Raw::connect(&s, Some((&cert, &key)), &[], None);
    let mut first = Vec::new();
    literal(&mut first, b":method", b"GET");
    assert!(raw.send(&frame(HEADERS, END_STREAM, 1, &first)));
    let mut burst = Vec::new();
    for _ in 0..100 {
        // Each a complete header field, so the decoder has nothing to wait for.
        let mut b = Vec::new();
        literal(&mut b, b"x-a", b"b");
        burst.extend(frame(CONTINUATION, 0, 1, &b));
    }
    let (code, debug, rounds) = flood_until_goaway(&mut raw, &burst, 1000);
    assert_eq!(
        (code, debug.as_str()),
        (ENHANCE_YOUR_CALM, "too_many_continuations"),
        "after {rounds} bursts"
    );
    assert!(raw.ends_within(Duration::from_secs(5)));
    assert_eq!(goaways(&s, "ENHANCE_YOUR_CALM", "continuation_flood"), 1);

    // A huge header block: one 1 MiB header value in 16 KiB CONTINUATIONs.
    let mut raw = Raw::connect(&s, Some((&cert, &key)), &[], None);
    let mut block = request_block("GET", b"/api/devices/cam-01/telemetry", &[]);
    literal(&mut block, b"x-huge", &vec![b'a'; 1 << 20]);
    let mut chunks = block.chunks(16384);
    let mut bytes = frame(HEADERS, END_STREAM, 1, chunks.next().unwrap());
    for c in chunks {
        bytes.extend(frame(CONTINUATION, 0, 1, c));
    }
    let (code, _, _) = flood_until_goaway(&mut raw, &bytes, 1);
    assert!(code == ENHANCE_YOUR_CALM || code == 0x9, "GOAWAY code {code}");
    assert!(raw.ends_within(Duration::from_secs(5)));
    assert_eq!(up.count(), 0, "a request from a cut-off header block was forwarded");
    assert_eq!(device_call(&s, &cert, &key), 200);
}

#[test]
fn settings_ping_priority_and_window_update_floods_are_cut_off() {
    let (s, _up, cert, key) = fleet("");
    let floods: [(&str, Vec<u8>, &str); 5] = [
        ("SETTINGS", frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]), "control_frame_flood"),
        ("PING", frame(PING, 0, 0, &[1; 8]), "control_frame_flood"),
        ("PRIORITY", frame(PRIORITY, 0, 3, &[0, 0, 0, 1, 16]), "control_frame_flood"),
        ("unknown frame type", frame(0xfa, 0, 0, b"ignored"), "control_frame_flood"),
        ("WINDOW_UPDATE", frame(WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes()), "window_update_flood"),
    ];
    for (name, one, cause) in floods {
        let before = goaways(&s, "ENHANCE_YOUR_CALM", cause);
        let mut raw = Raw::connect(&s, None, &[], None);
        let burst: Vec<u8> = one.iter().copied().cycle().take(one.len() * 100).collect();
        let (code, debug, rounds) = flood_until_goaway(&mut raw, &burst, 1000);
        assert_eq!((code, debug.as_str()), (ENHANCE_YOUR_CALM, cause), "{name} flood");
        println!("{name} flood: GOAWAY after {} frames", rounds * 100);
        assert!(raw.ends_within(Duration::from_secs(5)), "{name} flood: connection left open");
        assert_eq!(goaways(&s, "ENHANCE_YOUR_CALM", cause), before + 1, "{name} flood not counted");
        assert_eq!(device_call(&s, &cert, &key), 200);
    }
    // A client at a normal pace is not taken for a flood: a PING a second tenth of a
    // second apart, 30 of them, and a request after.
    let mut raw = Raw::connect(&s, Some((&cert, &key)), &[], None);
    for _ in 0..30 {
        assert!(raw.send(&frame(PING, 0, 0, &[2; 8])));
        std::thread::sleep(Duration::from_millis(20));
    }
    let block =
        request_block("POST", b"/api/devices/cam-01/telemetry", &[(b"content-type", b"application/json")]);
    assert!(raw.send(&frame(HEADERS, END_HEADERS, 1, &block)));
    assert!(raw.send(&frame(DATA, END_STREAM, 1, b"{}")));
    assert_eq!(raw.outcome(1), Outcome::Status(200));
}

#[test]
fn a_response_the_client_will_not_take_ends_the_connection() {
    let (s, _up, cert, key) =
        fleet("[device.http2]\nsend_timeout = \"2s\"\nmax_concurrent_streams = 10000\n");

    // Zero window: the client reads frames but never lets a byte of body through.
    let mut raw = Raw::connect(&s, Some((&cert, &key)), &[(SETTINGS_INITIAL_WINDOW_SIZE, 0)], None);
    let block = request_block("GET", b"/api/devices/cam-01/telemetry", &[]);
    assert!(raw.send(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &block)));
    let started = Instant::now();
    assert_eq!(raw.outcome(1), Outcome::Status(200));
    let (code, debug) = raw.goaway(Duration::from_secs(15)).expect("no GOAWAY for a stalled response");
    let took = started.elapsed();
    assert_eq!((code, debug.as_str()), (ENHANCE_YOUR_CALM, "send_stall"));
    assert!(took >= Duration::from_millis(1500), "cut off after {took:?}, before send_timeout");
    assert!(raw.ends_within(Duration::from_secs(5)));
    assert_eq!(goaways(&s, "ENHANCE_YOUR_CALM", "send_stall"), 1);

    // A client that never reads at all: 8000 requests for the CA certificates (about
    // 1 KiB each; the server allows that many streams here, so none is refused), windows
    // wide open, a 4 KiB socket receive buffer: the server's writes stop; then silence.
    let mut raw = Raw::connect(&s, None, &[(SETTINGS_INITIAL_WINDOW_SIZE, 1 << 30)], Some(4096));
    assert!(raw.send(&frame(WINDOW_UPDATE, 0, 0, &(1u32 << 30).to_be_bytes())));
    let block = request_block("GET", b"/.well-known/est/cacerts", &[]);
    let started = Instant::now();
    let mut burst = Vec::new();
    let mut id = 1u32;
    for _ in 0..8000 {
        burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
        id += 2;
    }
    // Until the server stops reading too (a write timeout here) or all of it went.
    let _ = raw.tls.write_all(&burst);
    println!("never-read client: {} requests in {:?}", id / 2, started.elapsed());
    let deadline = Instant::now() + Duration::from_secs(15);
    while goaways(&s, "unsent", "write_stall") == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        goaways(&s, "unsent", "write_stall"),
        1,
        "a connection that does not read was kept: {}",
        s.metrics_now().lines().filter(|l| l.contains("goaway")).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(device_call(&s, &cert, &key), 200);
}

#[test]
fn more_streams_than_advertised_and_hpack_bombs_are_cut_off() {
    let (s, up, cert, key) =
        fleet("[device.http2]\nmax_concurrent_streams = 16\nmax_local_error_reset_streams = 50\n");

    // Streams opened and left open (no END_STREAM), far beyond the advertised 16.
    let mut raw = Raw::connect(&s, Some((&cert, &key)), &[], None);
    let block =
        request_block("POST", b"/api/devices/cam-01/telemetry", &[(b"content-type", b"application/json")]);
    let mut burst = Vec::new();
    for i in 0..200u32 {
        burst.extend(frame(HEADERS, END_HEADERS, 1 + 2 * i, &block));
    }
    let (code, debug, _) = flood_until_goaway(&mut raw, &burst, 1);
    assert_eq!((code, debug.as_str()), (ENHANCE_YOUR_CALM, "too_many_internal_resets"));
    assert!(raw.ends_within(Duration::from_secs(5)));
    assert_eq!(goaways(&s, "ENHANCE_YOUR_CALM", "refused_streams"), 1);

    // An HPACK bomb: a 4000-byte value put in the dynamic table once, then referenced
    // by one byte each, 8000 times: 8 KiB on the wire, 32 MB decoded.
    let mut raw = Raw::connect(&s, Some((&cert, &key)), &[], None);
    let mut block = request_block("GET", b"/api/devices/cam-01/telemetry", &[]);
    block.push(0x40); // literal with incremental indexing, new name
    hpack_int(&mut block, 0, 7, 6);
    block.extend_from_slice(b"x-bomb");
    hpack_int(&mut block, 0, 7, 4000);
    block.extend(std::iter::repeat_n(b'a', 4000));
    block.extend(std::iter::repeat_n(0x80 | 62, 8000)); // indexed: dynamic entry 62
    let bytes = header_frames(&block);
    let (code, debug, _) = flood_until_goaway(&mut raw, &bytes, 1);
    assert_eq!((code, debug.as_str()), (ENHANCE_YOUR_CALM, "header_list_way_too_large"));
    assert!(raw.ends_within(Duration::from_secs(5)));
    assert_eq!(goaways(&s, "ENHANCE_YOUR_CALM", "header_list_too_large"), 1);

    // A header list just over max_header_list_size is answered 431, the connection lives.
    let mut raw = Raw::connect(&s, Some((&cert, &key)), &[], None);
    let block = request_block("GET", b"/api/devices/cam-01/telemetry", &[(b"x-big", &vec![b'a'; 70_000])]);
    let bytes = header_frames(&block);
    assert!(raw.send(&bytes));
    assert_eq!(raw.outcome(1), Outcome::Status(431));
    assert_eq!(up.count(), 0, "an oversized request was forwarded");
    assert_eq!(device_call(&s, &cert, &key), 200);
}

/// Requests that an HTTP/1.1 upstream could read differently than we did, sent by an
/// enrolled device on a route that would forward them: each refused (400, or the stream
/// reset), none forwarded.
#[test]
fn requests_smuggled_through_the_downgrade_are_refused_and_never_forwarded() {
    let (s, up, cert, key) = fleet("");
    let json: (&[u8], &[u8]) = (b"content-type", b"application/json");
    let path = b"/api/devices/cam-01/telemetry".as_slice();
    // (what, method, :path, extra headers, body)
    type Case<'a> = (&'a str, &'a str, Vec<u8>, Vec<(&'a [u8], &'a [u8])>, &'a [u8]);
    let cases: Vec<Case<'_>> = vec![
        (
            "content-length below the DATA",
            "POST",
            path.to_vec(),
            vec![json, (b"content-length", b"2")],
            b"{}{\"a\":1}",
        ),
        (
            "content-length above the DATA",
            "POST",
            path.to_vec(),
            vec![json, (b"content-length", b"100")],
            b"{}",
        ),
        (
            "two content-lengths",
            "POST",
            path.to_vec(),
            vec![json, (b"content-length", b"2"), (b"content-length", b"9")],
            b"{}",
        ),
        (
            "transfer-encoding",
            "POST",
            path.to_vec(),
            vec![json, (b"transfer-encoding", b"chunked")],
            b"2\r\n{}\r\n0\r\n\r\n",
        ),
        ("connection header", "POST", path.to_vec(), vec![json, (b"connection", b"keep-alive")], b"{}"),
        (
            "CR LF in :path",
            "POST",
            b"/api/devices/cam-01/telemetry HTTP/1.1\r\nHost: x\r\n\r\nGET /admin".to_vec(),
            vec![json],
            b"{}",
        ),
        ("space in :path", "POST", b"/api/devices/cam-01/telemetry HTTP/1.1".to_vec(), vec![json], b"{}"),
        (
            ":path without a leading slash",
            "POST",
            b"api/devices/cam-01/telemetry".to_vec(),
            vec![json],
            b"{}",
        ),
        (
            ":path absolute",
            "POST",
            b"http://upstream.internal/api/devices/cam-01/telemetry".to_vec(),
            vec![json],
            b"{}",
        ),
        (
            "CR LF in a header value",
            "POST",
            path.to_vec(),
            vec![json, (b"x-trace", b"a\r\nx-device-id: cam-02")],
            b"{}",
        ),
        ("CR LF in :method", "POST\r\nX: y", path.to_vec(), vec![json], b"{}"),
        ("space in :method", "GET /admin", path.to_vec(), vec![json], b"{}"),
        (
            "host disagreeing with :authority",
            "POST",
            path.to_vec(),
            vec![json, (b"host", b"upstream.internal")],
            b"{}",
        ),
        ("upper-case header name", "POST", path.to_vec(), vec![json, (b"X-Device-Id", b"cam-02")], b"{}"),
    ];
    for (what, method, p, extra, body) in cases {
        let mut raw = Raw::connect(&s, Some((&cert, &key)), &[], None);
        let block = request_block(method, &p, &extra);
        let mut bytes = frame(HEADERS, END_HEADERS, 1, &block);
        bytes.extend(frame(DATA, END_STREAM, 1, body));
        raw.send(&bytes);
        let outcome = raw.outcome(1);
        assert!(
            matches!(
                outcome,
                Outcome::Status(400) | Outcome::Reset(PROTOCOL_ERROR) | Outcome::GoAway(PROTOCOL_ERROR)
            ),
            "{what}: {outcome:?}"
        );
        println!("{what}: {outcome:?}");
        assert_eq!(up.count(), 0, "{what}: forwarded as {:?}", up.last());
    }
    // The same request, well formed, on the same route: forwarded.
    let mut raw = Raw::connect(&s, Some((&cert, &key)), &[], None);
    let mut bytes =
        frame(HEADERS, END_HEADERS, 1, &request_block("POST", path, &[json, (b"content-length", b"2")]));
    bytes.extend(frame(DATA, END_STREAM, 1, b"{}"));
    assert!(raw.send(&bytes));
    assert_eq!(raw.outcome(1), Outcome::Status(200));
    assert_eq!(up.count(), 1);
}
