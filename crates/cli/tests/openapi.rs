//! OpenAPI validation on the gateway: the real binary with the example telemetry
//! document, a recording upstream, curl with device certificates (HTTP/1.1 and HTTP/2).
#![allow(clippy::unwrap_used)]

mod harness;

use std::net::SocketAddr;
use std::path::Path;

use harness::upstream::{Upstream, enroll};
use harness::*;

const SPEC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/telemetry.openapi.yaml");

fn config(up: SocketAddr, spec: &Path) -> String {
    let spec = spec.display();
    format!(
        r#"
[[gateway.routes]]
prefix = "/api/"
upstream = "http://{up}"
openapi = "{spec}"
max_body_bytes = 2048

[[gateway.routes]]
prefix = "/shadow/"
upstream = "http://{up}"
openapi = "{spec}"
openapi_base = "/shadow"
action = "log"
"#
    )
}

const READING: &str =
    r#"{"temperature": 21.5, "humidity": null, "taken_at": "2026-11-25T10:00:00Z", "battery": 80}"#;

fn post_json(body: &str) -> Vec<&str> {
    vec!["-H", "Content-Type: application/json", "--data-binary", body]
}

#[track_caller]
fn problem(r: &CurlResult, status: u16, detail: &str) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.detail().contains(detail), "expected {detail:?} in {:?}", r.detail());
    assert_eq!(r.json()["status"], status);
}

