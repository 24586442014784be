//! Pooled HTTP/1.1 connections to one upstream, one pool per device-port worker.
//!
//! A request, the upstream connection it uses and that connection's task stay on the
//! worker thread that accepted the device's connection. A connection goes back to its
//! pool when the response body has been read to the end; one whose response was cut
//! short is closed instead, since HTTP/1.1 cannot resynchronise it. A request that the
//! upstream never saw (a pooled connection closed under it) is retried once on a new
//! connection; any other failure is reported, never retried, since the request may
//! have had effects.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use http::{Request, Response, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::ServiceExt;

/// Idle connections kept per worker; more are closed when they come back.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a request did not get a response head from the upstream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// TCP connect or TLS handshake failed.
    #[error("connect: {0}")]
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The HTTP exchange failed.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

struct Idle {
    sender: SendRequest<Body>,
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

impl Upstream {
    pub(crate) fn new(connector: HttpsConnector<HttpConnector>, target: Uri, workers: usize) -> Self {
        Self { connector, target, pools: (0..workers.max(1)).map(|_| Pool::default()).collect() }
    }

    fn pool(&self) -> &Pool {
        &self.pools[crate::listener::worker_index() % self.pools.len()]
    }

    /// An idle connection ready for a request, most recently used first.
    fn checkout(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.pool().lock().ok()?;
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let c = &idle[i];
            if c.sender.is_closed() || c.since.elapsed() > IDLE_TIMEOUT {
                idle.swap_remove(i);
            } else if c.sender.is_ready() {
                return Some(idle.swap_remove(i).sender);
            }
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<Body>, UpstreamError> {
        let io = self.connector.clone().oneshot(self.target.clone()).await.map_err(UpstreamError::Connect)?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new().handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with error");
            }
        });
        Ok(sender)
    }

    /// Sends `req` (origin-form URI, `Host` set) on a pooled or new connection.
    pub(crate) async fn send(&self, mut req: Request<Body>) -> Result<Response<PooledBody>, UpstreamError> {
        if let Some(mut sender) = self.checkout() {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.wrap(resp, sender)),
                Err(mut e) => match e.take_message() {
                    // Never written: the connection closed while idle. Try a new one.
                    Some(unsent) => req = unsent,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        let mut sender = self.connect().await?;
        let resp = sender.send_request(req).await?;
        Ok(self.wrap(resp, sender))
    }

    fn wrap(&self, resp: Response<Incoming>, sender: SendRequest<Body>) -> Response<PooledBody> {
        let pool = self.pool().clone();
        resp.map(|inner| PooledBody { inner, ended: false, home: Some((sender, pool)) })
    }
}

/// A response body that returns its connection to the pool once read to the end.
pub(crate) struct PooledBody {
    inner: Incoming,
    /// The body said it had no more frames (a chunked body never reports
    /// `is_end_stream`, so this is tracked here).
    ended: bool,
    home: Option<(SendRequest<Body>, Pool)>,
}

impl HttpBody for PooledBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Only a connection whose response was read completely can carry another request.
        if !(self.ended || self.inner.is_end_stream()) {
            return;
        }
        if let Some((sender, pool)) = self.home.take()
            && !sender.is_closed()
            && let Ok(mut idle) = pool.lock()
        {
            if idle.len() >= MAX_IDLE {
                idle.retain(|c| !c.sender.is_closed() && c.since.elapsed() <= IDLE_TIMEOUT);
            }
            if idle.len() < MAX_IDLE {
                idle.push(Idle { sender, since: Instant::now() });
            }
        }
    }
}
