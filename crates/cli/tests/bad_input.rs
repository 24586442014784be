//! One test per hostile input: each gets a precise 4xx, issues nothing, changes nothing,
//! and the server keeps serving.

#![allow(clippy::unwrap_used)]

mod harness;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::*;

/// Enrolls a fresh device with a valid CSR, to prove the server still serves.
fn still_serving(s: &Server, id: &str) {
    let token = s.add_device(id, &[]);
    let (_, csr) = openssl_csr(s.dir.path(), id, &p256(), &[]);
    let r = curl_enroll(s, id, &token, b64(&std::fs::read(&csr).unwrap()).as_bytes());
    assert_eq!(r.status, 200, "server stopped serving: {}", String::from_utf8_lossy(&r.body));
}

fn valid_body(s: &Server, name: &str) -> Vec<u8> {
    let (_, csr) = openssl_csr(s.dir.path(), name, &p256(), &[]);
    b64(&std::fs::read(&csr).unwrap()).into_bytes()
}

/// Asserts a refused enrollment: exact status, a detail naming the cause, nothing issued.
fn refused(s: &Server, r: CurlResult, status: u16, detail: &str) {
    assert_eq!(r.status, status, "body: {}", String::from_utf8_lossy(&r.body));
    assert!(r.detail().contains(detail), "detail {:?} lacks {detail:?}", r.detail());
    assert_eq!(r.json()["status"], status);
    let _ = s;
}