#[test]
fn only_requests_the_document_allows_reach_the_upstream() {
    let up = Upstream::start();
    let s = Server::start_with_config(&config(up.addr, Path::new(SPEC)));
    let (cam, key) = enroll(&s, "cam-01", "cameras");
    let (th, th_key) = enroll(&s, "thermo-01", "sensors");
    let t = "/api/devices/cam-01/telemetry";

    // Valid: forwarded byte for byte with the caller's identity.
    let r = curl_mtls(&s, &cam, &key, t, &post_json(READING));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let seen = up.last();
    assert_eq!((seen.method.as_str(), seen.path.as_str()), ("POST", t));
    assert_eq!(&seen.body[..], READING.as_bytes());
    assert_eq!(seen.headers["x-portcullis-device"], "cam-01");
    let r = curl_mtls(&s, &cam, &key, &format!("{t}?limit=10&fields=temperature&fields=humidity"), &[]);
    assert_eq!(r.status, 200);
    let r = curl_mtls(
        &s,
        &cam,
        &key,
        "/api/devices/cam-01/config",
        &["-X", "PUT", "--data", "interval=60&mode=eco"],
    );
    assert_eq!(r.status, 200, "{}", r.detail());
    let r = curl_mtls(&s, &cam, &key, "/api/firmware/1.2.3", &[]);
    assert_eq!(r.status, 200);
    let forwarded = up.count();
    assert_eq!(forwarded, 4);

    // Every violation: its status, a problem document naming where, nothing forwarded.
    problem(
        &curl_mtls(&s, &cam, &key, "/api/nothing/here", &[]),
        404,
        "no operation of the API matches path",
    );
    let hdr = s.path("405.txt");
    let r = curl_mtls(&s, &cam, &key, t, &["-X", "DELETE", "-D", hdr.to_str().unwrap()]);
    problem(&r, 405, "does not allow DELETE");
    let head = std::fs::read_to_string(&hdr).unwrap().to_ascii_lowercase();
    assert!(head.contains("allow: get, post"), "{head}");
    assert!(head.contains("content-type: application/problem+json"), "{head}");
    problem(
        &curl_mtls(&s, &cam, &key, t, &["-H", "Content-Type: text/plain", "--data", READING]),
        415,
        "Content-Type text/plain is not accepted by postTelemetry",
    );
    let hot = r#"{"temperature": 1000, "taken_at": "2026-11-25T10:00:00Z"}"#;
    let r = curl_mtls(&s, &cam, &key, t, &post_json(hot));
    problem(&r, 400, "body/temperature: 1000 is greater than the maximum of 150");
    assert_eq!(r.json()["invalid-params"][0]["name"], "body/temperature");
    problem(
        &curl_mtls(
            &s,
            &cam,
            &key,
            t,
            &post_json(r#"{"temperature": 1, "taken_at": "2026-11-25T10:00:00Z", "x": 1}"#),
        ),
        400,
        "Additional properties are not allowed ('x' was unexpected)",
    );
    problem(
        &curl_mtls(&s, &cam, &key, t, &post_json(r#"{"temperature": 1}"#)),
        400,
        "\"taken_at\" is a required property",
    );
    problem(&curl_mtls(&s, &cam, &key, t, &post_json("{\"temperature\": ")), 400, "body: not valid JSON");
    problem(&curl_mtls(&s, &cam, &key, t, &["-X", "POST"]), 400, "body: request body is required");
    let big = format!(
        r#"{{"temperature": 1, "taken_at": "2026-11-25T10:00:00Z", "tags": ["{}"]}}"#,
        "a".repeat(3000)
    );
    problem(&curl_mtls(&s, &cam, &key, t, &post_json(&big)), 413, "exceeds the 2048 bytes");
    let mut chunked = post_json(&big);
    chunked.extend(["-H", "Transfer-Encoding: chunked"]);
    problem(&curl_mtls(&s, &cam, &key, t, &chunked), 413, "exceeds the 2048 bytes");
    problem(
        &curl_mtls(&s, &cam, &key, &format!("{t}?limit=1000"), &[]),
        400,
        "query/limit: 1000 is greater than the maximum of 100",
    );
    problem(&curl_mtls(&s, &cam, &key, &format!("{t}?since=yesterday"), &[]), 400, "query/since: ");
    let r = curl_mtls(&s, &cam, &key, t, &["-H", "Cookie: locale=xx-secret"]);
    problem(&r, 400, "cookie/locale: ");
    assert!(!String::from_utf8_lossy(&r.body).contains("xx-secret"), "cookie value echoed");
    let r = curl_mtls(
        &s,
        &cam,
        &key,
        t,
        &[&["-H", "X-Trace-Id: secret-token-123"][..], &post_json(READING)].concat(),
    );
    problem(&r, 400, "header/X-Trace-Id: ");
    assert!(!String::from_utf8_lossy(&r.body).contains("secret-token-123"), "header value echoed");
    problem(
        &curl_mtls(&s, &cam, &key, "/api/devices/cam-01/config", &["-X", "PUT", "--data", "interval=5"]),
        400,
        "body/interval: 5 is less than the minimum of 10",
    );
    // Identity binding and per-operation groups.
    problem(
        &curl_mtls(&s, &cam, &key, "/api/devices/cam-02/telemetry", &post_json(READING)),
        403,
        "path/device must name the calling device (cam-01)",
    );
    problem(
        &curl_mtls(&s, &th, &th_key, "/api/firmware/1.2.3", &[]),
        403,
        "group sensors may not call getFirmware",
    );
    // HTTP/2: bodies are read to the end of the stream before validation.
    let r = curl_mtls(&s, &cam, &key, t, &[&["--http2"][..], &post_json(hot)].concat());
    problem(&r, 400, "body/temperature");
    assert_eq!(up.count(), forwarded, "a violation reached the upstream");
    let r = curl_mtls(&s, &cam, &key, t, &[&["--http2"][..], &post_json(READING)].concat());
    assert_eq!(r.status, 200);
    assert_eq!(&up.last().body[..], READING.as_bytes());

    // An operation in log mode (x-portcullis-action) forwards its violations.
    assert_eq!(curl_mtls(&s, &cam, &key, "/api/status?verbose=maybe", &[]).status, 200);
    assert_eq!(up.last().path, "/api/status?verbose=maybe");

    // Counters by reason, for the operator.
    let metrics = s.metrics_now();
    for line in [
        r#"portcullis_gateway_requests_total{route="/api/",outcome="no_operation"} 1"#,
        r#"portcullis_gateway_requests_total{route="/api/",outcome="method_not_allowed"} 1"#,
        r#"portcullis_gateway_requests_total{route="/api/",outcome="unsupported_media_type"} 1"#,
        r#"portcullis_gateway_requests_total{route="/api/",outcome="body_too_large"} 2"#,
        r#"portcullis_gateway_requests_total{route="/api/",outcome="binding_mismatch"} 1"#,
        r#"portcullis_gateway_requests_total{route="/api/",outcome="group_denied"} 1"#,
        r#"portcullis_gateway_violations_logged_total{route="/api/",outcome="invalid_params"} 1"#,
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    let routes: serde_json::Value =
        serde_json::from_str(&s.cli_ok(&["gateway", "routes", "--json"])).unwrap();
    let api = routes["routes"].as_array().unwrap().iter().find(|r| r["prefix"] == "/api/").unwrap();
    assert_eq!(api["prefix"], "/api/");
    assert_eq!(api["operations"], 5);
    assert_eq!(api["openapi_version"], "3.0.3");
    assert!(api["counts"]["invalid_request"].as_u64().unwrap() >= 10, "{api}");
}

#[test]
fn shadow_mode_forwards_and_records_but_never_skips_authorization() {
    let up = Upstream::start();
    let log = tempfile::tempdir().unwrap();
    let log_path = log.path().join("server.log");
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_logged(dir, &config(up.addr, Path::new(SPEC)), Some(&log_path));
    let (cam, key) = enroll(&s, "cam-01", "cameras");

    let hot = r#"{"temperature": 1000, "taken_at": "2026-11-25T10:00:00Z"}"#;
    let r = curl_mtls(&s, &cam, &key, "/shadow/devices/cam-01/telemetry", &post_json(hot));
    assert_eq!(r.status, 200, "log mode forwards: {}", r.detail());
    assert_eq!(&up.last().body[..], hot.as_bytes());
    let before = up.count();
    let r = curl_mtls(&s, &cam, &key, "/shadow/devices/cam-02/telemetry", &post_json(READING));
    assert_eq!(r.status, 403, "identity binding holds in log mode");
    assert_eq!(up.count(), before);
    // No certificate: still 401.
    let (root, _) = s.ca_files();
    let r = curl(&["--cacert", root.to_str().unwrap()], &format!("{}/shadow/status", s.url()));
    assert_eq!(r.status, 401);
    assert_eq!(up.count(), before);

    let metrics = s.metrics_now();
    let line = r#"portcullis_gateway_violations_logged_total{route="/shadow/",outcome="invalid_body"} 1"#;
    assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        text.lines().any(|l| l.contains("violation forwarded")
            && l.contains("postTelemetry")
            && l.contains("body/temperature: 1000 is greater than the maximum of 150")),
        "no violation line in the log:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("operation=\"postTelemetry\"") && l.contains("violation=\"invalid_body\"")),
        "access log lacks operation and violation:\n{text}"
    );
}

#[test]
fn a_broken_document_is_refused_and_the_previous_routes_keep_serving() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.yaml");
    std::fs::copy(SPEC, &spec).unwrap();
    let s = Server::start_logged(dir, &config(up.addr, &spec), None);
    let (cam, key) = enroll(&s, "cam-01", "cameras");
    let t = "/api/devices/cam-01/telemetry";
    assert_eq!(curl_mtls(&s, &cam, &key, &format!("{t}?limit=1000"), &[]).status, 400);

    std::fs::write(&spec, "openapi: 3.0.3\npaths:\n  /x/{id}:\n    get: {}\n").unwrap();
    let out = s.cli(&["gateway", "reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("path parameter \"id\" of \"/x/{id}\" is not declared"), "{err}");
    assert_eq!(
        curl_mtls(&s, &cam, &key, &format!("{t}?limit=1000"), &[]).status,
        400,
        "old document still enforced"
    );
    assert_eq!(curl_mtls(&s, &cam, &key, &format!("{t}?limit=10"), &[]).status, 200);
}

