//! Runs the real `portcullis` binary on 127.0.0.1 with port 0 and drives it with real
//! clients: the agent library, openssl, curl, and raw TLS sockets.
#![allow(dead_code)]

pub mod dns_upstream;
pub mod upstream;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use portcullis_admin::AdminClient;
use portcullis_core::Token;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// The `portcullis-agent` binary beside `portcullis`. Cargo builds only this package's
/// binaries for its tests, so build the agent's on first use.
pub fn agent_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let path = Path::new(BIN).with_file_name("portcullis-agent");
            let status = Command::new(env!("CARGO"))
                .args(["build", "--quiet", "-p", "portcullis-agent", "--bin", "portcullis-agent"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("run cargo");
            assert!(status.success(), "cannot build portcullis-agent");
            assert!(path.exists(), "{} missing after build", path.display());
            path
        })
        .clone()
}

pub struct Server {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub device: SocketAddr,
    pub admin: SocketAddr,
    /// The DNS port (UDP and TCP), when enabled.
    pub dns: Option<SocketAddr>,
    /// DNS over TLS, when enabled.
    pub dot: Option<SocketAddr>,
}

pub fn data_dir(dir: &Path) -> PathBuf {
    dir.join("data")
}

impl Server {
    pub fn start() -> Self {
        Self::start_with_config("")
    }

