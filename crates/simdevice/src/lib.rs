//! Simulated IoT devices: each binds real TCP listeners on a chosen (loopback) address
//! and speaks just enough of a protocol to be found, identified and logged into the way
//! a careless device would be. For tests and demos of the audit only; nothing here is
//! secure, by design.
//!
//! A service is written `PORT=KIND[:USER:PASSWORD]`:
//!
//! | kind | behaviour |
//! |---|---|
//! | `telnet:U:P` | telnet login (options negotiated), a BusyBox shell prompt for U/P |
//! | `http` | HTTP/1.1 200 to anything |
//! | `http-basic:U:P` | HTTP Basic realm, 200 for U/P, else 401 |
//! | `mqtt-anon` | MQTT broker accepting anonymous CONNECT |
//! | `mqtt-auth:U:P` | MQTT broker accepting only U/P (CONNACK 5 otherwise) |
//! | `tls-expired` / `tls-self-signed` | HTTPS with such a certificate |
//! | `tls-legacy` | answers any ClientHello with a TLS 1.1 ServerHello |
//! | `ssh` / `ssh:U:P` | an SSH server (curve25519, chacha20-poly1305, Ed25519) refusing every password / accepting U/P |
//! | `ftp`, `rtsp` | a greeting or an RTSP reply |
//! | `open` | accepts and closes |

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, bail};
use base64::Engine;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One simulated service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Telnet login accepting one pair.
    Telnet(String, String),
    /// Open HTTP.
    Http,
    /// HTTP Basic accepting one pair.
    HttpBasic(String, String),
    /// Anonymous MQTT.
    MqttAnon,
    /// MQTT accepting one pair.
    MqttAuth(String, String),
    /// HTTPS with an expired certificate.
    TlsExpired,
    /// HTTPS with a self-signed, valid certificate.
    TlsSelfSigned,
    /// TLS 1.1 ServerHello.
    TlsLegacy,
    /// FTP greeting.
    Ftp,
    /// SSH server, accepting this pair if any.
    Ssh(Option<(String, String)>),
    /// RTSP.
    Rtsp,
    /// Accept and close.
    Open,
}

/// A service on a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// TCP port.
    pub port: u16,
    /// What it does.
    pub kind: Kind,
}

impl std::str::FromStr for Service {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (port, spec) = s.split_once('=').context("service: expected PORT=KIND[:USER:PASSWORD]")?;
        let port: u16 = port.parse().with_context(|| format!("service {s}: bad port"))?;
        let mut parts = spec.splitn(3, ':');
        let kind = parts.next().unwrap_or_default();
        let mut pair = || -> anyhow::Result<(String, String)> {
            match (parts.next(), parts.next()) {
                (Some(u), Some(p)) => Ok((u.to_owned(), p.to_owned())),
                _ => bail!("service {s}: {kind} needs USER:PASSWORD"),
            }
        };
        let kind = match kind {
            "telnet" => pair().map(|(u, p)| Kind::Telnet(u, p))?,
            "http" => Kind::Http,
            "http-basic" => pair().map(|(u, p)| Kind::HttpBasic(u, p))?,
            "mqtt-anon" => Kind::MqttAnon,
            "mqtt-auth" => pair().map(|(u, p)| Kind::MqttAuth(u, p))?,
            "tls-expired" => Kind::TlsExpired,
            "tls-self-signed" => Kind::TlsSelfSigned,
            "tls-legacy" => Kind::TlsLegacy,
            "ftp" => Kind::Ftp,
            "ssh" => Kind::Ssh(match (parts.next(), parts.next()) {
                (Some(u), Some(p)) => Some((u.to_owned(), p.to_owned())),
                _ => None,
            }),
            "rtsp" => Kind::Rtsp,
            "open" => Kind::Open,
            other => bail!("service {s}: unknown kind {other:?}"),
        };
        Ok(Self { port, kind })
    }
}

/// A running simulated device; its listeners stop when it is dropped.
#[derive(Debug)]
pub struct Device {
    /// Its address.
    pub addr: IpAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Device {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn tls_config(expired: bool) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["simdevice.invalid".to_owned()])?;
    let now = time::OffsetDateTime::now_utc();
    if expired {
        params.not_before = now - time::Duration::days(400);
        params.not_after = now - time::Duration::days(35);
    } else {
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(365);
    }
    let cert = params.self_signed(&key)?;
    let provider = portcullis_client::tls::provider();
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    Ok(Arc::new(cfg))
}

