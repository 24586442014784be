//! Queries to a stream upstream (DNS over TCP or TLS) pipelined on one kept-alive
//! connection, matched to their answers by message id (RFC 7766 section 6.2.1.1).
//!
//! One task per connection owns the stream: it writes queries as callers hand them over
//! and routes every answer to the caller waiting for its id. A caller that gives up (its
//! deadline passed, its client left) removes its id, and an answer that comes later is
//! dropped unread: the stream can never fall one answer behind. Any read or write error,
//! or end of stream, closes the connection and fails every query still waiting on it; the
//! next query opens a new one.
//!
//! An upstream that answers in order can still hold every later query behind one slow
//! name. So when a query times out on a connection that has given no answer at all since
//! that query was sent, the connection is retired: queries already on it keep waiting
//! for their answers, new ones go to a fresh connection. A connection younger than the
//! deadline is never retired, so an upstream that stalls everything costs at most one
//! new connection per deadline.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// Most queries waiting for an answer on one connection.
const MAX_PENDING: usize = 1_024;
/// Queries handed to the writer but not yet written.
const QUEUE: usize = 256;

/// A byte stream to an upstream.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

struct Waiting {
    answer: oneshot::Sender<Vec<u8>>,
    /// Answers the connection had received when this query was sent.
    answers_before: u64,
}

struct Conn {
    queue: mpsc::Sender<Vec<u8>>,
    waiting: Mutex<HashMap<u16, Waiting>>,
    /// Closed or retired: no new queries.
    retired: AtomicBool,
    answers: AtomicU64,
    opened: Instant,
}

impl Conn {
    fn usable(&self) -> bool {
        !self.retired.load(Ordering::Acquire) && !self.queue.is_closed()
    }

    fn fail_all(&self) {
        self.retired.store(true, Ordering::Release);
        if let Ok(mut w) = self.waiting.lock() {
            w.clear(); // dropping the senders fails their receivers
        }
    }
}

/// One upstream's pipelined connection.
#[derive(Default)]
pub struct Pipeline {
    /// The connection in use. The async lock is held only while one is being opened, so
    /// callers queue behind one handshake instead of each opening their own.
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pipeline")
    }
}

/// Takes a query's id out of the waiting table when the query ends, however it ends.
struct Registered<'a> {
    conn: &'a Arc<Conn>,
    id: u16,
    deadline: Duration,
    answered: bool,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let Ok(mut w) = self.conn.waiting.lock() else { return };
        let Some(me) = w.remove(&self.id) else { return };
        drop(w);
        if !self.answered
            && self.conn.answers.load(Ordering::Acquire) == me.answers_before
            && self.conn.opened.elapsed() >= self.deadline
        {
            // No answer at all since we asked: an upstream stuck on our name (or on
            // the stream). Later queries go to a fresh connection.
            self.conn.retired.store(true, Ordering::Release);
        }
    }
}

impl Pipeline {
    /// Sends `query` (its first two bytes, the id, are replaced) and waits for the
    /// answer with the same id. `connect` opens a new stream when there is none usable.
    /// The caller bounds the whole exchange; `deadline` is that bound (it decides when a
    /// silent connection is retired). Returns the answer and whether the connection was
    /// opened for it.
    pub(crate) async fn exchange<F, Fut>(
        &self,
        query: &[u8],
        deadline: Duration,
        connect: F,
    ) -> Result<Vec<u8>, String>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Box<dyn Stream>, String>>,
    {
        // A connection that was already open may have been closed by the upstream an
        // instant ago: then one more try, on a new connection.
        for attempt in 0..2 {
            let (conn, fresh) = self.connection(&connect).await?;
            match Self::ask(&conn, query, deadline).await {
                Ok(answer) => return Ok(answer),
                Err(e) if fresh || attempt == 1 => return Err(e),
                Err(_) => continue,
            }
        }
        Err("upstream connection closed".into())
    }

    async fn connection<F, Fut>(&self, connect: &F) -> Result<(Arc<Conn>, bool), String>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Box<dyn Stream>, String>>,
    {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref()
            && c.usable()
        {
            return Ok((c.clone(), false));
        }
        *slot = None;
        let stream = connect().await?;
        let (queue, rx) = mpsc::channel(QUEUE);
        let conn = Arc::new(Conn {
            queue,
            waiting: Mutex::default(),
            retired: AtomicBool::new(false),
            answers: AtomicU64::new(0),
            opened: Instant::now(),
        });
        tokio::spawn(run(conn.clone(), stream, rx));
        *slot = Some(conn.clone());
        Ok((conn, true))
    }

