//! Conformance of the gateway's validation, judged by an outside tool: `schemathesis`
//! (PyPI) generates requests from each example document and sends them through the real
//! binary with a device certificate. Every request it generates as valid must be
//! forwarded (no false positives: each reaches the upstream exactly once); every request
//! it generates as invalid must be refused and reach nothing.
//!
//! Every run happens twice: schemathesis straight to the device port (HTTP/1.1, as its
//! `requests` client speaks), and through [`Bridge`], which sends each request it gets on
//! to the device port over HTTP/1.1 *and* over HTTP/2 (ALPN h2) and requires the same
//! status from both.
//!
//! Needs `schemathesis` on PATH (`.ci/run` installs it; `pip install schemathesis`), or
//! its path in `SCHEMATHESIS`.
#![allow(clippy::unwrap_used)]

mod harness;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use harness::upstream::{Upstream, enroll};
use harness::*;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");

/// Examples per operation and phase; schemathesis adds its coverage cases on top.
const MAX_EXAMPLES: &str = "40";

struct Run {
    generated: usize,
    output: String,
    /// Test case id (sent as `X-Schemathesis-TestCaseId`) to its generation mode.
    modes: HashMap<String, String>,
    /// Test case ids whose `negative_data_rejection` check schemathesis passed.
    rejection_ok: std::collections::HashSet<String>,
}

/// Case ids whose `negative_data_rejection` check passed, from a report's `checks` maps.
fn rejection_passed(v: &serde_json::Value, out: &mut std::collections::HashSet<String>) {
    match v {
        serde_json::Value::Object(o) => {
            if let Some(serde_json::Value::Object(checks)) = o.get("checks") {
                for (id, list) in checks {
                    let passed = list.as_array().is_some_and(|l| {
                        l.iter().any(|c| c["name"] == "negative_data_rejection" && c["status"] == "success")
                    });
                    if passed {
                        out.insert(id.clone());
                    }
                }
            }
            o.values().for_each(|x| rejection_passed(x, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| rejection_passed(x, out)),
        _ => {}
    }
}

/// Collects `{"id": .., "meta": {"generation": {"mode": ..}}}` from a report event.
fn case_modes(v: &serde_json::Value, out: &mut HashMap<String, String>) {
    match v {
        serde_json::Value::Object(o) => {
            if let (Some(id), Some(mode)) = (
                o.get("id").and_then(|i| i.as_str()),
                v.pointer("/meta/generation/mode").and_then(|m| m.as_str()),
            ) {
                out.insert(id.to_owned(), mode.to_owned());
            }
            o.values().for_each(|x| case_modes(x, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| case_modes(x, out)),
        _ => {}
    }
}

/// Runs schemathesis against `url` (the device port, or a bridge to it).
fn schemathesis(s: &Server, spec: &Path, url: &str, mode: &str, cert: &Path, key: &Path) -> Run {
    let (root, _) = s.ca_files();
    let bin = std::env::var("SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".into());
    let reports = tempfile::tempdir().unwrap();
    let check = if mode == "positive" { "positive_data_acceptance" } else { "negative_data_rejection" };
    let out = Command::new(&bin)
        .arg("run")
        .arg(spec)
        .args(["--url", url])
        .arg("--request-cert")
        .arg(cert)
        .arg("--request-cert-key")
        .arg(key)
        .arg("--tls-verify")
        .arg(&root)
        .args(["--mode", mode, "--checks", &format!("{check},not_a_server_error"), "-n", MAX_EXAMPLES])
        .args(["--no-color", "--request-timeout", "10", "--report", "ndjson", "--report-dir"])
        .arg(reports.path())
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin} ({e}); install it with `pip install schemathesis`"));
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "schemathesis --mode {mode} on {} found problems:\n{output}",
        spec.display()
    );
    // "  453 generated, 453 passed"
    let generated = output
        .lines()
        .find_map(|l| l.trim().strip_suffix(" passed").and_then(|l| l.split_once(" generated")))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no test-case count in schemathesis output:\n{output}"));
    let mut modes = HashMap::new();
    let mut rejection_ok = std::collections::HashSet::new();
    for entry in std::fs::read_dir(reports.path()).unwrap() {
        for line in std::fs::read_to_string(entry.unwrap().path()).unwrap().lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                case_modes(&v, &mut modes);
                rejection_passed(&v, &mut rejection_ok);
            }
        }
    }
    Run { generated, output, modes, rejection_ok }
}

