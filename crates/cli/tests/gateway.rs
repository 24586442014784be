//! The gateway on the device port, against a real upstream that records what reaches it,
//! driven with curl and client certificates.
#![allow(clippy::unwrap_used)]

mod harness;

use std::net::SocketAddr;
use std::time::Duration;

use harness::upstream::{Upstream, enroll};
use harness::*;
use portcullis_core::{DeviceId, Token};

fn config(up: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[[gateway.routes]]
prefix = "/api/"
upstream = "http://{up}"
max_body_bytes = 100
client_cert_header = true
bind_device = ["/api/devices/{{device}}"]

[[gateway.routes]]
prefix = "/api/v2/"
upstream = "http://{up}/base"

[[gateway.routes]]
prefix = "/cams/"
upstream = "http://{up}"
groups = ["cameras"]

[[gateway.routes]]
prefix = "/limited/"
upstream = "http://{up}"
rate_limit = {{ per_second = 0.5, burst = 2 }}

[[gateway.routes]]
prefix = "/slow"
upstream = "http://{up}"
timeout = "1s"

[[gateway.routes]]
prefix = "/dead/"
upstream = "http://127.0.0.1:1"

[[gateway.routes]]
prefix = "/close"
upstream = "http://{up}"
{extra}
"#
    )
}

#[test]
fn authenticated_requests_are_forwarded_with_a_trusted_identity() {
    let up = Upstream::start();
    let s = Server::start_with_config(&config(up.addr, ""));
    let (cam, cam_key) = enroll(&s, "cam-01", "cameras");
    let (root, _) = s.ca_files();

    // No certificate: 401, nothing reaches the upstream.
    let r = curl(&["--cacert", root.to_str().unwrap()], &format!("{}/api/x", s.url()));
    assert_eq!(r.status, 401);
    assert_eq!(up.count(), 0);

    // A device, trying to spoof identity headers: forwarded with the real ones only.
    let r = curl_mtls(
        &s,
        &cam,
        &cam_key,
        "/api/devices/cam-01/telemetry?x=1",
        &[
            "-H",
            "X-Portcullis-Device: cam-99",
            "-H",
            "X-Portcullis-Group: admins",
            "-H",
            "X-Forwarded-For: 203.0.113.9",
            "-H",
            "Forwarded: for=203.0.113.9",
            "-H",
            "Client-Cert: :Zm9v:",
            "-H",
            "Content-Type: application/json",
            "--data",
            "{\"t\":21}",
        ],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["upstream"], true);
    let seen = up.last();
    assert_eq!(seen.path, "/api/devices/cam-01/telemetry?x=1");
    assert_eq!(seen.headers["x-portcullis-device"], "cam-01");
    assert_eq!(seen.headers["x-portcullis-group"], "cameras");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert!(seen.headers.get("forwarded").is_none());
    assert_eq!(seen.headers.get_all("x-portcullis-device").iter().count(), 1);
    let cc = seen.headers["client-cert"].to_str().unwrap();
    assert!(cc.starts_with(':') && cc.ends_with(':') && cc.len() > 100, "{cc}");
    assert_ne!(cc, ":Zm9v:");
    assert_eq!(&seen.body[..], b"{\"t\":21}");

    // Identity binding: cam-01 may not speak for cam-02.
    let before = up.count();
    let r = curl_mtls(&s, &cam, &cam_key, "/api/devices/cam-02/telemetry", &["--data", "{}"]);
    assert_eq!(r.status, 403);
    assert!(r.detail().contains("path names device \"cam-02\" but the caller is cam-01"), "{}", r.detail());
    assert_eq!(up.count(), before);

    // HTTP/2 by ALPN, forwarded upstream as HTTP/1.1 with the same identity.
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", "--http2", "--cacert"])
        .arg(&root)
        .arg("--cert")
        .arg(&cam)
        .arg("--key")
        .arg(&cam_key)
        .arg(format!("{}/api/h2", s.url()))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 2");
    assert_eq!(up.last().path, "/api/h2");
    assert_eq!(up.last().headers["x-portcullis-device"], "cam-01");

    // Longest prefix wins, and the upstream base path is kept.
    assert_eq!(curl_mtls(&s, &cam, &cam_key, "/api/v2/ping", &[]).status, 200);
    assert_eq!(up.last().path, "/base/api/v2/ping");
    // Built-in routes still answer beside the gateway.
    let crl = curl(&["--cacert", root.to_str().unwrap()], &format!("{}/crl.pem", s.url()));
    assert_eq!(crl.status, 200);
    assert_eq!(curl_mtls(&s, &cam, &cam_key, "/portcullis/whoami", &[]).status, 200);
}