    async fn ask(conn: &Arc<Conn>, query: &[u8], deadline: Duration) -> Result<Vec<u8>, String> {
        let len = u16::try_from(query.len()).map_err(|_| "query too long")?;
        if query.len() < 12 {
            return Err("query too short".into());
        }
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut w = conn.waiting.lock().map_err(|_| "upstream state poisoned")?;
            if w.len() >= MAX_PENDING {
                return Err("too many queries waiting on the upstream connection".into());
            }
            let mut id = crate::upstream::random_id();
            while w.contains_key(&id) {
                id = id.wrapping_add(1);
            }
            w.insert(id, Waiting { answer: tx, answers_before: conn.answers.load(Ordering::Acquire) });
            id
        };
        let mut registered = Registered { conn, id, deadline, answered: false };
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&id.to_be_bytes());
        framed.extend_from_slice(&query[2..]);
        conn.queue.send(framed).await.map_err(|_| "upstream connection closed".to_owned())?;
        let answer = rx.await.map_err(|_| "upstream connection closed".to_owned())?;
        registered.answered = true;
        if answer.get(..2) != Some(&id.to_be_bytes()[..]) {
            return Err("answer routed to the wrong query".into()); // cannot happen: routed by id
        }
        Ok(answer)
    }
}

/// The connection's task: writes queued queries, hands each answer to its waiter, and
/// ends on any error, at end of stream, or once retired with nobody waiting.
async fn run(conn: Arc<Conn>, stream: Box<dyn Stream>, mut queue: mpsc::Receiver<Vec<u8>>) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = async {
        while let Some(framed) = queue.recv().await {
            wr.write_all(&framed).await?;
            wr.flush().await?;
        }
        Ok::<_, io::Error>(())
    };
    let reader = async {
        loop {
            let n = match rd.read_u16().await {
                Ok(n) => n,
                Err(e) => return e,
            };
            let mut buf = vec![0u8; usize::from(n)];
            if let Err(e) = rd.read_exact(&mut buf).await {
                return e;
            }
            conn.answers.fetch_add(1, Ordering::AcqRel);
            if buf.len() < 2 {
                continue;
            }
            let id = u16::from_be_bytes([buf[0], buf[1]]);
            let waiter = conn.waiting.lock().ok().and_then(|mut w| w.remove(&id));
            // No waiter: the query gave up (a late answer) or the upstream made the id
            // up. Either way the answer is dropped and the stream stays in step.
            if let Some(w) = waiter {
                let _ = w.answer.send(buf);
            }
        }
    };
    let drained = async {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            if conn.retired.load(Ordering::Acquire)
                && conn.waiting.lock().map(|w| w.is_empty()).unwrap_or(true)
            {
                return;
            }
        }
    };
    tokio::select! {
        r = writer => if let Err(e) = r { tracing::debug!(error = %e, "upstream stream write failed") },
        e = reader => tracing::debug!(error = %e, "upstream stream closed"),
        _ = drained => {}
    }
    conn.fail_all();
}

/// Fuzzing entry: `upstream` is everything a hostile stream upstream sends back while
/// three queries are pipelined to it. Whatever the bytes, nothing panics or hangs, and
/// a query only ever receives a frame that carries its own id.
#[doc(hidden)]
pub fn exchange_for_fuzzing(upstream: &[u8]) {
    use tokio::io::AsyncWriteExt;
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_time().build() else {
        return;
    };
    let data = upstream.to_vec();
    rt.block_on(async move {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        // The upstream says its piece and hangs up: every query still waiting then fails
        // at once, so a run never waits for a deadline.
        tokio::spawn(async move {
            let _ = server.write_all(&data).await;
            tokio::task::yield_now().await;
            drop(server);
        });
        let client = Mutex::new(Some(client));
        let connect = || {
            let taken = client.lock().ok().and_then(|mut c| c.take());
            async move { taken.map(|c| Box::new(c) as Box<dyn Stream>).ok_or_else(|| "closed".to_owned()) }
        };
        let pipe = Pipeline::default();
        let mut query = vec![0u8; 29];
        query[5] = 1; // one question: an empty name, type A, class IN
        query[26] = 1;
        query[28] = 1;
        let asks = (0..3).map(|_| {
            tokio::time::timeout(
                Duration::from_secs(1),
                pipe.exchange(&query, Duration::from_secs(1), &connect),
            )
        });
        for answer in futures_join(asks).await.into_iter().flatten().flatten() {
            assert!(answer.len() >= 2, "an answer without an id was delivered");
        }
    });
}

/// Runs the futures concurrently, returns their outputs in order.
async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futs.map(Box::pin).collect();
    let mut out = Vec::with_capacity(handles.len());
    let mut pending: Vec<_> = handles.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await;
    out.extend(results.into_iter().flatten());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_upstream_bytes_never_panic_or_hang() {
        for bytes in [
            &b""[..],
            &[0, 0],
            &[0, 1, 0xAB],
            &[0, 2, 0x12, 0x34, 0, 5, 1, 2],
            &[0xFF, 0xFF, 1, 2, 3],
            &[0, 12, 0, 0, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0, 0, 12],
        ] {
            exchange_for_fuzzing(bytes);
        }
    }
}