#[test]
fn schemathesis_finds_no_false_positive_and_no_invalid_request_gets_through() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    // The telemetry document without its Portcullis policy (identity binding, groups,
    // log mode): schemathesis cannot know which device it is, and shadow mode forwards
    // invalid requests on purpose.
    let telemetry = dir.path().join("telemetry.yaml");
    let text = std::fs::read_to_string(format!("{EXAMPLES}/telemetry.openapi.yaml")).unwrap();
    let policy_free: String =
        text.lines().filter(|l| !l.contains("x-portcullis-")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&telemetry, policy_free).unwrap();
    let inventory = format!("{EXAMPLES}/inventory.openapi.json");
    let config = format!(
        r#"
[[gateway.routes]]
prefix = "/api/"
upstream = "http://{up}"
openapi = "{telemetry}"
strict_query = true

[[gateway.routes]]
prefix = "/inv/"
upstream = "http://{up}"
openapi = "{inventory}"
strict_query = true
"#,
        up = up.addr,
        telemetry = telemetry.display(),
    );
    let s = Server::start_logged(dir, &config, None);
    let (cert, key) = enroll(&s, "conformance-01", "testers");

    let bridge = Bridge::start(&s, &cert, &key);
    let specs = [(telemetry.clone(), "/api"), (Path::new(&inventory).to_owned(), "/inv/v2")];
    for ((spec, base), bridged) in specs.iter().flat_map(|c| [(c.clone(), false), (c.clone(), true)]) {
        // Through the bridge every request reaches the device port twice.
        let (url, times, how) = if bridged {
            (format!("http://{}{base}", bridge.addr), 2, "over HTTP/1.1 and HTTP/2")
        } else {
            (format!("{}{base}", s.url()), 1, "over HTTP/1.1")
        };
        let before = up.count();
        let run = schemathesis(&s, &spec, &url, "positive", &cert, &key);
        let forwarded = up.count() - before;
        assert!(run.generated >= 20, "too few cases to mean anything:\n{}", run.output);
        assert_eq!(
            forwarded,
            times * run.generated,
            "every valid request must reach the upstream exactly once {how} ({}):\n{}",
            spec.display(),
            run.output
        );

        let before = up.count();
        let run = schemathesis(&s, &spec, &url, "negative", &cert, &key);
        assert!(run.generated >= 20, "too few cases to mean anything:\n{}", run.output);
        let negative = run.modes.values().filter(|m| *m == "negative").count();
        assert!(negative >= 20, "too few negative cases ({negative}):\n{}", run.output);
        // Some mutations do not survive serialisation (an extra query key whose value is
        // an empty list is not sent at all): the request on the wire is valid, and
        // schemathesis, seeing the 2xx, accepts it as such. Every other case generated as
        // invalid must never reach the upstream.
        let seen = up.seen.lock().unwrap()[before..].to_vec();
        let mut lost_mutations = 0;
        let leaked: Vec<String> = seen
            .iter()
            .filter(|r| {
                let id =
                    r.headers.get("x-schemathesis-testcaseid").and_then(|v| v.to_str().ok()).unwrap_or("");
                let negative = run.modes.get(id).is_none_or(|m| m == "negative");
                if negative && run.rejection_ok.contains(id) {
                    lost_mutations += 1;
                    return false;
                }
                negative
            })
            .map(|r| format!("{} {} {}", r.method, r.path, String::from_utf8_lossy(&r.body)))
            .collect();
        assert!(
            leaked.is_empty(),
            "invalid requests reached the upstream ({}): {leaked:#?}\n{}",
            spec.display(),
            run.output
        );
        eprintln!(
            "{} {how}: {forwarded} positive cases all forwarded; {} cases in negative mode, {negative} generated \
             invalid, none forwarded ({lost_mutations} whose mutation was lost on the wire and {} marked positive were)",
            spec.display(),
            run.generated,
            seen.len() - lost_mutations
        );
    }
    let pairs = bridge.pairs.lock().unwrap();
    let differ: Vec<_> = pairs.iter().filter(|(_, h1, h2)| h1 != h2).collect();
    assert!(pairs.len() >= 100, "the bridge saw only {} requests", pairs.len());
    assert!(differ.is_empty(), "statuses differ between HTTP/1.1 and HTTP/2 (request, h1, h2): {differ:#?}");
    eprintln!(
        "{} requests through the bridge: the same status over HTTP/1.1 and HTTP/2 for each",
        pairs.len()
    );
}

