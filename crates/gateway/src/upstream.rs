//! Pooled HTTP/1.1 connections to one upstream, one pool per device-port worker, and the
//! exchange on them.
//!
//! A request, the upstream connection it uses and the response body stay on the worker
//! thread that accepted the device's connection, inside the request's own task: the
//! request is encoded and written, the response head read and parsed (`httparse`), and the
//! response body read from the connection as the device's connection takes it. There is
//! no connection task and no channel between the two sides, which is what a proxy on the
//! hot path can save over a general HTTP client.
//!
//! Reuse rules (RFC 9112 section 9): a connection goes back to its worker's pool only once
//! its response has been read to the last byte, the response was HTTP/1.1 without
//! `Connection: close` and its length was framed (Content-Length, or chunked without a
//! Content-Length beside it); any other connection is closed. A pooled connection is
//! checked before reuse without a system call in the common case (the runtime already
//! knows whether the socket became readable: an idle upstream connection that is readable
//! has closed or sent something unasked, and is dropped). A request is sent again on a new
//! connection only when a reused connection failed before any response byte arrived and
//! the request cannot have had an effect twice: its write failed, or it is idempotent
//! (RFC 9110 section 9.2.2) with a body that can be replayed.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Uri, Version, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tower::ServiceExt;

/// Idle connections kept per worker; more are closed when they come back.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response head (status line and headers) read from an upstream.
const MAX_HEAD: usize = 64 * 1024;
/// Most response header fields.
const MAX_HEADERS: usize = 100;
/// Largest chunk-size line or trailer section of a chunked response.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64 * 1024;
/// A buffered request body up to this size is written with its head in one system call.
const COALESCE: usize = 16 * 1024;

/// Boxed: a TLS connection's state is large, and a connection moves between the pool,
/// the exchange and the response body on every request.
type Io = Box<TokioIo<MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>>>;

/// Why a request did not get a response head from the upstream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// TCP connect or TLS handshake failed.
    #[error("connect: {0}")]
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// Reading from or writing to the upstream failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The request body could not be read from the device (or exceeded its limit).
    #[error("request body: {0}")]
    Body(axum::Error),
    /// The upstream answered something that is not a valid HTTP/1.1 response.
    #[error("invalid response: {0}")]
    Protocol(&'static str),
}

/// The request body to send.
pub(crate) enum Outgoing {
    /// Already in memory (validated, or empty): sent with a Content-Length, replayable.
    Full(Bytes),
    /// Streamed from the device: Content-Length when the size is known, chunked otherwise.
    Stream(Body),
}

struct Idle {
    io: Io,
    since: Instant,
}

type Pool = Arc<Mutex<Vec<Idle>>>;