/// Starts the services of one device on `addr`.
pub async fn start(addr: IpAddr, services: &[Service]) -> anyhow::Result<Device> {
    let mut tasks = Vec::new();
    for svc in services {
        let sa = SocketAddr::new(addr, svc.port);
        let listener = TcpListener::bind(sa).await.with_context(|| format!("bind {sa}"))?;
        let kind = svc.kind.clone();
        let tls = match kind {
            Kind::TlsExpired => Some(tokio_rustls::TlsAcceptor::from(tls_config(true)?)),
            Kind::TlsSelfSigned => Some(tokio_rustls::TlsAcceptor::from(tls_config(false)?)),
            _ => None,
        };
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else { continue };
                let kind = kind.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(std::time::Duration::from_secs(30), serve(s, kind, tls)).await;
                });
            }
        }));
    }
    Ok(Device { addr, tasks })
}

async fn serve(mut s: TcpStream, kind: Kind, tls: Option<tokio_rustls::TlsAcceptor>) -> std::io::Result<()> {
    match kind {
        Kind::Telnet(u, p) => telnet(s, &u, &p).await,
        Kind::Http => http(&mut s, None).await,
        Kind::HttpBasic(u, p) => http(&mut s, Some((&u, &p))).await,
        Kind::MqttAnon => mqtt(&mut s, None).await,
        Kind::MqttAuth(u, p) => mqtt(&mut s, Some((&u, &p))).await,
        Kind::TlsExpired | Kind::TlsSelfSigned => {
            let Some(acceptor) = tls else { return Ok(()) };
            let mut t = acceptor.accept(s).await?;
            http(&mut t, None).await
        }
        Kind::TlsLegacy => {
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await?;
            if n > 5 && buf[0] == 0x16 {
                // ServerHello, TLS 1.1, TLS_RSA_WITH_AES_128_CBC_SHA.
                let mut hello = vec![0x02, 0, 0, 38, 0x03, 0x02];
                hello.extend([0x11; 32]);
                hello.extend([0, 0x00, 0x2f, 0]);
                let mut rec = vec![0x16, 0x03, 0x02, 0, hello.len() as u8];
                rec.extend(hello);
                s.write_all(&rec).await?;
            }
            Ok(())
        }
        Kind::Ftp => greet(&mut s, b"220 (vsFTPd 3.0.3)\r\n").await,
        Kind::Ssh(pair) => {
            let key = portcullis_audit::ssh::host_key();
            let (u, p) = pair.unwrap_or_else(|| ("\u{0}".into(), "\u{0}refuse-all".into()));
            portcullis_audit::ssh::serve_password(s, &key, &u, &p).await
        }
        Kind::Rtsp => {
            let head = read_head(&mut s).await?;
            let cseq = head.lines().find_map(|l| l.strip_prefix("CSeq:")).unwrap_or(" 1").trim().to_owned();
            let reply =
                format!("RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\nPublic: OPTIONS, DESCRIBE, SETUP, PLAY\r\n\r\n");
            s.write_all(reply.as_bytes()).await
        }
        Kind::Open => Ok(()),
    }
}

async fn greet(s: &mut TcpStream, banner: &[u8]) -> std::io::Result<()> {
    s.write_all(banner).await?;
    let mut buf = [0u8; 256];
    while s.read(&mut buf).await? > 0 {}
    Ok(())
}

async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

