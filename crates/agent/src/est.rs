use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use portcullis_core::{DeviceId, Token};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::TlsConnector;

use crate::Error;

/// Failures talking EST.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EstError {
    /// The server URL is not `https://host[:port]`.
    #[error("invalid server URL {0:?}: expected https://host[:port]")]
    Url(String),
    /// The CA or identity files are unusable.
    #[error("invalid TLS material: {0}")]
    Tls(String),
    /// Connecting or the TLS handshake failed.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The HTTP exchange failed.
    #[error("HTTP exchange failed: {0}")]
    Http(String),
    /// The server refused.
    #[error("server refused ({status}): {detail}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The server's explanation.
        detail: String,
    },
    /// The server's answer was not a certs-only PKCS#7.
    #[error("malformed EST response: {0}")]
    Response(String),
}

/// An EST client that opens a fresh TLS connection per operation.
#[derive(Clone)]
pub struct EstClient {
    config: Arc<rustls::ClientConfig>,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    connector: TlsConnector,
}

impl std::fmt::Debug for EstClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EstClient")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

fn parse_url(url: &str) -> Result<(String, u16), EstError> {
    let uri: http::Uri = url.parse().map_err(|_| EstError::Url(url.into()))?;
    if uri.scheme_str() != Some("https") {
        return Err(EstError::Url(url.into()));
    }
    let host = uri.host().ok_or_else(|| EstError::Url(url.into()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    Ok((host, uri.port_u16().unwrap_or(443)))
}

impl EstClient {
    /// A client for `server` trusting the root in `ca_pem`, optionally presenting
    /// `(chain PEM, key PEM)` as its client certificate.
    pub fn new(server: &str, ca_pem: &[u8], identity: Option<(Vec<u8>, Vec<u8>)>) -> Result<Self, EstError> {
        let (host, port) = parse_url(server)?;
        let roots = portcullis_client::tls::roots_from_pem(ca_pem, "CA file")
            .map_err(|e| EstError::Tls(e.to_string()))?;
        let builder = rustls::ClientConfig::builder_with_provider(portcullis_client::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| EstError::Tls(e.to_string()))?
            .with_root_certificates(roots);
        let mut cfg = match identity {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => {
                let chain = CertificateDer::pem_slice_iter(&chain)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| EstError::Tls(format!("certificate chain: {e}")))?;
                let key = PrivateKeyDer::from_pem_slice(&key)
                    .map_err(|_| EstError::Tls("private key unreadable".into()))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| EstError::Tls(e.to_string()))?
            }
        };
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server_name = ServerName::try_from(host.clone()).map_err(|_| EstError::Url(server.into()))?;
        let config = Arc::new(cfg);
        Ok(Self { connector: TlsConnector::from(config.clone()), config, host, port, server_name })
    }

    /// The same client, but every connection does a full handshake (no TLS session
    /// resumption), as a fleet of distinct devices would.
    pub fn without_resumption(mut self) -> Self {
        let mut cfg = (*self.config).clone();
        cfg.resumption = rustls::client::Resumption::disabled();
        self.config = Arc::new(cfg);
        self.connector = TlsConnector::from(self.config.clone());
        self
    }

    pub(crate) async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, EstError> {
        let addr = format!("{}:{}", self.host, self.port);
        let err = |reason: String| EstError::Connect { addr: addr.clone(), reason };
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let tls =
            self.connector.connect(self.server_name.clone(), tcp).await.map_err(|e| err(e.to_string()))?;
        let (send, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| err(e.to_string()))?;
        tokio::spawn(conn);
        Ok(send)
    }

    async fn exchange(
        &self,
        send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        req: Request<Full<Bytes>>,
    ) -> Result<Bytes, EstError> {
        send.ready().await.map_err(|e| EstError::Http(e.to_string()))?;
        let resp = send.send_request(req).await.map_err(|e| EstError::Http(e.to_string()))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| EstError::Http(e.to_string()))?.to_bytes();
        if status != StatusCode::OK {
            let detail = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
            return Err(EstError::Refused { status: status.as_u16(), detail });
        }
        Ok(body)
    }

    pub(crate) fn request(&self, method: Method, path: &str) -> http::request::Builder {
        let host = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        Request::builder().method(method).uri(path).header(header::HOST, host)
    }

    fn certs(body: &[u8]) -> Result<Vec<Vec<u8>>, EstError> {
        let b64: Vec<u8> = body.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| EstError::Response(e.to_string()))?;
        portcullis_client::pkcs7::parse_certs_only(&der).map_err(|e| EstError::Response(e.to_string()))
    }

    fn csr_request(&self, path: &str) -> http::request::Builder {
        self.request(Method::POST, path).header(header::CONTENT_TYPE, "application/pkcs10")
    }

    /// `cacerts` then `simpleenroll`, on one fresh connection. Returns (issuing CA, leaf).
    pub async fn enroll(
        &self,
        id: &DeviceId,
        token: &Token,
        csr_der: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), Error> {
        let mut send = self.connect().await?;
        let issuing = self.issuing(&mut send).await?;
        let leaf = self.leaf(&mut send, self.enroll_request(id, token, csr_der)?).await?;
        Ok((issuing, leaf))
    }

    /// Only `simpleenroll`, on one fresh connection; returns the leaf. For fleet
    /// simulation and benchmarks, where the CA chain is already known.
    pub async fn simple_enroll(
        &self,
        id: &DeviceId,
        token: &Token,
        csr_der: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let mut send = self.connect().await?;
        self.leaf(&mut send, self.enroll_request(id, token, csr_der)?).await
    }

    fn enroll_request(
        &self,
        id: &DeviceId,
        token: &Token,
        csr_der: &[u8],
    ) -> Result<Request<Full<Bytes>>, EstError> {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{}", token.expose()));
        let body = base64::engine::general_purpose::STANDARD.encode(csr_der);
        self.csr_request("/.well-known/est/simpleenroll")
            .header(header::AUTHORIZATION, format!("Basic {basic}"))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| EstError::Http(e.to_string()))
    }

    /// `cacerts` then `simplereenroll` over mTLS. Returns (issuing CA, leaf).
    pub async fn reenroll(&self, csr_der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), Error> {
        let mut send = self.connect().await?;
        let issuing = self.issuing(&mut send).await?;
        let body = base64::engine::general_purpose::STANDARD.encode(csr_der);
        let req = self
            .csr_request("/.well-known/est/simplereenroll")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| EstError::Http(e.to_string()))?;
        let leaf = self.leaf(&mut send, req).await?;
        Ok((issuing, leaf))
    }

    async fn issuing(
        &self,
        send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    ) -> Result<Vec<u8>, Error> {
        let req = self
            .request(Method::GET, "/.well-known/est/cacerts")
            .body(Full::new(Bytes::new()))
            .map_err(|e| EstError::Http(e.to_string()))?;
        let certs = Self::certs(&self.exchange(send, req).await?)?;
        // The issuing CA is the one that is not self-issued.
        certs
            .into_iter()
            .find(|der| {
                x509_parser::parse_x509_certificate(der).is_ok_and(|(_, c)| c.subject() != c.issuer())
            })
            .ok_or_else(|| EstError::Response("cacerts holds no issuing CA".into()).into())
    }

    async fn leaf(
        &self,
        send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        req: Request<Full<Bytes>>,
    ) -> Result<Vec<u8>, Error> {
        let certs = Self::certs(&self.exchange(send, req).await?)?;
        certs.into_iter().next().ok_or_else(|| EstError::Response("no certificate in response".into()).into())
    }

    /// GET `path` on a fresh connection; returns (status, body). For tests and probes.
    pub async fn get(&self, path: &str) -> Result<(u16, Bytes), EstError> {
        let mut send = self.connect().await?;
        let req = self
            .request(Method::GET, path)
            .body(Full::new(Bytes::new()))
            .map_err(|e| EstError::Http(e.to_string()))?;
        send.ready().await.map_err(|e| EstError::Http(e.to_string()))?;
        let resp = send.send_request(req).await.map_err(|e| EstError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| EstError::Http(e.to_string()))?.to_bytes();
        Ok((status, body))
    }

    /// Opens a keep-alive connection for several requests (tests of live revocation).
    pub async fn open(&self) -> Result<Connection, EstError> {
        Ok(Connection { send: self.connect().await?, client: self.clone() })
    }
}

/// One open connection to the device port.
pub struct Connection {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    client: EstClient,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

impl Connection {
    /// GET `path` on this connection; returns (status, body).
    pub async fn get(&mut self, path: &str) -> Result<(u16, Bytes), EstError> {
        let req = self
            .client
            .request(Method::GET, path)
            .body(Full::new(Bytes::new()))
            .map_err(|e| EstError::Http(e.to_string()))?;
        self.send.ready().await.map_err(|e| EstError::Http(e.to_string()))?;
        let resp = self.send.send_request(req).await.map_err(|e| EstError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| EstError::Http(e.to_string()))?.to_bytes();
        Ok((status, body))
    }
}
