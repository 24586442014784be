//! HTTP/2 frame guard: the limits hyper's HTTP/2 server does not have, enforced on the
//! bytes between TLS and hyper.
//!
//! The `h2` crate under hyper already stops rapid reset (pending-accept resets),
//! CONTINUATION floods, header lists far past `max_header_list_size` (HPACK bombs),
//! streams refused over `max_concurrent_streams` (local error resets) and floods of
//! small DATA frames, each with `GOAWAY(ENHANCE_YOUR_CALM)`. What it lets through costs
//! the server CPU, memory or a held upstream without limit:
//!
//! - **control-frame floods**: SETTINGS, PING, PRIORITY and unknown frame types each
//!   demand work (and an ACK for the first two) yet carry no request. They share one
//!   token bucket per connection ([`H2Limits::control_frames`]).
//! - **WINDOW_UPDATE floods**: a client sends WINDOW_UPDATE in answer to data it receives,
//!   so their number is bounded by what we sent (Envoy's rule): at most
//!   `100 + 2 × streams + window_updates_per_data_frame × DATA frames sent`.
//! - **stalls**: a client that never reads (the socket's buffers fill and writes stop) or
//!   that never opens its flow-control window (a response started and cannot send a
//!   byte) holds its streams, their upstream responses and its connection forever. Either
//!   lasting [`H2Limits::send_timeout`] ends the connection (nginx's `send_timeout`).
//!
//! The guard reads frame headers only (9 bytes each, payloads skipped, never decoded),
//! inbound to enforce the limits and outbound to see stream progress and to count every
//! `GOAWAY` the server sends, hyper's and its own, by error code and cause
//! (`portcullis_device_http2_goaway_total`). On a violation it writes its own
//! `GOAWAY(ENHANCE_YOUR_CALM)` at the next outbound frame boundary, so it never splits a
//! frame hyper is writing, then fails the connection's I/O, which ends it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use portcullis_net::Rate;

/// HTTP/2 limits of the device port (`[device.http2]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct H2Limits {
    /// Streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// Largest decoded request header list in bytes (SETTINGS_MAX_HEADER_LIST_SIZE);
    /// a larger one gets 431, a list several times larger (an HPACK bomb) GOAWAY.
    pub max_header_list_size: u32,
    /// Streams opened and reset by the client before we accepted them (rapid reset,
    /// CVE-2023-44487); beyond it GOAWAY.
    pub max_pending_accept_reset_streams: usize,
    /// Streams we reset for the client's errors (more streams than advertised, headers
    /// too large, malformed requests) over the connection's life; beyond it GOAWAY.
    pub max_local_error_reset_streams: usize,
    /// SETTINGS, PING, PRIORITY and unknown frames per second, with a burst.
    pub control_frames: Rate,
    /// WINDOW_UPDATE frames allowed per DATA frame sent (on top of a fixed allowance).
    pub window_updates_per_data_frame: u32,
    /// Longest a started response may go without sending a DATA frame, or a write may
    /// wait for the client to read.
    pub send_timeout: Duration,
}

impl Default for H2Limits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 128,
            max_header_list_size: 64 * 1024,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 256,
            control_frames: Rate { per_second: 100.0, burst: 200 },
            window_updates_per_data_frame: 10,
            send_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct GoawayLabels {
    code: &'static str,
    cause: &'static str,
}

/// `GOAWAY` frames sent on the device port, by error code and cause.
#[derive(Debug, Clone, Default)]
pub struct H2Metrics {
    goaway: Family<GoawayLabels, Counter>,
}

impl H2Metrics {
    /// Registers the family in `registry` (under the caller's prefix).
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "device_http2_goaway",
            "HTTP/2 connections ended by the device port with GOAWAY, by error code and cause \
             (rapid_reset, continuation_flood, header_list_too_large, refused_streams, \
             small_data_frames, control_frame_flood, window_update_flood, send_stall, shutdown; write_stall with code unsent: the client stopped \
             reading and could be sent nothing more)",
            self.goaway.clone(),
        );
    }

    fn count(&self, code: u32, cause: &'static str) {
        self.goaway.get_or_create(&GoawayLabels { code: code_name(code), cause }).inc();
    }
}

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;

const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The client connection preface (RFC 9113 §3.4), before the first frame.
const PREFACE_LEN: usize = 24;

/// How much of an outbound GOAWAY payload is read: last stream, code, start of debug data.
const GOAWAY_CAPTURE: usize = 8 + 32;

