//! Talking to one open port: identify the service, inspect its TLS, try logins.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};

use crate::wire::{self, Banner, HttpHead, LegacyAnswer, LoginOutcome};

/// Time limits of one probe.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// How long to wait for a service to speak first.
    pub banner: Duration,
    /// Any one exchange after connecting.
    pub io: Duration,
}

/// Largest reply read from a device in one exchange.
const MAX_READ: usize = 16 * 1024;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Stream = Box<dyn Io>;

async fn tcp(addr: SocketAddr, t: &Timeouts) -> io::Result<TcpStream> {
    let s = timeout(t.connect, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Reads into `buf` until `done(buf)`, end of stream, `MAX_READ`, or `deadline`.
async fn read_until<S: AsyncRead + Unpin + ?Sized>(
    s: &mut S,
    buf: &mut Vec<u8>,
    deadline: Instant,
    done: impl Fn(&[u8]) -> bool,
) -> io::Result<()> {
    let mut chunk = [0u8; 2048];
    while !done(buf) && buf.len() < MAX_READ {
        match timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) | Ok(Ok(0)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => {
                if buf.is_empty() {
                    return Err(e);
                }
                break;
            }
        }
    }
    Ok(())
}

fn head_complete(b: &[u8]) -> bool {
    b.windows(4).any(|w| w == b"\r\n\r\n")
}

/// What a TLS handshake showed.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    /// Negotiated version.
    pub version: &'static str,
    /// Negotiated suite.
    pub suite: String,
    /// The server's chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// Whether the handshake's signatures verified. `false`: the server's key or
    /// signature is too weak for the verifier (RSA below 2048 bits, SHA-1 only), so the
    /// certificate was read for inspection only and no credential is sent over it.
    pub verified: bool,
}

/// Accepts any server certificate: the audit wants to *see* bad certificates, and judges
/// them itself ([`crate::tlscheck`]). With `signatures` set (the normal client),
/// handshake signatures are verified, so what is inspected is what the server holds the
/// key to. Without (inspection only), every signature is accepted too: only for reading
/// the certificate of a server whose key or signature the verifier refuses (RSA below
/// 2048 bits, SHA-1 only), so the weakest devices do not look clean because their
/// handshake fails; nothing but the certificate is trusted from such a connection.
#[derive(Debug)]
struct SeeEverything {
    provider: Arc<rustls::crypto::CryptoProvider>,
    signatures: bool,
}

impl ServerCertVerifier for SeeEverything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if !self.signatures {
            return Ok(HandshakeSignatureValid::assertion());
        }
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if !self.signatures {
            return Ok(HandshakeSignatureValid::assertion());
        }
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        if self.signatures {
            return self.provider.signature_verification_algorithms.supported_schemes();
        }
        use SignatureScheme as S;
        vec![
            S::RSA_PKCS1_SHA1,
            S::ECDSA_SHA1_Legacy,
            S::RSA_PKCS1_SHA256,
            S::ECDSA_NISTP256_SHA256,
            S::RSA_PKCS1_SHA384,
            S::ECDSA_NISTP384_SHA384,
            S::RSA_PKCS1_SHA512,
            S::ECDSA_NISTP521_SHA512,
            S::RSA_PSS_SHA256,
            S::RSA_PSS_SHA384,
            S::RSA_PSS_SHA512,
            S::ED25519,
            S::ED448,
        ]
    }
}

fn connector(signatures: bool) -> tokio_rustls::TlsConnector {
    let provider = portcullis_client::tls::provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SeeEverything { provider, signatures }))
        .with_no_client_auth();
    cfg.enable_sni = false;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// The TLS client of the audit.
pub fn tls_connector() -> tokio_rustls::TlsConnector {
    connector(true)
}

/// The audit's TLS client for inspection only (see [`SeeEverything`]).
pub fn inspect_connector() -> tokio_rustls::TlsConnector {
    connector(false)
}

/// True when a failed handshake was TLS that the verifier refused (a weak key or
/// signature, or a server that found no scheme it could sign with), rather than a port
/// that does not speak TLS.
fn refused_by_verifier(e: &io::Error) -> bool {
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else { return false };
    matches!(
        inner,
        rustls::Error::InvalidCertificate(_)
            | rustls::Error::PeerIncompatible(_)
            | rustls::Error::PeerMisbehaved(_)
            | rustls::Error::AlertReceived(_)
    )
}

async fn tls(
    addr: SocketAddr,
    t: &Timeouts,
    c: &tokio_rustls::TlsConnector,
    verified: bool,
) -> io::Result<(Stream, TlsInfo)> {
    let s = tcp(addr, t).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    let s = timeout(t.io, c.connect(name, s))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let (_, conn) = s.get_ref();
    let info = TlsInfo {
        version: match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2",
            _ => "unknown",
        },
        suite: conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default(),
        chain: conn.peer_certificates().unwrap_or_default().iter().map(|c| c.to_vec()).collect(),
        verified,
    };
    Ok((Box::new(s), info))
}

