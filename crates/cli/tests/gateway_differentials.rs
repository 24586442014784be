//! What the gateway validates must be what the upstream acts on: each test performs an
//! attack on the gap between the gateway's reading of a request and a backend's, against
//! the real binary with curl and an upstream that records what reaches it.
#![allow(clippy::unwrap_used)]

mod harness;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use harness::upstream::{Upstream, enroll};
use harness::*;

/// Device segments are bound by `bind_device` only (no `x-portcullis-bind` in the
/// document), as a route guarding a backend that does not describe identity.
const SPEC: &str = r#"
openapi: 3.0.3
info: {title: differentials, version: "1"}
servers: [{url: /api}]
paths:
  /devices/{device}/telemetry:
    parameters:
      - {name: device, in: path, required: true, schema: {type: string}}
    get:
      responses: {'200': {description: ok}}
  /devices/{device}/config:
    parameters:
      - {name: device, in: path, required: true, schema: {type: string}}
    post:
      requestBody:
        required: true
        content:
          application/json:
            schema:
              type: object
              properties:
                interval: {type: integer, minimum: 10, maximum: 3600}
    put:
      requestBody:
        required: true
        content:
          application/x-www-form-urlencoded:
            schema:
              type: object
              required: [interval]
              properties:
                interval: {type: integer, minimum: 10, maximum: 3600}
  /devices/{device}/note:
    parameters:
      - {name: device, in: path, required: true, schema: {type: string}}
    post:
      requestBody:
        required: true
        content:
          application/json:
            schema:
              type: object
              properties:
                interval: {type: integer, maximum: 3600}
                text: {type: string, pattern: '^[a-z ]*$'}
  /{section}/admin:
    parameters:
      - {name: section, in: path, required: true, schema: {type: string}}
    get:
      responses: {'200': {description: ok}}
"#;

const FORM_LIMIT: usize = 1024 * 1024;

fn config(up: SocketAddr, spec: &Path) -> String {
    format!(
        r#"
[[gateway.routes]]
prefix = "/api/"
upstream = "http://{up}"
openapi = "{spec}"
max_body_bytes = {FORM_LIMIT}
bind_device = ["/api/devices/{{device}}"]

[[gateway.routes]]
prefix = "/legacy/"
upstream = "http://{up}"
allow_override_headers = true
"#,
        spec = spec.display()
    )
}

fn start() -> (Upstream, Server, (std::path::PathBuf, std::path::PathBuf)) {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("api.yaml");
    std::fs::write(&spec, SPEC).unwrap();
    let s = Server::start_with_config(&config(up.addr, &spec));
    let cam = enroll(&s, "cam-01", "cameras");
    // The document must outlive the server's start; the server has read it.
    drop(dir);
    (up, s, cam)
}

#[track_caller]
fn refused(r: &CurlResult, status: u16, detail: &str) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.detail().contains(detail), "expected {detail:?} in {:?}", r.detail());
}

#[test]
fn paths_a_backend_would_read_differently_are_refused() {
    let (up, s, (cert, key)) = start();
    let get = |path: &str| curl_mtls(&s, &cert, &key, path, &["--path-as-is"]);

    // The canonical forms: the caller's own device passes, another device is refused.
    assert_eq!(get("/api/devices/cam-01/telemetry").status, 200);
    assert_eq!(up.last().path, "/api/devices/cam-01/telemetry");
    refused(
        &get("/api/devices/cam-02/telemetry"),
        403,
        "path names device \"cam-02\" but the caller is cam-01",
    );
    let before = up.count();

    // `%64evices` is `devices` to the OpenAPI matcher and to most backends; the binding
    // compared it raw and let cam-01 speak for cam-02.
    refused(&get("/api/%64evices/cam-02/telemetry"), 400, "percent-encoded unreserved character");
    refused(&get("/api/devices/cam%2D02/telemetry"), 400, "percent-encoded unreserved character");
    // Path parameters: Tomcat and Spring strip `;x` and see /api/devices/cam-02.
    refused(&get("/api/devices;x/cam-02/telemetry"), 400, "path parameters (';')");
    refused(&get("/api/devices/cam-02;jsessionid=1/telemetry"), 400, "path parameters (';')");
    // `..;` is a dot segment to Tomcat: /api/..;/admin is /admin there.
    refused(&get("/api/..;/admin"), 400, "path parameters (';')");
    refused(&get("/api/%2e%2e/admin"), 400, "encoded '/', '\\', '.' or ';'");
    refused(&get("/api/devices/cam-01%00/telemetry"), 400, "encoded control character");
    refused(&get("/api/devices/cam-01/telemetry%zz"), 400, "malformed percent escape");
    assert_eq!(up.count(), before, "a refused path reached the upstream");

    // Escapes of characters that mean the same to everyone are decoded for the binding:
    // a device segment that decodes to something else than the caller is refused.
    refused(&get("/api/devices/cam-01%20/telemetry"), 403, "path names device \"cam-01 \"");
    assert_eq!(up.count(), before);
}