/// A plain-HTTP front for schemathesis that sends each request on to the device port
/// twice, with the device's certificate: over HTTP/1.1 and over HTTP/2 (ALPN h2), each on
/// a new connection. It answers with the HTTP/2 response and records both statuses.
struct Bridge {
    addr: SocketAddr,
    /// (method and path, HTTP/1.1 status, HTTP/2 status) per request.
    pairs: Arc<Mutex<Vec<(String, u16, u16)>>>,
}

/// Headers that belong to one hop and are not sent on.
const HOP_BY_HOP: [&str; 7] =
    ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade", "host"];

impl Bridge {
    fn start(s: &Server, cert: &Path, key: &Path) -> Self {
        let tls = tls_client_cert(&s.root_pem(), cert, key);
        let device = s.device;
        let pairs: Arc<Mutex<Vec<(String, u16, u16)>>> = Arc::default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let record = pairs.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((tcp, _)) = listener.accept().await else { return };
                    let (tls, record) = (tls.clone(), record.clone());
                    tokio::spawn(async move {
                        let svc =
                            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                                let (tls, record) = (tls.clone(), record.clone());
                                async move {
                                    Ok::<_, std::convert::Infallible>(relay(req, tls, device, record).await)
                                }
                            });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                            .await;
                    });
                }
            });
        });
        Self { addr, pairs }
    }
}

/// Sends one request over both protocols; the HTTP/2 response.
async fn relay(
    req: http::Request<hyper::body::Incoming>,
    tls: Arc<rustls::ClientConfig>,
    device: SocketAddr,
    record: Arc<Mutex<Vec<(String, u16, u16)>>>,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    use http_body_util::BodyExt;
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let target = parts.uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into());
    let build = |uri: String| {
        let mut r = http::Request::builder().method(parts.method.clone()).uri(uri);
        for (name, value) in &parts.headers {
            if !HOP_BY_HOP.contains(&name.as_str()) {
                r = r.header(name, value);
            }
        }
        r.body(http_body_util::Full::new(body.clone())).unwrap()
    };
    let h1 = {
        let mut req = build(target.clone());
        req.headers_mut().insert(http::header::HOST, "localhost".parse().unwrap());
        send(&tls, device, b"http/1.1", req).await
    };
    let h2 = send(&tls, device, b"h2", build(format!("https://localhost:{}{target}", device.port()))).await;
    let status =
        |r: &Result<http::Response<bytes::Bytes>, String>| r.as_ref().map_or(0, |r| r.status().as_u16());
    record.lock().unwrap().push((format!("{} {target}", parts.method), status(&h1), status(&h2)));
    match h2 {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            for name in HOP_BY_HOP {
                parts.headers.remove(name);
            }
            http::Response::from_parts(parts, http_body_util::Full::new(body))
        }
        Err(e) => http::Response::builder().status(599).body(http_body_util::Full::new(e.into())).unwrap(),
    }
}

/// One request on a new TLS connection that negotiated `alpn`; the whole response.
async fn send(
    tls: &Arc<rustls::ClientConfig>,
    device: SocketAddr,
    alpn: &[u8],
    req: http::Request<http_body_util::Full<bytes::Bytes>>,
) -> Result<http::Response<bytes::Bytes>, String> {
    use http_body_util::BodyExt;
    let mut cfg = (**tls).clone();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(device).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(alpn), "ALPN not negotiated");
    let io = hyper_util::rt::TokioIo::new(stream);
    let resp = if alpn == b"h2" {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        send.send_request(req).await.map_err(|e| format!("h2: {e:?}"))?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        send.send_request(req).await.map_err(|e| format!("h1: {e:?}"))?
    };
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(http::Response::from_parts(parts, body))
}