/// One route's upstream: where to connect and the per-worker pools of idle connections.
pub(crate) struct Upstream {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority` of the upstream, what the connector dials.
    target: Uri,
    pools: Vec<Pool>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("target", &self.target).finish()
    }
}

/// A failed exchange, and whether sending the request again elsewhere is safe.
struct Failed {
    error: UpstreamError,
    /// Writing the request head failed: the upstream read none of it.
    unsent: bool,
    /// No byte of a response arrived.
    no_answer: bool,
}

impl Failed {
    fn new(error: UpstreamError, no_answer: bool) -> Self {
        Self { error, unsent: false, no_answer }
    }
}

impl Upstream {
    pub(crate) fn new(connector: HttpsConnector<HttpConnector>, target: Uri) -> Self {
        Self { connector, target, pools: vec![Pool::default()] }
    }

    /// One pool per device-port worker (before the route serves: pooled connections
    /// are dropped).
    pub(crate) fn size_pools(&mut self, workers: usize) {
        self.pools = (0..workers.max(1)).map(|_| Pool::default()).collect();
    }

    fn pool(&self) -> &Pool {
        &self.pools[crate::listener::worker_index() % self.pools.len()]
    }

    /// An idle connection that is still open, most recently used first.
    fn checkout(&self) -> Option<Io> {
        let mut idle = self.pool().lock().ok()?;
        while let Some(mut c) = idle.pop() {
            if c.since.elapsed() <= IDLE_TIMEOUT && quiet(&mut c.io) {
                return Some(c.io);
            }
        }
        None
    }

    /// Closes this worker's idle connections that are too old or that the upstream
    /// closed (run every second by the worker's upkeep task).
    pub(crate) fn evict_idle(&self) {
        if let Ok(mut idle) = self.pool().lock() {
            idle.retain_mut(|c| c.since.elapsed() <= IDLE_TIMEOUT && quiet(&mut c.io));
        }
    }

    async fn connect(&self) -> Result<Io, UpstreamError> {
        let io = self.connector.clone().oneshot(self.target.clone()).await.map_err(UpstreamError::Connect)?;
        Ok(Box::new(TokioIo::new(io)))
    }

    /// Sends a request (`head` in origin form with `Host` set, hop-by-hop headers removed)
    /// on a pooled or new connection and returns the response once its head has arrived.
    pub(crate) async fn send(
        &self,
        head: &http::request::Parts,
        body: Outgoing,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let mut wire = Vec::with_capacity(512);
        let (mut stream, chunked) = match body {
            Outgoing::Full(bytes) => {
                let announce = !bytes.is_empty() || expects_body(&head.method);
                let framing =
                    if announce { BodyFraming::Length(bytes.len() as u64) } else { BodyFraming::None };
                encode_head(head, framing, &mut wire);
                if bytes.len() <= COALESCE {
                    wire.extend_from_slice(&bytes);
                    (None, false)
                } else {
                    (Some(Body::from(bytes)), false)
                }
            }
            Outgoing::Stream(body) => {
                let len = body.size_hint().exact();
                encode_head(head, len.map_or(BodyFraming::Chunked, BodyFraming::Length), &mut wire);
                (Some(body), len.is_none())
            }
        };
        let replayable = stream.is_none();
        let head_only = head.method == Method::HEAD;
        if let Some(io) = self.checkout() {
            match self.exchange(io, &wire, &mut stream, chunked, head_only).await {
                Ok(resp) => return Ok(resp),
                Err(f) if f.unsent || (f.no_answer && replayable && idempotent(&head.method)) => {}
                Err(f) => return Err(f.error),
            }
        }
        let io = self.connect().await?;
        self.exchange(io, &wire, &mut stream, chunked, head_only).await.map_err(|f| f.error)
    }

    /// Writes the request, reads the response head.
    async fn exchange(
        &self,
        mut io: Io,
        wire: &[u8],
        stream: &mut Option<Body>,
        chunked: bool,
        head_only: bool,
    ) -> Result<Response<UpstreamBody>, Failed> {
        // A failed write of the head means the upstream read none of it (the socket was
        // closed before or as it was written): always safe to send again.
        io.write_all(wire).await.map_err(|e| Failed { error: e.into(), unsent: true, no_answer: true })?;
        if let Some(body) = stream.take() {
            write_body(&mut io, body, chunked).await.map_err(|e| Failed::new(e, false))?;
        }
        io.flush().await.map_err(|e| Failed::new(e.into(), false))?;
        let mut buf = BytesMut::with_capacity(8 * 1024);
        let Head { resp, framing, reusable } = read_head(&mut io, &mut buf, head_only).await?;
        let mut body = UpstreamBody { io: Some(io), buf, framing, reusable, home: Some(self.pool().clone()) };
        if body.framing.is_done() {
            body.finish();
        }
        Ok(resp.map(|()| body))
    }
}

/// Whether an idle connection is still usable: nothing to read and not closed. Costs no
/// system call when the runtime has seen no readiness on the socket since its last read.
fn quiet(io: &mut Io) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let mut byte = [0u8; 1];
    let mut rb = ReadBuf::new(&mut byte);
    matches!(Pin::new(io).poll_read(&mut cx, &mut rb), Poll::Pending)
}

/// Methods whose requests carry a body by definition: always announce its length.
fn expects_body(m: &Method) -> bool {
    *m == Method::POST || *m == Method::PUT || *m == Method::PATCH
}

/// RFC 9110 section 9.2.2.
fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// How a request body is announced to the upstream.
enum BodyFraming {
    /// No body and no framing header (a GET, say).
    None,
    Length(u64),
    Chunked,
}

/// The request line and headers; the gateway decides the framing, so the device's own
/// framing headers are not copied.
fn encode_head(head: &http::request::Parts, framing: BodyFraming, out: &mut Vec<u8>) {
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &head.headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        BodyFraming::None => {}
        BodyFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(n, out);
            out.extend_from_slice(b"\r\n");
        }
        BodyFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends the decimal digits of `n` without the formatting machinery.
fn push_decimal(mut n: u64, out: &mut Vec<u8>) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

/// Streams a device's request body to the upstream, chunk-encoded when its length is unknown.
async fn write_body(io: &mut Io, mut body: Body, chunked: bool) -> Result<(), UpstreamError> {
    let mut framed = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(UpstreamError::Body)?;
        let Ok(data) = frame.into_data() else { continue };
        if data.is_empty() {
            continue;
        }
        if chunked {
            framed.clear();
            framed.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            framed.extend_from_slice(&data);
            framed.extend_from_slice(b"\r\n");
            io.write_all(&framed).await?;
        } else {
            io.write_all(&data).await?;
        }
    }
    if chunked {
        io.write_all(b"0\r\n\r\n").await?;
    }
    Ok(())
}

/// Reads and parses the response head (skipping 1xx interim responses) into `buf`; what
/// follows the head stays in `buf`.
async fn read_head<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    head_only: bool,
) -> Result<Head, Failed> {
    let mut received = false;
    loop {
        if !buf.is_empty() {
            match parse_head(buf, head_only) {
                Ok(Some(parsed)) => return Ok(parsed),
                Ok(None) => {}
                Err(e) => return Err(Failed::new(UpstreamError::Protocol(e), false)),
            }
        }
        if buf.len() >= MAX_HEAD {
            let error = UpstreamError::Protocol("response head larger than 64 KiB");
            return Err(Failed::new(error, false));
        }
        buf.reserve(4096);
        match tokio::io::AsyncReadExt::read_buf(io, buf).await {
            Ok(0) if !received && buf.is_empty() => {
                let e = std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed before a response",
                );
                return Err(Failed::new(e.into(), true));
            }
            Ok(0) => {
                let error = UpstreamError::Protocol("connection closed in the response head");
                return Err(Failed::new(error, false));
            }
            Ok(_) => received = true,
            Err(e) => {
                return Err(Failed::new(e.into(), !received && buf.is_empty()));
            }
        }
    }
}

/// One complete response head at the start of `buf` (consumed), or `None` for more input.
/// Interim (1xx) responses are consumed and skipped.
pub(crate) fn parse_head(buf: &mut BytesMut, head_only: bool) -> Result<Option<Head>, &'static str> {
    loop {
        let mut fields = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let n = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err("more than 100 header fields"),
            Err(_) => return Err("malformed status line or header field"),
        };
        let code = parsed.code.ok_or("no status code")?;
        if code == 101 {
            return Err("protocol upgrade (101) is not supported");
        }
        if (100..200).contains(&code) {
            buf.advance(n);
            continue;
        }
        let status = StatusCode::from_u16(code).map_err(|_| "invalid status code")?;
        let http11 = parsed.version == Some(1);
        // Where each field sits in the head, so that the values can share the head's
        // bytes instead of each being copied into an allocation of its own.
        let base = buf.as_ptr() as usize;
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let count = parsed.headers.len();
        for (span, f) in spans.iter_mut().zip(parsed.headers.iter()) {
            let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
            *span = (at(f.name.as_bytes()), f.name.len() as u32, at(f.value), f.value.len() as u32);
        }
        let head = buf.split_to(n).freeze();
        let mut headers = HeaderMap::with_capacity(count);
        for &(ns, nl, vs, vl) in &spans[..count] {
            let name = &head[ns as usize..(ns + nl) as usize];
            let name = HeaderName::from_bytes(name).map_err(|_| "invalid header name")?;
            let value = HeaderValue::from_maybe_shared(head.slice(vs as usize..(vs + vl) as usize))
                .map_err(|_| "invalid header value")?;
            headers.append(name, value);
        }
        let (framing, framed) = framing(&headers, status, head_only)?;
        let keep_alive = http11 && !has_token(&headers, header::CONNECTION, "close");
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        *resp.version_mut() = if http11 { Version::HTTP_11 } else { Version::HTTP_10 };
        *resp.headers_mut() = headers;
        return Ok(Some(Head { resp, framing, reusable: keep_alive && framed }));
    }
}

/// How the response body is delimited (RFC 9112 section 6.3), and whether that framing
/// lets the connection carry another request.
fn framing(
    headers: &HeaderMap,
    status: StatusCode,
    head_only: bool,
) -> Result<(Framing, bool), &'static str> {
    if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Length(0), true));
    }
    let has_length = headers.contains_key(header::CONTENT_LENGTH);
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // The final coding decides; with a Content-Length beside it the connection
        // is not reused (the message may be an attempt at smuggling).
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|t| !t.is_empty());
        return Ok(match last {
            Some(t) if t.eq_ignore_ascii_case("chunked") => (Framing::Chunked(Chunk::Size), !has_length),
            _ => (Framing::Close, false),
        });
    }
    if has_length {
        let mut len = None;
        for v in &headers.get_all(header::CONTENT_LENGTH) {
            for part in v.to_str().map_err(|_| "invalid Content-Length")?.split(',') {
                let part = part.trim();
                if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                    return Err("invalid Content-Length");
                }
                let n: u64 = part.parse().map_err(|_| "invalid Content-Length")?;
                if len.is_some_and(|l| l != n) {
                    return Err("conflicting Content-Length values");
                }
                len = Some(n);
            }
        }
        return Ok((Framing::Length(len.unwrap_or(0)), true));
    }
    Ok((Framing::Close, false))
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) resp: Response<()>,
    pub(crate) framing: Framing,
    /// Whether the connection can carry another request once the body has been read.
    pub(crate) reusable: bool,
}

/// Where a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// This many bytes are left.
    Length(u64),
    /// Chunked transfer coding, in this state.
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Close,
    /// Read to the end.
    Done,
}

impl Framing {
    fn is_done(&self) -> bool {
        matches!(self, Framing::Length(0) | Framing::Done)
    }
}

/// The chunked decoder's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk with this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields (discarded, this many bytes so far) up to an empty line.
    Trailers(usize),
}

/// What one step of decoding produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    Data(Bytes),
    NeedMore,
    End,
}

/// Decodes the next piece of a chunked body from `buf`.
pub(crate) fn decode_chunk(state: &mut Chunk, buf: &mut BytesMut) -> Result<Decoded, &'static str> {
    loop {
        match *state {
            Chunk::Size => {
                let Some(end) = memchr(b'\n', buf) else {
                    return if buf.len() > MAX_CHUNK_LINE {
                        Err("chunk-size line too long")
                    } else {
                        Ok(Decoded::NeedMore)
                    };
                };
                if end == 0 || buf[end - 1] != b'\r' || end > MAX_CHUNK_LINE {
                    return Err("malformed chunk-size line");
                }
                let line = &buf[..end - 1];
                let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
                if digits == 0 || digits > 16 {
                    return Err("malformed chunk size");
                }
                // Only whitespace may come between the size and a chunk extension.
                let rest = &line[digits..];
                let ext = rest.iter().position(|&b| b != b' ' && b != b'\t').map(|i| rest[i]);
                if ext.is_some_and(|b| b != b';') {
                    return Err("malformed chunk size");
                }
                let size = line[..digits]
                    .iter()
                    .try_fold(0u64, |acc, &b| {
                        let d = (b as char).to_digit(16)? as u64;
                        acc.checked_mul(16)?.checked_add(d)
                    })
                    .ok_or("chunk size too large")?;
                buf.advance(end + 1);
                *state = if size == 0 { Chunk::Trailers(0) } else { Chunk::Data(size) };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let data = buf.split_to(n).freeze();
                let left = left - n as u64;
                *state = if left == 0 { Chunk::DataEnd } else { Chunk::Data(left) };
                return Ok(Decoded::Data(data));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Decoded::NeedMore);
                }
                if &buf[..2] != b"\r\n" {
                    return Err("chunk data not followed by CRLF");
                }
                buf.advance(2);
                *state = Chunk::Size;
            }
            Chunk::Trailers(seen) => {
                let Some(end) = memchr(b'\n', buf) else {
                    return if seen + buf.len() > MAX_TRAILERS {
                        Err("trailer section too large")
                    } else {
                        Ok(Decoded::NeedMore)
                    };
                };
                if end == 0 || buf[end - 1] != b'\r' {
                    return Err("malformed trailer line");
                }
                buf.advance(end + 1);
                if end == 1 {
                    return Ok(Decoded::End);
                }
                let seen = seen + end + 1;
                if seen > MAX_TRAILERS {
                    return Err("trailer section too large");
                }
                *state = Chunk::Trailers(seen);
            }
        }
    }
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

/// A response body read from the upstream connection as the device takes it; the
/// connection returns to its pool the moment the last byte has been read (if it can be
/// reused) and is closed if the body is dropped before that.
pub(crate) struct UpstreamBody {
    io: Option<Io>,
    /// Bytes read but not yet decoded.
    buf: BytesMut,
    framing: Framing,
    reusable: bool,
    home: Option<Pool>,
}

impl UpstreamBody {
    /// The body has ended: return the connection to its pool if it can carry another request.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        let io = self.io.take();
        let (Some(io), Some(pool)) = (io, self.home.take()) else { return };
        // Bytes after the end of the response were never asked for: do not reuse.
        if !self.reusable || !self.buf.is_empty() {
            return;
        }
        if let Ok(mut idle) = pool.lock() {
            if idle.len() >= MAX_IDLE {
                idle.retain(|c| c.since.elapsed() <= IDLE_TIMEOUT);
            }
            if idle.len() < MAX_IDLE {
                idle.push(Idle { io, since: Instant::now() });
            }
        }
    }

    /// Reads more from the connection into `buf`; `Ok(0)` is the end of the connection.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<std::io::Result<usize>> {
        let Some(io) = self.io.as_mut() else { return Poll::Ready(Ok(0)) };
        self.buf.reserve(want.clamp(4096, 64 * 1024));
        let n = ready!(tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut self.buf))?;
        Poll::Ready(Ok(n))
    }
}

fn truncated() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "upstream closed the connection mid-response")
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        loop {
            match this.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    if !this.buf.is_empty() {
                        let n = usize::try_from(left).unwrap_or(usize::MAX).min(this.buf.len());
                        let data = this.buf.split_to(n).freeze();
                        let left = left - n as u64;
                        this.framing = Framing::Length(left);
                        if left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    let want = usize::try_from(left).unwrap_or(usize::MAX);
                    if ready!(this.poll_fill(cx, want))? == 0 {
                        this.io = None;
                        return Poll::Ready(Some(Err(truncated())));
                    }
                }
                Framing::Chunked(mut state) => {
                    let step = decode_chunk(&mut state, &mut this.buf);
                    this.framing = Framing::Chunked(state);
                    match step {
                        Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                        Ok(Decoded::End) => {
                            this.finish();
                            return Poll::Ready(None);
                        }
                        Ok(Decoded::NeedMore) => {
                            if ready!(this.poll_fill(cx, 16 * 1024))? == 0 {
                                this.io = None;
                                return Poll::Ready(Some(Err(truncated())));
                            }
                        }
                        Err(e) => {
                            this.io = None;
                            this.framing = Framing::Done;
                            return Poll::Ready(Some(Err(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                e,
                            ))));
                        }
                    }
                }
                Framing::Close => {
                    if !this.buf.is_empty() {
                        let data = this.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if ready!(this.poll_fill(cx, 16 * 1024))? == 0 {
                        this.reusable = false;
                        this.finish();
                        return Poll::Ready(None);
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// Reads `data` as an upstream's bytes, fed `step` bytes at a time: the response head,
/// then the body as its framing says. Returns the body's length or why the bytes were
/// refused. For the `upstream_response` fuzz target; never panics.
pub fn parse_response_for_fuzzing(data: &[u8], step: usize, head_only: bool) -> Result<usize, &'static str> {
    let step = step.max(1);
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut feed = |buf: &mut BytesMut| {
        if fed >= data.len() {
            return false;
        }
        let n = step.min(data.len() - fed);
        buf.extend_from_slice(&data[fed..fed + n]);
        fed += n;
        true
    };
    let head = loop {
        if let Some(head) = parse_head(&mut buf, head_only)? {
            break head;
        }
        if buf.len() >= MAX_HEAD {
            return Err("response head larger than 64 KiB");
        }
        if !feed(&mut buf) {
            return Err("input ended in the response head");
        }
    };
    let mut body = 0usize;
    match head.framing {
        Framing::Chunked(mut state) => loop {
            match decode_chunk(&mut state, &mut buf)? {
                Decoded::Data(d) => body += d.len(),
                Decoded::End => break,
                Decoded::NeedMore => {
                    if !feed(&mut buf) {
                        return Err("input ended in the body");
                    }
                }
            }
        },
        Framing::Length(n) => {
            while feed(&mut buf) {}
            body = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
        }
        Framing::Close | Framing::Done => {
            while feed(&mut buf) {}
            body = buf.len();
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Parsed = Result<Option<(Response<()>, Framing, bool)>, &'static str>;

    fn head(raw: &str) -> Parsed {
        parse_head(&mut BytesMut::from(raw), false).map(|h| h.map(|h| (h.resp, h.framing, h.reusable)))
    }

    #[test]
    fn response_heads_and_their_framing() {
        let (r, f, reuse) = head("HTTP/1.1 200 OK\r\nContent-Length: 12\r\nX-A: b\r\n\r\n").unwrap().unwrap();
        assert_eq!((r.status(), f, reuse), (StatusCode::OK, Framing::Length(12), true));
        assert_eq!(r.headers()["x-a"], "b");
        let (_, f, reuse) =
            head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").unwrap().unwrap();
        assert_eq!((f, reuse), (Framing::Chunked(Chunk::Size), true));
        let (_, f, reuse) =
            head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!((f, reuse), (Framing::Chunked(Chunk::Size), false), "TE beside CL: never reused");
        let (_, f, reuse) = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n").unwrap().unwrap();
        assert_eq!((f, reuse), (Framing::Close, false));
        let (_, f, reuse) = head("HTTP/1.1 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!((f, reuse), (Framing::Close, false));
        let (_, f, reuse) =
            head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n").unwrap().unwrap();
        assert_eq!((f, reuse), (Framing::Length(3), false));
        let (_, _, reuse) = head("HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n").unwrap().unwrap();
        assert!(!reuse, "HTTP/1.0: closed after the response");
        let (r, f, _) =
            head("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n").unwrap().unwrap();
        assert_eq!((r.status(), f), (StatusCode::NO_CONTENT, Framing::Length(0)));
        let h = parse_head(&mut BytesMut::from("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"), true);
        assert_eq!(h.unwrap().unwrap().framing, Framing::Length(0), "a HEAD response has no body");
        assert_eq!(head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n").unwrap().map(|_| ()), None);
        let (_, f, _) = head("HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\n\r\n").unwrap().unwrap();
        assert_eq!(f, Framing::Length(7));
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 8\r\n\r\n").unwrap_err(),
            "conflicting Content-Length values"
        );
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nContent-Length: +7\r\n\r\n").unwrap_err(),
            "invalid Content-Length"
        );
        assert_eq!(
            head("HTTP/1.1 101 Switching Protocols\r\n\r\n").unwrap_err(),
            "protocol upgrade (101) is not supported"
        );
        assert_eq!(head("garbage\r\n\r\n").unwrap_err(), "malformed status line or header field");
    }

    fn dechunk(raw: &[u8], step: usize) -> Result<(Vec<u8>, usize), &'static str> {
        let mut state = Chunk::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match decode_chunk(&mut state, &mut buf)? {
                Decoded::Data(d) => out.extend_from_slice(&d),
                Decoded::End => return Ok((out, buf.len())),
                Decoded::NeedMore => {
                    if fed == raw.len() {
                        return Err("input ended");
                    }
                    let n = step.min(raw.len() - fed);
                    buf.extend_from_slice(&raw[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_sizes() {
        let raw = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, 64] {
            let (body, left) = dechunk(raw, step).unwrap();
            assert_eq!(body, b"hello, world", "step {step}");
            assert!(left <= 4, "bytes after the body stay in the buffer");
        }
        assert_eq!(dechunk(b"A\r\n0123456789\r\n0\r\n\r\n", 5).unwrap().0, b"0123456789");
        assert_eq!(dechunk(b"5\r\nhelloXY0\r\n\r\n", 64).unwrap_err(), "chunk data not followed by CRLF");
        assert_eq!(dechunk(b"zz\r\n", 64).unwrap_err(), "malformed chunk size");
        assert_eq!(dechunk(b"5 x\r\nhello\r\n", 64).unwrap_err(), "malformed chunk size");
        assert_eq!(dechunk(b"5\nhello\r\n", 64).unwrap_err(), "malformed chunk-size line");
        assert_eq!(dechunk(b"11111111111111111\r\n", 64).unwrap_err(), "malformed chunk size");
        assert_eq!(dechunk(&[b'1'; 5000], 64).unwrap_err(), "chunk-size line too long");
        assert_eq!(dechunk(b"FFFFFFFFFFFFFFFF\r\nab", 64).unwrap_err(), "input ended");
    }
}