#[test]
fn token_failures() {
    let s = Server::start();
    let token = s.add_device("cam-1", &[]);
    let other = s.add_device("cam-2", &[]);
    let body = valid_body(&s, "cam-1");
    let before = s.certificate_count_now();

    refused(&s, curl_enroll(&s, "cam-1", "pct_wrong", &body), 401, "invalid device id or enrollment token");
    refused(&s, curl_enroll(&s, "cam-1", &other, &body), 401, "invalid device id or enrollment token");
    refused(
        &s,
        curl_enroll(&s, "no-such-device", &token, &body),
        401,
        "invalid device id or enrollment token",
    );
    refused(&s, curl_enroll(&s, "../etc", &token, &body), 401, "invalid device id or enrollment token");
    assert_eq!(s.certificate_count_now(), before, "a refused enrollment issued a certificate");

    // No credentials at all.
    let (root, _) = s.ca_files();
    let r = curl(
        &["--cacert", root.to_str().unwrap(), "-H", "Content-Type: application/pkcs10", "--data-binary", "x"],
        &format!("{}/.well-known/est/simpleenroll", s.url()),
    );
    refused(&s, r, 401, "HTTP Basic");

    // Used once: fine; twice: refused as reused.
    assert_eq!(curl_enroll(&s, "cam-1", &token, &body).status, 200);
    let after_first = s.certificate_count_now();
    refused(&s, curl_enroll(&s, "cam-1", &token, &valid_body(&s, "cam-1b")), 401, "already been used");
    assert_eq!(s.certificate_count_now(), after_first);

    // Expired.
    let short = s.add_device("cam-3", &["--token-ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    refused(&s, curl_enroll(&s, "cam-3", &short, &valid_body(&s, "cam-3")), 401, "expired");

    // Suspended and revoked devices cannot enroll even with a valid token.
    let t4 = s.add_device("cam-4", &[]);
    s.cli_ok(&["device", "suspend", "cam-4"]);
    refused(&s, curl_enroll(&s, "cam-4", &t4, &valid_body(&s, "cam-4")), 403, "suspended");
    s.cli_ok(&["device", "revoke", "cam-4"]);
    refused(&s, curl_enroll(&s, "cam-4", &t4, &valid_body(&s, "cam-4")), 403, "revoked");
    assert_eq!(s.certificate_count_now(), after_first);
    still_serving(&s, "ok-1");

    // Each refusal is counted by reason at /metrics.
    let metrics = s.metrics_now();
    for (result, n) in [
        ("bad_credentials", 4),
        ("token_used", 1),
        ("token_expired", 1),
        ("device_not_active", 2),
        ("issued", 2),
    ] {
        let line = format!("portcullis_est_enrollments_total{{via=\"enroll\",result=\"{result}\"}} {n}");
        assert!(metrics.contains(&line), "missing {line:?} in\n{metrics}");
    }
}

#[test]
fn malformed_csrs() {
    let s = Server::start();
    let before = s.certificate_count_now();
    let dir = s.dir.path();

    let t = s.add_device("m-1", &[]);
    refused(&s, curl_enroll(&s, "m-1", &t, b"this is not base64!!"), 400, "not valid base64");
    refused(
        &s,
        curl_enroll(&s, "m-1", &t, b64(b"valid base64, not DER").as_bytes()),
        400,
        "not a DER-encoded PKCS#10",
    );
    refused(&s, curl_enroll(&s, "m-1", &t, b""), 400, "empty");

    // Signature that does not verify: flip a byte inside the signed subject.
    let (_, csr) = openssl_csr(dir, "tamper", &p256(), &[]);
    let mut der = std::fs::read(&csr).unwrap();
    let pos = der.windows(6).position(|w| w == b"tamper").unwrap();
    der[pos] = b'T';
    refused(&s, curl_enroll(&s, "m-1", &t, b64(&der).as_bytes()), 400, "signature does not verify");

    // Weak and unsupported keys.
    let (_, weak) = openssl_csr(dir, "weak", &["-newkey", "rsa:1024"], &[]);
    refused(
        &s,
        curl_enroll(&s, "m-1", &t, b64(&std::fs::read(&weak).unwrap()).as_bytes()),
        400,
        "weak key: RSA 1024 bits",
    );
    let (_, p521) = openssl_csr(dir, "p521", &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"], &[]);
    refused(
        &s,
        curl_enroll(&s, "m-1", &t, b64(&std::fs::read(&p521).unwrap()).as_bytes()),
        400,
        "unsupported key",
    );

    // Wrong content type.
    let (root, _) = s.ca_files();
    let body_file = dir.join("ct.b64");
    std::fs::write(&body_file, valid_body(&s, "ct")).unwrap();
    let r = curl(
        &[
            "--cacert",
            root.to_str().unwrap(),
            "-u",
            &format!("m-1:{t}"),
            "-H",
            "Content-Type: text/plain",
            "--data-binary",
            &format!("@{}", body_file.display()),
        ],
        &format!("{}/.well-known/est/simpleenroll", s.url()),
    );
    refused(&s, r, 415, "application/pkcs10");

    // Over 64 KiB.
    let big = vec![b'A'; 64 * 1024 + 1];
    refused(&s, curl_enroll(&s, "m-1", &t, &big), 413, "65536");

    assert_eq!(s.certificate_count_now(), before, "a malformed request issued a certificate");
    // The token was not consumed by any of the failures.
    assert_eq!(curl_enroll(&s, "m-1", &t, &valid_body(&s, "m-1")).status, 200);
    still_serving(&s, "ok-2");
}

#[test]
fn foreign_ca_client_certificate_is_refused() {
    let s = Server::start();
    let dir = s.dir.path();
    // A self-made CA and a client certificate from it, with a SPIFFE id of our domain.
    run(std::process::Command::new("openssl").current_dir(dir).args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "evil-ca.key",
        "-out",
        "evil-ca.crt",
        "-subj",
        "/CN=Evil CA",
        "-days",
        "2",
    ]));
    let (key, csr) = openssl_csr(dir, "evil", &p256(), &[]);
    run(std::process::Command::new("openssl")
        .current_dir(dir)
        .args(["req", "-inform", "DER", "-in"])
        .arg(&csr)
        .args(["-out", "evil.csr.pem"]));
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=URI:spiffe://portcullis.local/device/ok-3\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    run(std::process::Command::new("openssl").current_dir(dir).args([
        "x509",
        "-req",
        "-in",
        "evil.csr.pem",
        "-CA",
        "evil-ca.crt",
        "-CAkey",
        "evil-ca.key",
        "-CAcreateserial",
        "-out",
        "evil.crt",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ]));
    let (root, _) = s.ca_files();
    let before = s.certificate_count_now();
    let body = dir.join("evil.b64");
    std::fs::write(&body, valid_body(&s, "evil2")).unwrap();
    let evil_crt = dir.join("evil.crt");
    let common = |path: &str, extra: &[&str]| curl_mtls(&s, &evil_crt, &key, path, extra);
    let r = common(
        "/.well-known/est/simplereenroll",
        &["-H", "Content-Type: application/pkcs10", "--data-binary", &format!("@{}", body.display())],
    );
    refused(&s, r, 401, "client certificate not accepted");
    refused(&s, common("/portcullis/whoami", &[]), 401, "client certificate not accepted");
    // No certificate at all on a route that needs one.
    let r = curl(&["--cacert", root.to_str().unwrap()], &format!("{}/portcullis/whoami", s.url()));
    refused(&s, r, 401, "client certificate is required");
    assert_eq!(s.certificate_count_now(), before);
    still_serving(&s, "ok-3");
}

