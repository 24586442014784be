//! The agent's side of firmware updates: the updater of `portcullis-firmware` over this
//! device's mTLS identity, one keep-alive connection per run.

use std::path::Path;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, header};
use http_body_util::{BodyExt, BodyStream, Full};
use hyper::client::conn::http1::SendRequest;
use portcullis_client::updater::{Fetched, Transport};
use tokio::sync::Mutex;

use crate::{AgentDir, Error, EstClient};

/// `/firmware/` over the device's certificate.
pub struct MtlsTransport {
    client: EstClient,
    conn: Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl std::fmt::Debug for MtlsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MtlsTransport").field("client", &self.client).finish_non_exhaustive()
    }
}

impl MtlsTransport {
    /// A transport presenting the identity stored in the agent directory `dir`.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let agent = AgentDir::open(dir)?;
        let status = agent.status()?;
        let identity = agent.identity_pem()?;
        let client = EstClient::new(&status.server, &agent.ca_pem()?, Some(identity))?;
        Ok(Self::new(client))
    }

    /// A transport over `client` (which must carry a client certificate).
    pub fn new(client: EstClient) -> Self {
        Self { client, conn: Mutex::new(None) }
    }

    async fn send(
        &self,
        req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, String> {
        let mut slot = self.conn.lock().await;
        for attempt in 0..2 {
            let mut sender = match slot.take() {
                Some(s) if !s.is_closed() => s,
                _ => self.client.connect().await.map_err(|e| e.to_string())?,
            };
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.send_request(req.clone()).await {
                Ok(resp) => {
                    *slot = Some(sender);
                    return Ok(resp);
                }
                // A kept-alive connection the server closed meanwhile: once more on a new one.
                Err(e) if attempt == 0 && (e.is_canceled() || e.is_closed() || e.is_incomplete_message()) => {
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Err("connection closed".into())
    }
}

impl Transport for MtlsTransport {
    async fn get(&self, path: &str, offset: u64) -> Result<Fetched, String> {
        let mut req = self.client.request(Method::GET, &format!("/firmware/{path}"));
        if offset > 0 {
            req = req.header(header::RANGE, format!("bytes={offset}-"));
        }
        let req = req.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
        let resp = self.send(req).await?;
        let status = resp.status().as_u16();
        let body = BodyStream::new(resp.into_body()).filter_map(|frame| async move {
            match frame {
                Ok(f) => f.into_data().ok().map(Ok),
                Err(e) => Some(Err(e.to_string())),
            }
        });
        Ok(Fetched { status, body: Box::pin(body) })
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> Result<(u16, serde_json::Value), String> {
        let req = self
            .client
            .request(Method::POST, &format!("/firmware/{path}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let resp = self.send(req).await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        let value = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Ok((status, value))
    }
}
