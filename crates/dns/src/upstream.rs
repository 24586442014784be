//! Forwarding to plain DNS upstreams over UDP (TCP when the answer is truncated), each
//! tried in turn with its own deadline until one answers.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// Why no upstream answered.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// None configured.
    #[error("no upstream resolver configured")]
    NoUpstreams,
    /// Every upstream failed; the last failure.
    #[error("all upstream resolvers failed; last: {0}")]
    AllFailed(String),
}

/// The configured upstream resolvers.
#[derive(Debug, Clone)]
pub struct Upstreams {
    /// Tried in this order.
    pub servers: Vec<SocketAddr>,
    /// Deadline for one server's answer.
    pub timeout: Duration,
}

fn random_id() -> u16 {
    let mut b = [0u8; 2];
    // SystemRandom only fails if the OS has no randomness; a fixed id then still works
    // since answers are matched on the question and the socket as well.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u16::from_be_bytes(b)
}

impl Upstreams {
    /// Resolves `query` (recursion desired) through the first upstream that answers.
    pub async fn resolve(&self, query: &Query) -> Result<Message, UpstreamError> {
        if self.servers.is_empty() {
            return Err(UpstreamError::NoUpstreams);
        }
        let mut last = String::new();
        for server in &self.servers {
            match tokio::time::timeout(self.timeout, self.ask(*server, query)).await {
                Ok(Ok(m)) => return Ok(m),
                Ok(Err(e)) => last = format!("{server}: {e}"),
                Err(_) => last = format!("{server}: no answer within {} ms", self.timeout.as_millis()),
            }
            tracing::debug!(upstream = %server, error = %last, "upstream failed; trying the next");
        }
        Err(UpstreamError::AllFailed(last))
    }

    async fn ask(&self, server: SocketAddr, query: &Query) -> Result<Message, String> {
        let id = random_id();
        let mut req = Message::new(id, MessageType::Query, OpCode::Query);
        req.metadata.recursion_desired = true;
        req.add_query(query.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        req.set_edns(edns);
        let bytes = req.to_vec().map_err(|e| e.to_string())?;

        let bind: SocketAddr =
            if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().map_err(|_| "bind")?;
        let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
        sock.connect(server).await.map_err(|e| e.to_string())?;
        sock.send(&bytes).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = sock.recv(&mut buf).await.map_err(|e| e.to_string())?;
            let Ok(resp) = Message::from_vec(&buf[..n]) else { continue };
            if resp.metadata.id != id || resp.queries.first() != Some(query) {
                continue; // not ours: keep waiting (spoofing and stray answers)
            }
            if resp.metadata.truncation {
                return self.ask_tcp(server, &bytes, id).await;
            }
            return Ok(resp);
        }
    }

    async fn ask_tcp(&self, server: SocketAddr, bytes: &[u8], id: u16) -> Result<Message, String> {
        let mut s = TcpStream::connect(server).await.map_err(|e| e.to_string())?;
        let len = u16::try_from(bytes.len()).map_err(|_| "query too long")?;
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(bytes);
        s.write_all(&framed).await.map_err(|e| e.to_string())?;
        let n = s.read_u16().await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; usize::from(n)];
        s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        let resp = Message::from_vec(&buf).map_err(|e| e.to_string())?;
        if resp.metadata.id != id {
            return Err("answer id does not match".into());
        }
        Ok(resp)
    }
}