/// What listens on an open port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Telnet.
    Telnet,
    /// SSH.
    Ssh,
    /// FTP.
    Ftp,
    /// SMTP or another `220` greeter.
    Smtp,
    /// HTTP.
    Http,
    /// RTSP.
    Rtsp,
    /// MQTT.
    Mqtt,
    /// Something that did not say.
    Unknown,
}

impl Kind {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Telnet => "telnet",
            Self::Ssh => "ssh",
            Self::Ftp => "ftp",
            Self::Smtp => "smtp",
            Self::Http => "http",
            Self::Rtsp => "rtsp",
            Self::Mqtt => "mqtt",
            Self::Unknown => "unknown",
        }
    }
}

/// An identified service.
#[derive(Debug, Clone)]
pub struct Service {
    /// The application protocol (inside TLS when `tls` is set).
    pub kind: Kind,
    /// The TLS layer, if the port speaks TLS.
    pub tls: Option<TlsInfo>,
    /// What it said, printable and bounded.
    pub banner: String,
    /// The HTTP response to `GET /`, for HTTP.
    pub http: Option<HttpHead>,
    /// The MQTT CONNACK code for an anonymous CONNECT, for MQTT.
    pub mqtt_anonymous: Option<u8>,
}

impl Service {
    /// `telnet`, `https`, `mqtts`, `tls`, …
    pub fn name(&self) -> String {
        match (self.kind, self.tls.is_some()) {
            (Kind::Unknown, true) => "tls".into(),
            (k, true) => format!("{}s", k.name()),
            (k, false) => k.name().into(),
        }
    }
}

#[derive(Clone, Copy)]
enum Try {
    Tls,
    Http,
    Mqtt,
    Rtsp,
}

fn order(port: u16) -> [Try; 4] {
    match port {
        1883 | 8883 => [Try::Mqtt, Try::Tls, Try::Http, Try::Rtsp],
        554 | 8554 => [Try::Rtsp, Try::Http, Try::Tls, Try::Mqtt],
        80 | 81 | 82 | 88 | 8000 | 8008 | 8080 | 8081 | 8088 | 8888 | 9000 => {
            [Try::Http, Try::Tls, Try::Rtsp, Try::Mqtt]
        }
        _ => [Try::Tls, Try::Http, Try::Mqtt, Try::Rtsp],
    }
}

/// Everything a probe needs.
#[derive(Clone)]
pub struct Prober {
    /// Time limits.
    pub t: Timeouts,
    /// TLS client.
    pub tls: tokio_rustls::TlsConnector,
    /// TLS client for inspection only ([`inspect_connector`]).
    pub inspect: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober").field("t", &self.t).finish_non_exhaustive()
    }
}