#[test]
fn each_rejection_has_its_status_and_reaches_nothing() {
    let up = Upstream::start();
    let s = Server::start_with_config(&config(up.addr, ""));
    let (cam, cam_key) = enroll(&s, "cam-02", "cameras");
    let (th, th_key) = enroll(&s, "thermo-01", "sensors");
    let before = up.count();

    let r = curl_mtls(&s, &cam, &cam_key, "/nowhere", &[]);
    assert_eq!(r.status, 404);
    assert!(r.detail().contains("no route"));
    let r = curl_mtls(&s, &th, &th_key, "/cams/x", &[]);
    assert_eq!(r.status, 403);
    assert!(r.detail().contains("group sensors may not use route /cams/"), "{}", r.detail());
    let big = "x".repeat(101);
    let r = curl_mtls(&s, &cam, &cam_key, "/api/x", &["--data", &big]);
    assert_eq!(r.status, 413);
    let r = curl_mtls(&s, &cam, &cam_key, "/api/../admin", &["--path-as-is"]);
    assert_eq!(r.status, 400);
    let r = curl_mtls(&s, &cam, &cam_key, "/api/a%2F..%2Fb", &["--path-as-is"]);
    assert_eq!(r.status, 400);
    assert_eq!(up.count(), before, "a rejected request reached the upstream");

    // Rate limit: burst of 2, then 429 with Retry-After.
    assert_eq!(curl_mtls(&s, &cam, &cam_key, "/limited/a", &[]).status, 200);
    assert_eq!(curl_mtls(&s, &cam, &cam_key, "/limited/a", &[]).status, 200);
    let hdr = s.path("hdr.txt");
    let r = curl_mtls(&s, &cam, &cam_key, "/limited/a", &["-D", hdr.to_str().unwrap()]);
    assert_eq!(r.status, 429);
    let headers = std::fs::read_to_string(&hdr).unwrap().to_ascii_lowercase();
    assert!(headers.contains("retry-after: 2"), "{headers}");
    // Another device has its own budget.
    assert_eq!(curl_mtls(&s, &th, &th_key, "/limited/a", &[]).status, 200);

    // Upstream down: 502; too slow: 504.
    let r = curl_mtls(&s, &cam, &cam_key, "/dead/x", &[]);
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["status"], 502);
    let r = curl_mtls(&s, &cam, &cam_key, "/slow", &[]);
    assert_eq!(r.status, 504);

    // Counters per route and reason.
    let routes = s.cli_ok(&["gateway", "routes", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&routes).unwrap();
    let limited = v["routes"].as_array().unwrap().iter().find(|r| r["prefix"] == "/limited/").unwrap();
    assert_eq!(limited["counts"]["forwarded"], 3);
    assert_eq!(limited["counts"]["rate_limited"], 1);
    let table = s.cli_ok(&["gateway", "routes"]);
    assert!(table.contains("group_denied=1"), "{table}");
    let metrics = s.metrics_now();
    for line in [
        r#"portcullis_gateway_requests_total{route="/limited/",outcome="rate_limited"} 1"#,
        r#"portcullis_gateway_requests_total{route="/limited/",outcome="forwarded"} 3"#,
        r#"portcullis_gateway_requests_total{route="/cams/",outcome="group_denied"} 1"#,
        r#"portcullis_gateway_requests_total{route="none",outcome="no_route"} 1"#,
        r#"portcullis_gateway_requests_total{route="/dead/",outcome="upstream_error"} 1"#,
        r#"portcullis_gateway_request_duration_seconds_count{route="/limited/"} 4"#,
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_applies_to_an_open_keep_alive_connection() {
    let up = Upstream::start();
    let s = Server::start_with_config(&config(up.addr, ""));
    let token = s.add_device("cam-03", &["--group", "cameras"]);
    let dir = s.path("cam-03");
    let root = s.root_pem();
    portcullis_agent::enroll(
        &s.url(),
        &root,
        &DeviceId::try_new("cam-03").unwrap(),
        &Token::from_presented(&token),
        &dir,
    )
    .await
    .unwrap();
    let agent = portcullis_agent::AgentDir::open(&dir).unwrap();
    let client =
        portcullis_agent::EstClient::new(&s.url(), &root, Some(agent.identity_pem().unwrap())).unwrap();
    let mut conn = client.open().await.unwrap();
    assert_eq!(conn.get("/api/one").await.unwrap().0, 200);
    let forwarded = up.count();
    s.cli_ok(&["device", "revoke", "cam-03"]);
    let (status, body) = conn.get("/api/two").await.unwrap();
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    assert_eq!(up.count(), forwarded, "a revoked device's request reached the upstream");
}

#[test]
fn reload_by_signal_and_api_keeps_old_routes_on_error() {
    let up = Upstream::start();
    let s = Server::start_with_config(&config(up.addr, ""));
    let (cam, cam_key) = enroll(&s, "cam-04", "cameras");
    assert_eq!(curl_mtls(&s, &cam, &cam_key, "/new/x", &[]).status, 404);
    let cfg_path = s.path("portcullis.toml");

    // Add a route and send SIGHUP.
    let extra = format!("\n[[gateway.routes]]\nprefix = \"/new/\"\nupstream = \"http://{}\"\n", up.addr);
    std::fs::write(&cfg_path, config(up.addr, &extra)).unwrap();
    let pid = s.child.as_ref().unwrap().id().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let mut ok = false;
    for _ in 0..50 {
        if curl_mtls(&s, &cam, &cam_key, "/new/x", &[]).status == 200 {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "SIGHUP did not load the new route");

    // A broken config: the API reports why, and every route keeps serving.
    std::fs::write(
        &cfg_path,
        config(up.addr, "\n[[gateway.routes]]\nprefix = \"/bad/\"\nupstream = \"ftp://x\"\n"),
    )
    .unwrap();
    let out = s.cli(&["gateway", "reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("previous routes keep serving") && err.contains("/bad/"), "{err}");
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(curl_mtls(&s, &cam, &cam_key, "/new/x", &[]).status, 200);

    // A good config through the API.
    std::fs::write(&cfg_path, config(up.addr, "")).unwrap();
    assert!(s.cli_ok(&["gateway", "reload"]).contains("reloaded: 7 routes"));
    assert_eq!(curl_mtls(&s, &cam, &cam_key, "/new/x", &[]).status, 404);
}

#[test]
fn floods_from_one_address_are_throttled_before_any_work() {
    let up = Upstream::start();
    let extra = "\n[device]\nhandshakes_per_ip = { per_second = 0.2, burst = 6 }\n\n[gateway]\nunauthenticated_per_ip = { per_second = 0.2, burst = 2 }\n";
    // [device] and [gateway] must come before the route tables in TOML.
    let s = Server::start_with_config(&format!("{extra}{}", config(up.addr, "")));
    let (root, _) = s.ca_files();
    let url = format!("{}/api/x", s.url());
    let no_cert = || curl(&["--cacert", root.to_str().unwrap()], &url);
    // Unauthenticated: two 401s, then 429 with Retry-After; nothing forwarded.
    assert_eq!(no_cert().status, 401);
    assert_eq!(no_cert().status, 401);
    let r = no_cert();
    assert_eq!(r.status, 429);
    assert!(r.detail().contains("unauthenticated"), "{}", r.detail());
    assert_eq!(up.count(), 0);
    // Handshakes: the burst of 6 is spent (3 above + the CLI uses none); the next
    // connections are closed before TLS.
    let mut refused = 0;
    for _ in 0..6 {
        if no_cert().status == 0 {
            refused += 1;
        }
    }
    assert!(refused >= 3, "only {refused} of 6 connections over the handshake limit were closed");
}

#[test]
fn forwarding_headers_are_the_gateways_in_the_configured_form() {
    let up = Upstream::start();
    let extra = format!(
        "\n[[gateway.routes]]\nprefix = \"/std/\"\nupstream = \"http://{0}\"\nforwarded = \"rfc7239\"\n\
         \n[[gateway.routes]]\nprefix = \"/quiet/\"\nupstream = \"http://{0}\"\nforwarded = \"none\"\n",
        up.addr
    );
    let s = Server::start_with_config(&config(up.addr, &extra));
    let (cam, key) = enroll(&s, "cam-05", "cameras");
    let spoof = ["-H", "Forwarded: for=203.0.113.9", "-H", "X-Forwarded-For: 203.0.113.9"];
    assert_eq!(curl_mtls(&s, &cam, &key, "/std/x", &spoof).status, 200);
    let seen = up.last();
    assert_eq!(seen.headers["forwarded"], "for=127.0.0.1;proto=https");
    assert_eq!(seen.headers.get_all("forwarded").iter().count(), 1);
    assert!(seen.headers.get("x-forwarded-for").is_none());
    assert_eq!(curl_mtls(&s, &cam, &key, "/quiet/x", &spoof).status, 200);
    let seen = up.last();
    assert!(seen.headers.get("forwarded").is_none() && seen.headers.get("x-forwarded-for").is_none());
    assert_eq!(seen.headers["x-portcullis-device"], "cam-05");
}

#[test]
fn upstream_connections_are_pooled_and_closed_ones_replaced() {
    let up = Upstream::start();
    let s = Server::start_with_config(&config(up.addr, ""));
    let (cam, cam_key) = enroll(&s, "cam-01", "cameras");
    let (root, _) = s.ca_files();
    // One client connection (curl reuses it for every URL), so one device-port worker:
    // twenty requests, then one the upstream answers with `Connection: close`, then one more.
    let mut paths: Vec<String> = (0..20).map(|i| format!("/api/pool/{i}")).collect();
    paths.extend(["/close/1".to_owned(), "/api/after-close".to_owned()]);
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "-w", "%{http_code} %{num_connects}\\n", "--cacert"])
        .arg(&root)
        .arg("--cert")
        .arg(&cam)
        .arg("--key")
        .arg(&cam_key);
    for p in &paths {
        cmd.args(["-o", "/dev/null"]).arg(format!("{}{p}", s.url()));
    }
    let out = cmd.output().unwrap();
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 22, "{lines:?}");
    assert!(lines.iter().all(|l| l.starts_with("200 ")), "{lines:?}");
    assert_eq!(lines.iter().filter(|l| l.ends_with(" 1")).count(), 1, "curl reconnected: {lines:?}");
    assert_eq!(up.count(), 22);
    assert_eq!(up.last().path, "/api/after-close");
    // The first twenty share one pooled upstream connection; the close forces one more.
    assert_eq!(up.connections(), 2);
}

/// `portcullis_device_connections{worker="…"}` for each worker, from `/metrics`.
fn open_per_worker(s: &Server, workers: usize) -> Vec<i64> {
    let text = s.metrics_now();
    (0..workers)
        .map(|w| {
            let series = format!("portcullis_device_connections{{worker=\"{w}\"}} ");
            let line =
                text.lines().find(|l| l.starts_with(&series)).unwrap_or_else(|| panic!("{series}: {text}"));
            line[series.len()..].trim().parse().unwrap()
        })
        .collect()
}

/// A TLS connection to the device port that has been served one request and stays open.
fn served_connection(
    s: &Server,
    cfg: &std::sync::Arc<rustls::ClientConfig>,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use std::io::{Read, Write};
    let conn = rustls::ClientConnection::new(cfg.clone(), "localhost".try_into().unwrap()).unwrap();
    let tcp = std::net::TcpStream::connect(s.device).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    stream.write_all(b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200", "{}", String::from_utf8_lossy(&head));
    stream
}

/// Waits up to 10 s for the per-worker connection counts to satisfy `done`; returns them.
fn wait_for_open(s: &Server, workers: usize, done: impl Fn(&[i64]) -> bool) -> Vec<i64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = open_per_worker(s, workers);
        if done(&now) {
            return now;
        }
        assert!(std::time::Instant::now() < deadline, "open connections per worker: {now:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A burst of connections lands on whichever worker wakes first; the port hands each
/// new connection to the worker with the fewest open ones, so long-lived device
/// connections end up spread evenly, and every handed-over connection is served.
#[test]
fn connections_are_spread_evenly_over_the_workers() {
    let s = Server::start_with_config("[device]\nworkers = 3\n");
    let cfg = tls_client(&s.root_pem());
    // Each is served before the next is opened, so each was counted before the next
    // accept.
    let mut open: Vec<_> = (0..9).map(|_| served_connection(&s, &cfg)).collect();
    assert_eq!(open_per_worker(&s, 3), vec![3, 3, 3]);
    // The first two (on two different workers) leave; the next two fill those gaps.
    drop(open.drain(..2));
    let mut counts = wait_for_open(&s, 3, |n| n.iter().sum::<i64>() == 7);
    counts.sort_unstable();
    assert_eq!(counts, vec![2, 2, 3]);
    open.extend((0..2).map(|_| served_connection(&s, &cfg)));
    assert_eq!(open_per_worker(&s, 3), vec![3, 3, 3]);
    drop(open);
    wait_for_open(&s, 3, |n| n == [0, 0, 0]);
}

/// The same requests over HTTP/1.1 and HTTP/2 (ALPN h2) get the same statuses, and every
/// refusal is a problem document over both.
#[test]
fn every_answer_is_the_same_over_http1_and_http2() {
    let up = Upstream::start();
    let s = Server::start_with_config(&config(up.addr, ""));
    let (cam, cam_key) = enroll(&s, "cam-05", "cameras");
    let (th, th_key) = enroll(&s, "thermo-05", "sensors");
    let big = "x".repeat(101);
    let body = s.path("big.bin");
    std::fs::write(&body, &big).unwrap();
    let upload = format!("@{}", body.display());
    let cases: Vec<(&str, bool, Vec<&str>, u16)> = vec![
        ("/api/devices/cam-05/telemetry", false, vec!["--data", "{}"], 200),
        ("/api/devices/cam-06/telemetry", false, vec!["--data", "{}"], 403),
        ("/nowhere", false, vec![], 404),
        ("/cams/x", true, vec![], 403),
        ("/api/x", false, vec!["--data", &big], 413),
        // Streamed without a length (chunked over HTTP/1.1, DATA frames over HTTP/2).
        ("/api/x", false, vec!["-H", "Transfer-Encoding: chunked", "--data-binary", &upload], 413),
        ("/api/../admin", false, vec!["--path-as-is"], 400),
        ("/api/%64evices/cam-06", false, vec!["--path-as-is"], 400),
        ("/dead/x", false, vec![], 502),
        ("/api/devices/cam-05/telemetry", false, vec!["-I"], 200),
        ("/.well-known/est/cacerts", false, vec![], 200),
        ("/crl", false, vec![], 200),
    ];
    for (path, as_sensor, extra, want) in &cases {
        let mut seen = Vec::new();
        for proto in ["--http1.1", "--http2"] {
            let (c, k) = if *as_sensor { (&th, &th_key) } else { (&cam, &cam_key) };
            let mut args = vec![proto];
            args.extend(extra.iter().copied());
            let r = curl_mtls(&s, c, k, path, &args);
            assert_eq!(r.status, *want, "{proto} {path} {extra:?}: {}", String::from_utf8_lossy(&r.body));
            if r.status >= 400 && !extra.contains(&"-I") {
                assert_eq!(r.json()["status"], *want, "{proto} {path}: not a problem document");
            }
            seen.push(r.status);
        }
        assert_eq!(seen[0], seen[1], "{path}");
    }
}