#[test]
fn duplicate_json_keys_and_content_types_are_refused() {
    let (up, s, (cert, key)) = start();
    let post = |path: &str, body: &str, types: &[&str]| {
        let mut args: Vec<&str> = vec!["--data-binary", body];
        for t in types {
            args.extend(["-H", t]);
        }
        curl_mtls(&s, &cert, &key, path, &args)
    };
    let json = ["Content-Type: application/json"];

    assert_eq!(post("/api/devices/cam-01/config", r#"{"interval": 60}"#, &json).status, 200);
    let before = up.count();
    // Last-wins validation would pass 60; a first-wins backend would store 999999.
    // The schema's fast path (config) and the general validator (note) alike.
    for path in ["/api/devices/cam-01/config", "/api/devices/cam-01/note"] {
        let r = post(path, r#"{"interval": 999999, "interval": 60}"#, &json);
        refused(&r, 400, "duplicate object key \"interval\"");
        let r = post(path, r#"{"interval": 60, "interval": 60}"#, &json);
        refused(&r, 400, "duplicate object key \"interval\"");
        // Spelled differently, the same key.
        let r = post(path, r#"{"interval": 60, "\u0069nterval": 999999}"#, &json);
        refused(&r, 400, "duplicate object key \"interval\"");
    }
    // Two Content-Types: validated under the first, read by a last-wins backend as the second.
    let r = post(
        "/api/devices/cam-01/config",
        r#"{"interval": 60}"#,
        &["Content-Type: application/json", "Content-Type: application/x-www-form-urlencoded"],
    );
    refused(&r, 400, "Content-Type is given more than once");
    // Also where no document is checked.
    let r = post("/legacy/x", "a", &["Content-Type: text/plain", "Content-Type: application/json"]);
    refused(&r, 400, "Content-Type is given more than once");
    assert_eq!(up.count(), before, "a refused request reached the upstream");
}

#[test]
fn headers_backends_normalise_or_trust_never_reach_them() {
    let (up, s, (cert, key)) = start();
    let spoofs = [
        "X_Portcullis_Device: cam-99",
        "X_Portcullis_Group: admins",
        "X_Forwarded_For: 203.0.113.9",
        "X-Real-IP: 203.0.113.9",
        "X_Real_IP: 203.0.113.9",
        "True-Client-IP: 203.0.113.9",
        "CF-Connecting-IP: 203.0.113.9",
        "X-Client-IP: 203.0.113.9",
        "X-HTTP-Method-Override: DELETE",
        "X-HTTP-Method: DELETE",
        "X-Method-Override: DELETE",
        "X-Original-URL: /admin",
        "X-Rewrite-URL: /admin",
        "X-Kept: yes",
    ];
    let mut args = Vec::new();
    for h in spoofs {
        args.extend(["-H", h]);
    }
    let r = curl_mtls(&s, &cert, &key, "/api/devices/cam-01/telemetry", &args);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let seen = up.last().headers;
    let mut names: Vec<&str> = seen.keys().map(|k| k.as_str()).collect();
    names.sort();
    for name in &names {
        let mapped = name.replace('_', "-");
        assert!(
            !mapped.starts_with("x-portcullis-") || seen[*name] == "cam-01" || seen[*name] == "cameras",
            "{name} reached the upstream: {names:?}"
        );
        assert!(
            !["x-real-ip", "true-client-ip", "cf-connecting-ip", "x-client-ip"].contains(&mapped.as_str()),
            "{name} reached the upstream"
        );
        assert!(
            !mapped.contains("override") && !mapped.contains("-url") && mapped != "x-http-method",
            "{name}"
        );
    }
    assert_eq!(seen["x-portcullis-device"], "cam-01");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-kept"], "yes");
    assert!(!names.iter().any(|n| n.contains('_')), "{names:?}");

    // A route that opts in keeps the override headers (and still strips the rest).
    let r = curl_mtls(&s, &cert, &key, "/legacy/x", &args);
    assert_eq!(r.status, 200);
    let seen = up.last().headers;
    assert_eq!(seen["x-http-method-override"], "DELETE");
    assert_eq!(seen["x-original-url"], "/admin");
    assert!(seen.get("x_portcullis_device").is_none() && seen.get("x-real-ip").is_none());
}

#[test]
fn a_form_of_many_fields_is_checked_in_linear_time() {
    let (up, s, (cert, key)) = start();
    // The largest body the route allows, made of distinct empty fields.
    let mut body = String::with_capacity(FORM_LIMIT);
    let mut i = 0;
    while body.len() + 32 < FORM_LIMIT {
        body.push_str(&format!("a{i}=&"));
        i += 1;
    }
    body.push_str("interval=60");
    let file = s.path("form.txt");
    std::fs::write(&file, &body).unwrap();
    let data = format!("@{}", file.display());
    let form = ["-X", "PUT", "-H", "Content-Type: application/x-www-form-urlencoded", "--data-binary", &data];
    let started = Instant::now();
    let r = curl_mtls(&s, &cert, &key, "/api/devices/cam-01/config", &form);
    let took = started.elapsed();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(up.last().body.len(), body.len());
    println!("form body of {} bytes, {} fields: answered in {took:?} (debug build)", body.len(), i + 1);

    // The same fields with the value out of range: refused after the same work.
    let bad = body.replace("interval=60", "interval=999999");
    std::fs::write(&file, &bad).unwrap();
    let r = curl_mtls(&s, &cert, &key, "/api/devices/cam-01/config", &form);
    refused(&r, 400, "interval");
}

/// Over HTTP/1.1 a second `Host`, or a `Host` naming another host than an absolute-form
/// target, makes the target host ambiguous: 400, nothing forwarded (HTTP/2's `host` against
/// `:authority` is in http2_attacks.rs).
#[test]
fn ambiguous_hosts_are_refused() {
    use std::io::{Read, Write};
    let (up, s, (cert, key)) = start();
    let send = |head: &str| {
        let cfg = tls_client_cert(&s.root_pem(), &cert, &key);
        let conn = rustls::ClientConnection::new(cfg, "localhost".try_into().unwrap()).unwrap();
        let tcp = std::net::TcpStream::connect(s.device).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes()).unwrap();
        let mut answer = Vec::new();
        let _ = tls.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    };
    let path = "/api/devices/cam-01/telemetry";
    for (what, head) in [
        (
            "two Host headers",
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nHost: upstream.internal\r\n"),
        ),
        (
            "absolute form, another Host",
            format!("GET https://localhost{path} HTTP/1.1\r\nHost: upstream.internal\r\n"),
        ),
    ] {
        let answer = send(&head);
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer}");
        assert!(answer.contains("ambiguous-host"), "{what}: {answer}");
    }
    assert_eq!(up.count(), 0, "forwarded: {:?}", up.last());
    // The same request with one Host that agrees is forwarded.
    let answer = send(&format!("GET https://localhost{path} HTTP/1.1\r\nHost: LOCALHOST\r\n"));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(up.count(), 1);
}