fn code_name(code: u32) -> &'static str {
    match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => "unknown",
    }
}

/// The cause of a GOAWAY hyper sent, from its code and the debug data `h2` puts in it.
fn cause_of(code: u32, debug: &[u8]) -> &'static str {
    match (code, debug) {
        (0, _) => "shutdown",
        (_, b"too_many_resets") => "rapid_reset",
        (_, b"too_many_continuations") => "continuation_flood",
        (_, b"header_list_way_too_large") => "header_list_too_large",
        (_, b"too_many_internal_resets") => "refused_streams",
        (_, b"too_many_data_frames") => "small_data_frames",
        (0x1, _) => "protocol_error",
        (0x9, _) => "compression_error",
        (0x3, _) => "flow_control_error",
        (0x6, _) => "frame_size_error",
        _ => "other",
    }
}

/// A frame header as it arrives or leaves.
#[derive(Debug, Clone, Copy)]
struct Head {
    kind: u8,
    flags: u8,
    stream: u32,
}

/// Finds frame boundaries in a byte stream fed in arbitrary pieces.
#[derive(Debug)]
struct Scan {
    /// Preface bytes still to skip (inbound only).
    preface: usize,
    head: [u8; 9],
    head_len: usize,
    /// Payload bytes of the current frame still to come.
    payload: usize,
    current: Option<Head>,
    /// The start of an outbound GOAWAY payload.
    captured: Vec<u8>,
}

impl Scan {
    fn new(preface: usize) -> Self {
        Self { preface, head: [0; 9], head_len: 0, payload: 0, current: None, captured: Vec::new() }
    }

    /// Between two frames: nothing of a frame written yet, or all of it.
    fn at_boundary(&self) -> bool {
        self.preface == 0 && self.head_len == 0 && self.payload == 0
    }

    /// Bytes to the end of the current frame header or payload (0 at a boundary).
    fn to_boundary(&self) -> usize {
        if self.head_len > 0 { 9 - self.head_len } else { self.payload + self.preface }
    }

    /// Feeds `bytes`; `on_head` sees each frame header, `on_goaway` each complete GOAWAY
    /// capture (code, debug data prefix).
    fn feed(
        &mut self,
        mut bytes: &[u8],
        mut on_head: impl FnMut(Head, usize),
        mut on_goaway: impl FnMut(&[u8]),
    ) {
        while !bytes.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(bytes.len());
                self.preface -= n;
                bytes = &bytes[n..];
                continue;
            }
            if self.payload > 0 {
                let n = self.payload.min(bytes.len());
                if self.current.is_some_and(|h| h.kind == GOAWAY) && self.captured.len() < GOAWAY_CAPTURE {
                    let take = n.min(GOAWAY_CAPTURE - self.captured.len());
                    self.captured.extend_from_slice(&bytes[..take]);
                }
                self.payload -= n;
                bytes = &bytes[n..];
                if self.payload == 0 {
                    self.frame_done(&mut on_goaway);
                }
                continue;
            }
            let n = (9 - self.head_len).min(bytes.len());
            self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
            self.head_len += n;
            bytes = &bytes[n..];
            if self.head_len == 9 {
                self.head_len = 0;
                let h = &self.head;
                let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                let head = Head {
                    kind: h[3],
                    flags: h[4],
                    stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
                };
                self.current = Some(head);
                self.payload = len;
                self.captured.clear();
                on_head(head, len);
                if len == 0 {
                    self.frame_done(&mut on_goaway);
                }
            }
        }
    }

    fn frame_done(&mut self, on_goaway: &mut impl FnMut(&[u8])) {
        if self.current.take().is_some_and(|h| h.kind == GOAWAY) {
            on_goaway(&self.captured);
        }
    }
}

/// Why the guard ends a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Violation {
    ControlFlood,
    WindowUpdateFlood,
    /// A response went `send_timeout` without a DATA frame (the client keeps its
    /// flow-control window shut).
    SendStall,
    /// A write waited `send_timeout` for the client to read.
    WriteStall,
}

impl Violation {
    fn cause(self) -> &'static str {
        match self {
            Self::ControlFlood => "control_frame_flood",
            Self::WindowUpdateFlood => "window_update_flood",
            Self::SendStall => "send_stall",
            Self::WriteStall => "write_stall",
        }
    }
}