async fn http<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    basic: Option<(&str, &str)>,
) -> std::io::Result<()> {
    let head = read_head(s).await?;
    if !head.starts_with("GET ") && !head.starts_with("HEAD ") && !head.starts_with("POST ") {
        return s
            .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
    }
    let ok = match basic {
        None => true,
        Some((u, p)) => {
            let want = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            head.lines().any(|l| {
                l.split_once(':').is_some_and(|(k, v)| {
                    k.eq_ignore_ascii_case("authorization") && v.trim() == format!("Basic {want}")
                })
            })
        }
    };
    let reply: &[u8] = if ok {
        b"HTTP/1.1 200 OK\r\nServer: GoAhead-Webs\r\nContent-Type: text/html\r\nContent-Length: 14\r\nConnection: close\r\n\r\n<h1>camera</h1>"
    } else {
        b"HTTP/1.1 401 Unauthorized\r\nServer: GoAhead-Webs\r\nWWW-Authenticate: Basic realm=\"IPCamera\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    };
    s.write_all(reply).await?;
    s.flush().await
}

async fn mqtt(s: &mut TcpStream, login: Option<(&str, &str)>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    // Fixed header, then the remaining length.
    let packet = loop {
        let r = s.read(&mut buf[n..]).await?;
        if r == 0 {
            return Ok(());
        }
        n += r;
        if n >= 2 && buf[0] == 0x10 {
            let (mut len, mut mult, mut i) = (0usize, 1usize, 1usize);
            while i < n && i < 5 {
                len += usize::from(buf[i] & 0x7f) * mult;
                mult *= 128;
                if buf[i] & 0x80 == 0 {
                    break;
                }
                i += 1;
            }
            if n > i + len || (n == i + 1 + len) {
                break buf[i + 1..(i + 1 + len).min(n)].to_vec();
            }
        } else if n >= 1 && buf[0] != 0x10 {
            return Ok(());
        }
        if n == buf.len() {
            return Ok(());
        }
    };
    // Variable header: protocol name (2+4), level, flags, keep-alive.
    let field = |b: &[u8], at: usize| -> Option<(String, usize)> {
        let l = usize::from(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]));
        let v = b.get(at + 2..at + 2 + l)?;
        Some((String::from_utf8_lossy(v).into_owned(), at + 2 + l))
    };
    let flags = packet.get(7).copied().unwrap_or(0);
    let accepted = match login {
        None => true,
        Some((u, p)) => {
            let mut at = 10;
            let mut user = None;
            let mut pass = None;
            if let Some((_, next)) = field(&packet, at) {
                at = next;
                if flags & 0x80 != 0
                    && let Some((v, next)) = field(&packet, at)
                {
                    user = Some(v);
                    at = next;
                }
                if flags & 0x40 != 0
                    && let Some((v, _)) = field(&packet, at)
                {
                    pass = Some(v);
                }
            }
            user.as_deref() == Some(u) && pass.as_deref() == Some(p)
        }
    };
    s.write_all(&[0x20, 0x02, 0x00, if accepted { 0 } else { 5 }]).await?;
    let mut rest = [0u8; 64];
    while s.read(&mut rest).await? > 0 {}
    Ok(())
}

async fn telnet(mut s: TcpStream, user: &str, pass: &str) -> std::io::Result<()> {
    // IAC WILL ECHO, IAC WILL SUPPRESS-GO-AHEAD, IAC DO TERMINAL-TYPE.
    s.write_all(&[0xff, 0xfb, 0x01, 0xff, 0xfb, 0x03, 0xff, 0xfd, 0x18]).await?;
    for _ in 0..3 {
        s.write_all(b"\r\nipcam login: ").await?;
        let Some(u) = line(&mut s).await? else { return Ok(()) };
        s.write_all(b"\r\nPassword: ").await?;
        let Some(p) = line(&mut s).await? else { return Ok(()) };
        if u == user && p == pass {
            s.write_all(b"\r\n\r\nBusyBox v1.19.4 (2016-03-17) built-in shell (ash)\r\n# ").await?;
            // Anything typed now would be a command; the audit never sends one.
            let mut buf = [0u8; 256];
            while s.read(&mut buf).await? > 0 {}
            return Ok(());
        }
        s.write_all(b"\r\nLogin incorrect").await?;
    }
    Ok(())
}

/// One line of user input, without telnet commands.
async fn line(s: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    let mut skip = 0;
    loop {
        if s.read(&mut b).await? == 0 {
            return Ok(None);
        }
        if skip > 0 {
            skip -= 1;
            continue;
        }
        match b[0] {
            0xff => skip = 2,
            b'\n' => break,
            b'\r' | 0 => {}
            c => out.push(c),
        }
        if out.len() > 256 {
            return Ok(None);
        }
    }
    Ok(Some(String::from_utf8_lossy(&out).into_owned()))
}