fn tls_connect(s: &Server) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let cfg = tls_client(&s.root_pem());
    let conn = rustls::ClientConnection::new(cfg, "localhost".try_into().unwrap()).unwrap();
    let tcp = TcpStream::connect(s.device).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    // Complete the handshake.
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap();
    }
    stream
}

#[test]
fn slow_clients_time_out_and_others_are_served() {
    let s = Server::start_with_config(
        "[device]\nheader_timeout = \"1s\"\nrequest_timeout = \"2s\"\nhandshake_timeout = \"1s\"\n",
    );
    let before = s.certificate_count_now();
    let t = s.add_device("slow", &[]);

    // 1. A request head that never completes: the connection is closed.
    let mut head = tls_connect(&s);
    head.write_all(b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\n").unwrap();
    head.flush().unwrap();
    let t0 = Instant::now();
    // Meanwhile another client is served.
    still_serving(&s, "fast-1");
    let mut buf = Vec::new();
    let _ = head.read_to_end(&mut buf);
    let waited = t0.elapsed();
    assert!(waited < Duration::from_secs(10), "slow head held the connection for {waited:?}");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");

    // 2. A body that never completes: 408.
    let mut body = tls_connect(&s);
    let auth = b64(format!("slow:{t}").as_bytes());
    write!(
        body,
        "POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: application/pkcs10\r\nContent-Length: 1000\r\n\r\nMIIB"
    )
    .unwrap();
    body.flush().unwrap();
    let mut buf = Vec::new();
    let _ = body.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");

    // 3. A TCP client that never starts the TLS handshake is dropped.
    let mut raw = TcpStream::connect(s.device).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t0 = Instant::now();
    let mut b = [0u8; 16];
    let n = raw.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0);
    assert!(t0.elapsed() < Duration::from_secs(10));

    assert_eq!(s.certificate_count_now(), before + 1, "only the fast client got a certificate");
    // The slow device's token is still unused.
    assert_eq!(curl_enroll(&s, "slow", &t, &valid_body(&s, "slow")).status, 200);
}

#[test]
fn garbage_on_the_wire_never_stops_the_server() {
    let s = Server::start();
    // Not TLS at all.
    for payload in
        [&b"GET / HTTP/1.1\r\n\r\n"[..], &[0x16, 0x03, 0x01, 0xff, 0xff, 0x00][..], &[0u8; 4096][..]]
    {
        let mut raw = TcpStream::connect(s.device).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = raw.write_all(payload);
        let mut b = [0u8; 64];
        let _ = raw.read(&mut b);
    }
    // TLS, then HTTP garbage: a 400, and the server goes on.
    let mut tls = tls_connect(&s);
    tls.write_all(b"\x00\x01\x02 NOT HTTP\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let _ = tls.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 400"), "{text}");
    // Unknown route.
    let (root, _) = s.ca_files();
    let r = curl(&["--cacert", root.to_str().unwrap()], &format!("{}/nope", s.url()));
    assert_eq!(r.status, 404);
    let r = curl(&["--cacert", root.to_str().unwrap()], &format!("{}/crl?format=xml", s.url()));
    assert_eq!(r.status, 400);
    still_serving(&s, "after-garbage");
    let _ = Arc::new(());
}