/// The guard's GOAWAY on its way out, then the error that ends the connection.
#[derive(Debug)]
struct Closing {
    why: Violation,
    frame: Vec<u8>,
    written: usize,
}

/// The device port's HTTP/2 connection I/O, guarded. See the module docs.
#[derive(Debug)]
pub struct H2Guard<S> {
    inner: S,
    limits: H2Limits,
    metrics: H2Metrics,
    inbound: Scan,
    outbound: Scan,
    /// Control-frame tokens left and when they were last topped up.
    tokens: f64,
    refilled: Instant,
    streams_opened: u64,
    highest_stream: u32,
    window_updates: u64,
    data_frames_sent: u64,
    /// Streams whose response has started and not ended, each with the time of its
    /// last DATA frame (or of its response headers).
    responding: Vec<(u32, Instant)>,
    /// Since when a write has been waiting for the client to read.
    write_blocked: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
    closing: Option<Closing>,
}

/// Most response streams tracked at once; h2 refuses streams far before this.
const MAX_TRACKED: usize = 4096;

impl<S> H2Guard<S> {
    /// Guards `inner`, the server side of a connection that negotiated `h2`.
    pub fn new(inner: S, limits: H2Limits, metrics: H2Metrics) -> Self {
        let now = Instant::now();
        Self {
            inner,
            limits,
            metrics,
            inbound: Scan::new(PREFACE_LEN),
            outbound: Scan::new(0),
            tokens: f64::from(limits.control_frames.burst.max(1)),
            refilled: now,
            streams_opened: 0,
            highest_stream: 0,
            window_updates: 0,
            data_frames_sent: 0,
            responding: Vec::new(),
            write_blocked: None,
            timer: None,
            closing: None,
        }
    }