impl Prober {
    /// Identifies the service on `addr`: first by what it says unprompted, then by asking
    /// in the protocols the port suggests (TLS, HTTP, MQTT, RTSP), one connection each.
    pub async fn identify(
        &self,
        addr: SocketAddr,
        log: &mut (dyn FnMut(&str, &str) + Send),
    ) -> io::Result<Service> {
        let mut s = tcp(addr, &self.t).await?;
        let mut buf = Vec::new();
        read_until(&mut s, &mut buf, Instant::now() + self.t.banner, |b| !b.is_empty()).await.ok();
        if !buf.is_empty() {
            // Give a greeting a moment to finish.
            read_until(&mut s, &mut buf, Instant::now() + Duration::from_millis(150), |b| {
                b.ends_with(b"\n") || b.ends_with(b": ")
            })
            .await
            .ok();
        }
        drop(s);
        let banner = wire::printable(&buf);
        log("banner", if buf.is_empty() { "silent" } else { "spoke" });
        let kind = match wire::classify_banner(&buf, addr.port()) {
            Banner::Ssh => Some(Kind::Ssh),
            Banner::Telnet => Some(Kind::Telnet),
            Banner::Ftp => Some(Kind::Ftp),
            Banner::Smtp => Some(Kind::Smtp),
            Banner::Unknown if buf.is_empty() => None,
            Banner::Unknown => Some(Kind::Unknown),
        };
        if let Some(kind) = kind {
            return Ok(Service { kind, tls: None, banner, http: None, mqtt_anonymous: None });
        }
        for step in order(addr.port()) {
            match step {
                Try::Tls => {
                    let mut r = tls(addr, &self.t, &self.tls, true).await;
                    if let Err(e) = &r
                        && refused_by_verifier(e)
                    {
                        let why = e.to_string();
                        r = tls(addr, &self.t, &self.inspect, false).await;
                        if r.is_ok() {
                            log("tls-handshake", &format!("tls, not verifiable ({why}): inspected only"));
                        }
                    }
                    log("tls-handshake", if r.is_ok() { "tls" } else { "not tls" });
                    if let Ok((_, info)) = r {
                        let c = if info.verified { &self.tls } else { &self.inspect };
                        let v = info.verified;
                        let mut svc = Service {
                            kind: Kind::Unknown,
                            tls: Some(info),
                            banner,
                            http: None,
                            mqtt_anonymous: None,
                        };
                        if let Ok((s, _)) = tls(addr, &self.t, c, v).await
                            && let Some(head) = self.http_get(s, addr, None).await
                        {
                            log("https-get", &head.status.to_string());
                            svc.kind = Kind::Http;
                            svc.http = Some(head);
                        } else if let Ok((s, _)) = tls(addr, &self.t, c, v).await
                            && let Some(rc) = self.mqtt(s, None).await
                        {
                            log("mqtts-connect", &format!("connack {rc}"));
                            svc.kind = Kind::Mqtt;
                            svc.mqtt_anonymous = Some(rc);
                        }
                        return Ok(svc);
                    }
                }
                Try::Http => {
                    let s = tcp(addr, &self.t).await?;
                    if let Some(head) = self.http_get(Box::new(s), addr, None).await {
                        log("http-get", &head.status.to_string());
                        return Ok(Service {
                            kind: Kind::Http,
                            tls: None,
                            banner,
                            http: Some(head),
                            mqtt_anonymous: None,
                        });
                    }
                    log("http-get", "not http");
                }
                Try::Mqtt => {
                    let s = tcp(addr, &self.t).await?;
                    if let Some(rc) = self.mqtt(Box::new(s), None).await {
                        log("mqtt-connect", &format!("connack {rc}"));
                        return Ok(Service {
                            kind: Kind::Mqtt,
                            tls: None,
                            banner,
                            http: None,
                            mqtt_anonymous: Some(rc),
                        });
                    }
                    log("mqtt-connect", "not mqtt");
                }
                Try::Rtsp => {
                    let mut s = tcp(addr, &self.t).await?;
                    let req = format!(
                        "OPTIONS rtsp://{addr}/ RTSP/1.0\r\nCSeq: 1\r\nUser-Agent: portcullis-audit\r\n\r\n"
                    );
                    let mut buf = Vec::new();
                    if s.write_all(req.as_bytes()).await.is_ok() {
                        read_until(&mut s, &mut buf, Instant::now() + self.t.io, head_complete).await.ok();
                    }
                    if buf.starts_with(b"RTSP/") {
                        log("rtsp-options", "rtsp");
                        return Ok(Service {
                            kind: Kind::Rtsp,
                            tls: None,
                            banner,
                            http: None,
                            mqtt_anonymous: None,
                        });
                    }
                    log("rtsp-options", "not rtsp");
                }
            }
        }
        Ok(Service { kind: Kind::Unknown, tls: None, banner, http: None, mqtt_anonymous: None })
    }

    async fn http_get(
        &self,
        mut s: Stream,
        addr: SocketAddr,
        basic: Option<(&str, &str)>,
    ) -> Option<HttpHead> {
        let mut req = format!(
            "GET / HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: portcullis-audit\r\nAccept: */*\r\nConnection: close\r\n"
        );
        if let Some((u, p)) = basic {
            let cred = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            req.push_str(&format!("Authorization: Basic {cred}\r\n"));
        }
        req.push_str("\r\n");
        let deadline = Instant::now() + self.t.io;
        timeout_at(deadline, s.write_all(req.as_bytes())).await.ok()?.ok()?;
        let mut buf = Vec::new();
        read_until(&mut s, &mut buf, deadline, head_complete).await.ok()?;
        if !buf.starts_with(b"HTTP/") {
            return None;
        }
        wire::parse_http_head(&buf)
    }

    async fn mqtt(&self, mut s: Stream, login: Option<(&str, &str)>) -> Option<u8> {
        let deadline = Instant::now() + self.t.io;
        timeout_at(deadline, s.write_all(&wire::mqtt_connect("portcullis-audit", login))).await.ok()?.ok()?;
        let mut buf = Vec::new();
        read_until(&mut s, &mut buf, deadline, |b| b.len() >= 4).await.ok()?;
        let rc = wire::mqtt_connack(&buf);
        if rc == Some(0) {
            // Leave politely; nothing is published or subscribed.
            let _ = timeout_at(deadline, s.write_all(&[0xe0, 0x00])).await;
        }
        rc
    }