/// A self-signed CA: its certificate and an issuer for signing with it.
fn private_ca() -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    (cert, rcgen::Issuer::new(params, key))
}

#[test]
fn https_upstreams_are_verified() {
    // A private CA for the upstream, as a backend team would have.
    let (ca, issuer) = private_ca();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let up = Upstream::start_tls(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("backend-ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let (other, _) = private_ca();
    let other_path = dir.path().join("other-ca.pem");
    std::fs::write(&other_path, other.pem()).unwrap();
    let port = up.addr.port();
    let config = format!(
        r#"
[[gateway.routes]]
prefix = "/secure/"
upstream = "https://localhost:{port}"
upstream_ca = "{ca}"

[[gateway.routes]]
prefix = "/untrusted/"
upstream = "https://localhost:{port}"
upstream_ca = "{other}"
"#,
        ca = ca_path.display(),
        other = other_path.display(),
    );
    let s = Server::start_logged(dir, &config, None);
    let (cam, key) = enroll(&s, "cam-01", "cameras");
    let r = curl_mtls(&s, &cam, &key, "/secure/ping", &[]);
    assert_eq!(r.status, 200, "{}", r.detail());
    assert_eq!(up.last().path, "/secure/ping");
    assert_eq!(up.last().headers["x-portcullis-device"], "cam-01");
    let before = up.count();
    let r = curl_mtls(&s, &cam, &key, "/untrusted/ping", &[]);
    assert_eq!(r.status, 502, "an upstream with a certificate we do not trust gets nothing");
    assert_eq!(up.count(), before);
}

/// `HEAD` where the document allows only `GET`: 405 with `Allow` over HTTP/1.1 and
/// HTTP/2 alike (over HTTP/2 the stream used to be reset with no status at all).
#[test]
fn head_is_refused_with_a_status_over_both_protocols() {
    let up = Upstream::start();
    let s = Server::start_with_config(&config(up.addr, Path::new(SPEC)));
    let (cam, key) = enroll(&s, "cam-01", "cameras");
    let (root, _) = s.ca_files();
    for proto in ["--http1.1", "--http2"] {
        let hdr = s.path("head.txt");
        let out = std::process::Command::new("curl")
            .args(["-sS", "-I", "--max-time", "10", proto, "-o"])
            .arg(&hdr)
            .args(["-w", "%{http_code} %{http_version}", "--cacert"])
            .arg(&root)
            .arg("--cert")
            .arg(&cam)
            .arg("--key")
            .arg(&key)
            .arg(format!("{}/api/status", s.url()))
            .output()
            .unwrap();
        let got = String::from_utf8_lossy(&out.stdout).into_owned();
        let want_version = if proto == "--http2" { "2" } else { "1.1" };
        assert_eq!(got, format!("405 {want_version}"), "{proto}: {}", String::from_utf8_lossy(&out.stderr));
        let headers = std::fs::read_to_string(&hdr).unwrap().to_ascii_lowercase();
        assert!(headers.contains("allow: get"), "{proto}: {headers}");
        assert!(headers.contains("content-type: application/problem+json"), "{proto}: {headers}");
        // The length the body would have had, as for GET (RFC 9110 9.3.2).
        let len: usize = headers
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{proto}: no content-length in {headers}"));
        assert!(len > 50, "{proto}: {headers}");
    }
    assert_eq!(up.count(), 0);
}