    fn take_control_token(&mut self) -> bool {
        let now = Instant::now();
        let rate = self.limits.control_frames;
        let burst = f64::from(rate.burst.max(1));
        self.tokens =
            (self.tokens + now.duration_since(self.refilled).as_secs_f64() * rate.per_second).min(burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Looks at the frames in `bytes`, just read from the client.
    fn inspect_inbound(&mut self, bytes: &[u8]) {
        let mut heads = Vec::new();
        self.inbound.feed(bytes, |h, _| heads.push(h), |_| {});
        for h in heads {
            if self.closing.is_some() {
                return;
            }
            let violation = match h.kind {
                HEADERS => {
                    if h.stream > self.highest_stream {
                        self.highest_stream = h.stream;
                        self.streams_opened += 1;
                    }
                    None
                }
                RST_STREAM => {
                    self.responding.retain(|&(s, _)| s != h.stream);
                    None
                }
                WINDOW_UPDATE => {
                    self.window_updates += 1;
                    let allowed = 100
                        + 2 * self.streams_opened
                        + u64::from(self.limits.window_updates_per_data_frame) * self.data_frames_sent;
                    (self.window_updates > allowed).then_some(Violation::WindowUpdateFlood)
                }
                SETTINGS | PING if h.flags & ACK != 0 => None,
                DATA | CONTINUATION | GOAWAY => None,
                // SETTINGS, PING, PRIORITY and frame types we do not know.
                _ => (!self.take_control_token()).then_some(Violation::ControlFlood),
            };
            if let Some(v) = violation {
                self.close(v);
            }
        }
    }

    /// Looks at the frames in `bytes`, just written to the client.
    fn inspect_outbound(&mut self, bytes: &[u8]) {
        let mut heads = Vec::new();
        let mut goaways = Vec::new();
        self.outbound.feed(
            bytes,
            |h, _| heads.push(h),
            |p| {
                let code = p.get(4..8).map_or(0, |c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                goaways.push((code, cause_of(code, p.get(8..).unwrap_or_default())));
            },
        );
        for h in heads {
            match h.kind {
                DATA => {
                    self.data_frames_sent += 1;
                    if h.flags & END_STREAM != 0 {
                        self.responding.retain(|&(s, _)| s != h.stream);
                    } else if let Some(r) = self.responding.iter_mut().find(|(s, _)| *s == h.stream) {
                        r.1 = Instant::now();
                    }
                }
                HEADERS if h.flags & END_STREAM != 0 => self.responding.retain(|&(s, _)| s != h.stream),
                HEADERS
                    if !self.responding.iter().any(|&(s, _)| s == h.stream)
                        && self.responding.len() < MAX_TRACKED =>
                {
                    let now = Instant::now();
                    self.responding.push((h.stream, now));
                    self.arm(now + self.limits.send_timeout);
                }
                RST_STREAM => self.responding.retain(|&(s, _)| s != h.stream),
                _ => {}
            }
        }
        for (code, cause) in goaways {
            self.metrics.count(code, cause);
        }
    }

    fn arm(&mut self, at: Instant) {
        if self.timer.is_none() {
            self.timer = Some(Box::pin(tokio::time::sleep_until(at.into())));
        }
    }

    fn close(&mut self, why: Violation) {
        if self.closing.is_some() {
            return;
        }
        tracing::info!(cause = why.cause(), "http2: connection ended with GOAWAY(ENHANCE_YOUR_CALM)");
        if why == Violation::WriteStall {
            self.metrics.goaway.get_or_create(&GoawayLabels { code: "unsent", cause: why.cause() }).inc();
        } else {
            self.metrics.count(ENHANCE_YOUR_CALM, why.cause());
        }
        let debug = why.cause().as_bytes();
        let mut frame = Vec::with_capacity(9 + 8 + debug.len());
        let len = 8 + debug.len();
        frame.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, GOAWAY, 0, 0, 0, 0, 0]);
        frame.extend_from_slice(&self.highest_stream.to_be_bytes());
        frame.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
        frame.extend_from_slice(debug);
        // A client that does not read cannot be sent anything more.
        if why == Violation::WriteStall {
            frame.clear();
        }
        self.closing = Some(Closing { why, frame, written: 0 });
    }

    /// Checks the stall deadlines when the timer fires; re-arms it for the next one.
    fn poll_timer(&mut self, cx: &mut Context<'_>) {
        let Some(timer) = self.timer.as_mut() else { return };
        if timer.as_mut().poll(cx).is_pending() {
            return;
        }
        self.timer = None;
        let now = Instant::now();
        let limit = self.limits.send_timeout;
        let mut next: Option<Instant> = None;
        if let Some(since) = self.write_blocked {
            if now.duration_since(since) >= limit {
                return self.close(Violation::WriteStall);
            }
            next = Some(since + limit);
        }
        if let Some(oldest) = self.responding.iter().map(|&(_, t)| t).min() {
            if now.duration_since(oldest) >= limit {
                // With writes waiting too, the client is not reading at all.
                let why =
                    if self.write_blocked.is_some() { Violation::WriteStall } else { Violation::SendStall };
                return self.close(why);
            }
            let at = oldest + limit;
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        if let Some(at) = next {
            self.arm(at);
            // Register the waker with the new timer.
            self.poll_timer(cx);
        }
    }
}

impl<S: AsyncWrite + Unpin> H2Guard<S> {
    /// Writes the guard's GOAWAY once hyper is between frames, then fails the I/O.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some(closing) = self.closing.as_mut() else {
            return Poll::Ready(io::Error::other("http2 guard: not closing"));
        };
        while closing.written < closing.frame.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &closing.frame[closing.written..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => break,
                Poll::Ready(Ok(n)) => closing.written += n,
                Poll::Pending => return Poll::Pending,
            }
        }
        if !closing.frame.is_empty() {
            let _ = ready!(Pin::new(&mut self.inner).poll_flush(cx));
        }
        Poll::Ready(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("http2 connection ended: {}", closing.why.cause()),
        ))
    }

    /// The inner stream cannot take a write: start (or check) the write-stall deadline;
    /// past it, end the connection.
    fn blocked<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let now = Instant::now();
        let since = *self.write_blocked.get_or_insert(now);
        self.arm(since + self.limits.send_timeout);
        self.poll_timer(cx);
        if self.closing.is_some() {
            return Poll::Ready(Err(ready!(self.poll_close(cx))));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for H2Guard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.poll_timer(cx);
        if this.closing.is_some() {
            if !this.outbound.at_boundary() {
                // hyper is in the middle of writing a frame and will finish it: the
                // GOAWAY goes out from poll_write.
                return Poll::Pending;
            }
            return Poll::Ready(Err(ready!(this.poll_close(cx))));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let filled = buf.filled();
        if filled.len() > before {
            this.inspect_inbound(&filled[before..]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for H2Guard<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let mut buf = buf;
        if this.closing.is_some() {
            if this.outbound.at_boundary() {
                return Poll::Ready(Err(ready!(this.poll_close(cx))));
            }
            // Finish the frame under way, nothing more.
            buf = &buf[..buf.len().min(this.outbound.to_boundary())];
        }
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.write_blocked = None;
                this.inspect_outbound(&buf[..n]);
                Poll::Ready(Ok(n))
            }
            Poll::Pending => this.blocked(cx),
            other => other,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.closing.is_some() {
            let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
            return self.poll_write(cx, first);
        }
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                this.write_blocked = None;
                let mut left = n;
                for b in bufs {
                    if left == 0 {
                        break;
                    }
                    let take = left.min(b.len());
                    this.inspect_outbound(&b[..take]);
                    left -= take;
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => this.blocked(cx),
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.blocked(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Drives a guard with `inbound` as what the client sends and `outbound` as what hyper
/// writes, both cut in pieces of `step` bytes and interleaved; for fuzzing (it must never
/// panic, whatever the bytes).
#[doc(hidden)]
pub fn guard_for_fuzzing(inbound: &[u8], outbound: &[u8], step: usize) {
    struct Mem {
        input: Vec<u8>,
        at: usize,
        step: usize,
    }
    impl AsyncRead for Mem {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = self.step.min(self.input.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.input[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }
    impl AsyncWrite for Mem {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len().min(self.step)))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_time().build() else { return };
    let step = step.max(1);
    rt.block_on(async {
        let limits = H2Limits {
            control_frames: Rate { per_second: 1.0, burst: 4 },
            send_timeout: Duration::from_millis(1),
            ..H2Limits::default()
        };
        let mem = Mem { input: inbound.to_vec(), at: 0, step };
        let mut guard = H2Guard::new(mem, limits, H2Metrics::default());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut out = outbound;
        let mut buf = [0u8; 4096];
        loop {
            let mut read = ReadBuf::new(&mut buf);
            let read_more = match Pin::new(&mut guard).poll_read(&mut cx, &mut read) {
                Poll::Ready(Ok(())) => !read.filled().is_empty(),
                _ => false,
            };
            let wrote = match Pin::new(&mut guard).poll_write(&mut cx, out) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    out = &out[n..];
                    true
                }
                _ => false,
            };
            if !read_more && !wrote {
                break;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn finds_frames_fed_a_byte_at_a_time_and_reads_goaway_causes() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(SETTINGS, 0, 0, &[0; 12]));
        bytes.extend(frame(HEADERS, 0x5, 1, &[0x82; 20]));
        let mut goaway = 3u32.to_be_bytes().to_vec();
        goaway.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
        goaway.extend_from_slice(b"too_many_resets");
        bytes.extend(frame(GOAWAY, 0, 0, &goaway));
        bytes.extend(frame(PING, ACK, 0, &[7; 8]));
        let mut scan = Scan::new(PREFACE_LEN);
        let mut heads = Vec::new();
        let mut causes = Vec::new();
        for b in &bytes {
            scan.feed(
                std::slice::from_ref(b),
                |h, len| heads.push((h.kind, h.flags, h.stream, len)),
                |p| {
                    let code = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
                    causes.push((code_name(code), cause_of(code, &p[8..])));
                },
            );
        }
        assert_eq!(
            heads,
            vec![(SETTINGS, 0, 0, 12), (HEADERS, 5, 1, 20), (GOAWAY, 0, 0, 23), (PING, 1, 0, 8)]
        );
        assert_eq!(causes, vec![("ENHANCE_YOUR_CALM", "rapid_reset")]);
        assert!(scan.at_boundary());
    }

    #[test]
    fn a_ping_flood_is_answered_with_goaway_at_a_frame_boundary() {
        let mut inbound = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        for _ in 0..10 {
            inbound.extend(frame(PING, 0, 0, &[0; 8]));
        }
        // hyper writing a DATA frame in pieces while the flood comes in.
        guard_for_fuzzing(&inbound, &frame(DATA, 0, 1, &[0; 100]), 7);
    }

    #[test]
    fn boundary_is_known_mid_header_and_mid_payload() {
        let mut scan = Scan::new(0);
        let f = frame(DATA, 0, 1, &[0; 100]);
        scan.feed(&f[..4], |_, _| {}, |_| {});
        assert_eq!(scan.to_boundary(), 5);
        scan.feed(&f[4..50], |_, _| {}, |_| {});
        assert_eq!(scan.to_boundary(), 59);
        scan.feed(&f[50..], |_, _| {}, |_| {});
        assert!(scan.at_boundary());
    }
}