    pub fn start_with_config(config: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, config)
    }

    /// Starts (or restarts) a server on the data dir inside `dir`.
    pub fn start_in(dir: tempfile::TempDir, config: &str) -> Self {
        Self::start_logged(dir, config, None)
    }

    /// Like `start_in`, with the server's log at debug level written to `log`.
    pub fn start_logged(dir: tempfile::TempDir, config: &str, log: Option<&Path>) -> Self {
        Self::spawn(dir, Some(config), log)
    }

    /// A server on the embedded defaults: no `--config` at all, as a newcomer starts it.
    pub fn start_without_config() -> Self {
        Self::spawn(tempfile::tempdir().expect("tempdir"), None, None)
    }

    fn spawn(dir: tempfile::TempDir, config: Option<&str>, log: Option<&Path>) -> Self {
        let mut cmd = Command::new(BIN);
        if let Some(config) = config {
            let cfg_path = dir.path().join("portcullis.toml");
            std::fs::write(&cfg_path, config).expect("write config");
            cmd.arg("--config").arg(&cfg_path);
        }
        let mut child = cmd
            .arg("--data-dir")
            .arg(data_dir(dir.path()))
            .args([
                "up",
                "--device-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
                "--dns-addr",
                "127.0.0.1:0",
                "--dot-addr",
                "127.0.0.1:0",
            ])
            .env("PORTCULLIS_LOG", if log.is_some() { "debug" } else { "warn" })
            .stdout(Stdio::piped())
            .stderr(match log {
                Some(p) => Stdio::from(std::fs::File::create(p).expect("log file")),
                None => Stdio::inherit(),
            })
            .spawn()
            .expect("spawn portcullis");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut device = None;
        let mut admin = None;
        let mut dns = None;
        let mut dot = None;
        while device.is_none() || admin.is_none() {
            let line = lines.next().expect("server exited before listening").expect("read stdout");
            let addr: Option<SocketAddr> = line.rsplit(' ').next().and_then(|a| a.parse().ok());
            if line.contains("dns over tls") {
                dot = addr;
            } else if line.contains("dns (udp, tcp)") {
                dns = addr;
            } else if line.contains("device port") {
                device = addr;
            } else if line.contains("admin API") {
                admin = addr;
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self {
            dir,
            child: Some(child),
            device: device.expect("device addr"),
            admin: admin.expect("admin addr"),
            dns,
            dot,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        data_dir(self.dir.path())
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.device)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs a management command against this instance.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN).arg("--data-dir").arg(self.data_dir()).args(args).output().expect("run portcullis")
    }

    /// Runs a management command that must succeed; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "portcullis {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf8")
    }

    /// Registers a device, returns its token.
    pub fn add_device(&self, id: &str, extra: &[&str]) -> String {
        let mut args = vec!["device", "add", id];
        args.extend_from_slice(extra);
        self.cli_ok(&args).trim().to_owned()
    }

    /// Writes the root CA and the chain (issuing + root) to files, returns their paths.
    pub fn ca_files(&self) -> (PathBuf, PathBuf) {
        let root = self.path("root.pem");
        let chain = self.path("chain.pem");
        if !root.exists() {
            std::fs::write(&root, self.cli_ok(&["ca", "cert"])).expect("write root");
            std::fs::write(&chain, self.cli_ok(&["ca", "chain"])).expect("write chain");
        }
        (root, chain)
    }

    pub fn root_pem(&self) -> Vec<u8> {
        std::fs::read(self.ca_files().0).expect("root")
    }

    pub fn admin_client(&self) -> AdminClient {
        let token = std::fs::read_to_string(self.data_dir().join("admin.token")).expect("admin token");
        AdminClient::remote(self.admin, Token::from_presented(token.trim()))
    }

    pub async fn certificate_count(&self) -> usize {
        self.admin_client().certificates(None).await.expect("certificates").certificates.len()
    }

    /// [`Self::certificate_count`] for synchronous tests.
    pub fn certificate_count_now(&self) -> usize {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(self.certificate_count())
    }

    /// The admin API's `/metrics` text.
    pub fn metrics_now(&self) -> String {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(self.admin_client().get_text("/metrics"))
            .expect("metrics")
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let ok = Command::new("kill").args(["-TERM", &c.id().to_string()]).status().expect("kill");
        assert!(ok.success());
        for _ in 0..100 {
            if let Some(status) = c.try_wait().expect("wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = c.kill();
        panic!("server did not stop within 10 s of SIGTERM");
    }

    /// Stops the server and hands back its directory for a restart.
    pub fn into_dir(mut self) -> tempfile::TempDir {
        self.kill9();
        let dir = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, dir)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `dig` against `addr` (any transport the flags choose); the whole output.
pub fn dig_at(addr: std::net::SocketAddr, args: &[&str]) -> String {
    let out = std::process::Command::new("dig")
        .arg(format!("@{}", addr.ip()))
        .args(["-p", &addr.port().to_string(), "+time=3", "+tries=1"])
        .args(args)
        .output()
        .expect("dig (Debian dnsutils) is installed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command, asserting success; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `openssl req` making a key and a DER CSR in `dir`; returns (key path, csr path).
pub fn openssl_csr(dir: &Path, name: &str, newkey: &[&str], extra: &[&str]) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr.der"));
    let mut cmd = Command::new("openssl");
    cmd.arg("req").arg("-new").args(newkey).arg("-nodes").arg("-keyout").arg(&key);
    cmd.args(["-subj", &format!("/CN={name}"), "-outform", "DER", "-out"]).arg(&csr).args(extra);
    run(&mut cmd);
    (key, csr)
}

pub fn p256() -> Vec<&'static str> {
    vec!["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub struct CurlResult {
    pub status: u16,
    pub body: Vec<u8>,
}

/// The HTTP version curl speaks to the device port unless a test says otherwise:
/// `PORTCULLIS_TEST_HTTP=2` runs the same tests over HTTP/2 (scripts/test.sh runs the
/// gateway's end-to-end tests both ways).
pub fn device_http_version() -> &'static str {
    match std::env::var("PORTCULLIS_TEST_HTTP").as_deref() {
        Ok("2") => "--http2",
        _ => "--http1.1",
    }
}

/// `curl` with the given args against `url`; returns status and body.
pub fn curl(args: &[&str], url: &str) -> CurlResult {
    let tmp = tempfile::NamedTempFile::new().expect("tmp");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-o"]).arg(tmp.path()).args(["-w", "%{http_code}"]);
    if url.starts_with("https://") {
        // First, so that a test's own --http1.1 or --http2 wins.
        cmd.arg(device_http_version());
    }
    let out = cmd.args(args).arg(url).output().expect("curl");
    let status = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
    CurlResult { status, body: std::fs::read(tmp.path()).unwrap_or_default() }
}

impl CurlResult {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn detail(&self) -> String {
        self.json()["detail"].as_str().unwrap_or_default().to_owned()
    }
}

/// EST simpleenroll by hand with curl: a base64 DER CSR and HTTP Basic.
pub fn curl_enroll(s: &Server, user: &str, token: &str, body: &[u8]) -> CurlResult {
    let (root, _) = s.ca_files();
    let body_file = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(body_file.path(), body).expect("write body");
    let auth = format!("{user}:{token}");
    let data = format!("@{}", body_file.path().display());
    curl(
        &[
            "--cacert",
            root.to_str().expect("path"),
            "-u",
            &auth,
            "-H",
            "Content-Type: application/pkcs10",
            "--data-binary",
            &data,
        ],
        &format!("{}/.well-known/est/simpleenroll", s.url()),
    )
}

/// `curl` over mTLS with `cert`/`key` to `path` on the device port.
pub fn curl_mtls(s: &Server, cert: &Path, key: &Path, path: &str, extra: &[&str]) -> CurlResult {
    let (root, _) = s.ca_files();
    let mut args = vec![
        "--cacert",
        root.to_str().expect("path"),
        "--cert",
        cert.to_str().expect("path"),
        "--key",
        key.to_str().expect("path"),
    ];
    args.extend_from_slice(extra);
    curl(&args, &format!("{}{path}", s.url()))
}

/// Certificates in a base64 certs-only PKCS#7 body, DER.
pub fn certs_from_pkcs7_b64(body: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine;
    let clean: Vec<u8> = body.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(clean).expect("base64 response");
    portcullis_pki::pkcs7::parse_certs_only(&der).expect("pkcs7")
}

pub fn pem_cert(der: &[u8]) -> String {
    portcullis_pki::pem_encode("CERTIFICATE", der)
}

/// A rustls client config trusting `root_pem`.
pub fn tls_client(root_pem: &[u8]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(root_pem) {
        roots.add(c.expect("pem")).expect("root");
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A rustls client config trusting `root_pem` that presents the certificate chain and
/// key in the PEM files `chain` and `key`.
pub fn tls_client_cert(root_pem: &[u8], chain: &Path, key: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(root_pem) {
        roots.add(c.expect("pem")).expect("root");
    }
    let certs =
        CertificateDer::pem_file_iter(chain).expect("chain").collect::<Result<Vec<_>, _>>().expect("pem");
    let key = PrivateKeyDer::from_pem_file(key).expect("key");
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .expect("client cert"),
    )
}