    /// Whether the service still negotiates a TLS version below 1.2; `Some(version)` if so.
    pub async fn legacy_tls(&self, addr: SocketAddr) -> Option<u16> {
        let mut s = tcp(addr, &self.t).await.ok()?;
        let mut random = [0u8; 32];
        random[..8].copy_from_slice(&(addr.port() as u64 ^ 0x5a5a_5a5a).to_be_bytes());
        let deadline = Instant::now() + self.t.io;
        timeout_at(deadline, s.write_all(&wire::legacy_client_hello(random))).await.ok()?.ok()?;
        let mut buf = Vec::new();
        read_until(&mut s, &mut buf, deadline, |b| wire::parse_server_hello(b) != LegacyAnswer::Incomplete)
            .await
            .ok()?;
        match wire::parse_server_hello(&buf) {
            LegacyAnswer::ServerHello(v) if v < 0x0303 => Some(v),
            _ => None,
        }
    }

    /// One login attempt against `svc`. `Ok(true)` if the credential was accepted.
    /// Nothing is run after a successful login: the connection is closed at the prompt.
    pub async fn login(&self, addr: SocketAddr, svc: &Service, user: &str, pass: &str) -> io::Result<bool> {
        if svc.tls.as_ref().is_some_and(|i| !i.verified) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the TLS handshake cannot be verified (weak key or signature); credentials are not sent over it",
            ));
        }
        let stream = || async {
            if svc.tls.is_some() {
                tls(addr, &self.t, &self.tls, true).await.map(|(s, _)| s)
            } else {
                tcp(addr, &self.t).await.map(|s| Box::new(s) as Stream)
            }
        };
        match svc.kind {
            Kind::Telnet => self.telnet_login(stream().await?, user, pass).await,
            Kind::Http => Ok(self
                .http_get(stream().await?, addr, Some((user, pass)))
                .await
                .is_some_and(|h| h.status < 400)),
            Kind::Mqtt => Ok(self.mqtt(stream().await?, Some((user, pass))).await == Some(0)),
            Kind::Ssh => match crate::ssh::try_password(stream().await?, user, pass, self.t.io * 2).await? {
                crate::ssh::PasswordAnswer::Accepted => Ok(true),
                crate::ssh::PasswordAnswer::Refused { password_offered: true } => Ok(false),
                crate::ssh::PasswordAnswer::Refused { password_offered: false } => Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the server does not offer password authentication",
                )),
            },
            _ => Ok(false),
        }
    }

    async fn telnet_login(&self, mut s: Stream, user: &str, pass: &str) -> io::Result<bool> {
        let deadline = Instant::now() + self.t.io * 2;
        let (mut text, mut reply) = (Vec::new(), Vec::new());
        // Waits for one of `prompts` at the end of the text, answering option requests.
        async fn until(
            s: &mut Stream,
            text: &mut Vec<u8>,
            reply: &mut Vec<u8>,
            deadline: Instant,
            done: &(dyn Fn(&[u8]) -> bool + Sync),
        ) -> io::Result<()> {
            let mut chunk = [0u8; 2048];
            while !done(text) && text.len() < MAX_READ {
                let n = match timeout_at(deadline, s.read(&mut chunk)).await {
                    Ok(Ok(0)) | Err(_) => return Ok(()),
                    Ok(r) => r?,
                };
                telnet_chunk(&chunk[..n], text, reply);
                if !reply.is_empty() {
                    timeout_at(deadline, s.write_all(reply))
                        .await
                        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "telnet"))??;
                    reply.clear();
                }
            }
            Ok(())
        }
        fn telnet_chunk(input: &[u8], text: &mut Vec<u8>, reply: &mut Vec<u8>) {
            wire::telnet_filter(input, text, reply);
        }
        let prompt = |t: &[u8]| {
            let l = String::from_utf8_lossy(t).to_ascii_lowercase();
            let l = l.trim_end();
            l.ends_with("login:")
                || l.ends_with("username:")
                || l.ends_with("user:")
                || l.ends_with("password:")
        };
        until(&mut s, &mut text, &mut reply, deadline, &prompt).await?;
        let lower = String::from_utf8_lossy(&text).to_ascii_lowercase();
        if !lower.trim_end().ends_with("password:") {
            if !prompt(&text) {
                return Ok(false);
            }
            s.write_all(format!("{user}\r\n").as_bytes()).await?;
            text.clear();
            let pw =
                |t: &[u8]| String::from_utf8_lossy(t).to_ascii_lowercase().trim_end().ends_with("password:");
            until(&mut s, &mut text, &mut reply, deadline, &pw).await?;
            if !pw(&text) {
                return Ok(false);
            }
        }
        s.write_all(format!("{pass}\r\n").as_bytes()).await?;
        text.clear();
        let decided = |t: &[u8]| wire::telnet_outcome(t) != LoginOutcome::Pending;
        until(&mut s, &mut text, &mut reply, deadline, &decided).await?;
        Ok(wire::telnet_outcome(&text) == LoginOutcome::Accepted)
    }
}
