//! The certificate lifecycle a stolen key must not survive: renewal supersedes the
//! certificate it was authenticated with, re-provisioning with a new token revokes
//! everything issued before, one certificate can be revoked alone, and re-enrollment is
//! rate limited per device. Driven with openssl and curl against the real binary.
#![allow(clippy::unwrap_used)]

mod harness;

use std::path::PathBuf;
use std::process::Command;

use harness::*;

/// A device's key and certificate files, and the certificate's serial (hex, upper case).
struct Held {
    key: PathBuf,
    cert: PathBuf,
    serial: String,
}

fn keep(s: &Server, name: &str, key: PathBuf, body: &[u8]) -> Held {
    let certs = certs_from_pkcs7_b64(body);
    assert_eq!(certs.len(), 1);
    let cert = s.path(&format!("{name}.crt"));
    std::fs::write(&cert, pem_cert(&certs[0])).unwrap();
    let serial = run(Command::new("openssl").args(["x509", "-noout", "-serial", "-in"]).arg(&cert));
    let serial = serial.trim().trim_start_matches("serial=").to_ascii_uppercase();
    Held { key, cert, serial }
}

/// EST simpleenroll by hand: a fresh P-256 key and CSR from openssl, the token over Basic.
fn enroll(s: &Server, device: &str, token: &str, name: &str) -> Held {
    let (key, csr) = openssl_csr(s.dir.path(), name, &p256(), &[]);
    let r = curl_enroll(s, device, token, b64(&std::fs::read(&csr).unwrap()).as_bytes());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    keep(s, name, key, &r.body)
}

/// EST simplereenroll with curl, authenticated by `with`, for a new key `name`.
fn reenroll(s: &Server, with: &Held, name: &str) -> (CurlResult, PathBuf) {
    let (_key, csr) = openssl_csr(s.dir.path(), name, &p256(), &[]);
    let body = s.path(&format!("{name}.b64"));
    std::fs::write(&body, b64(&std::fs::read(&csr).unwrap())).unwrap();
    let data = format!("@{}", body.display());
    let hdr = s.path(&format!("{name}.headers"));
    let r = curl_mtls(
        s,
        &with.cert,
        &with.key,
        "/.well-known/est/simplereenroll",
        &["-H", "Content-Type: application/pkcs10", "--data-binary", &data, "-D", hdr.to_str().unwrap()],
    );
    (r, hdr)
}

fn whoami(s: &Server, h: &Held) -> u16 {
    curl_mtls(s, &h.cert, &h.key, "/portcullis/whoami", &[]).status
}

/// The CRL as openssl prints it, after openssl verified its signature.
fn crl_text(s: &Server) -> String {
    let (root, chain) = s.ca_files();
    let crl = curl(&["--cacert", root.to_str().unwrap()], &format!("{}/crl.pem", s.url()));
    assert_eq!(crl.status, 200);
    let file = s.path("crl.pem");
    std::fs::write(&file, &crl.body).unwrap();
    let out = Command::new("openssl")
        .args(["crl", "-noout", "-text", "-CAfile"])
        .arg(&chain)
        .arg("-in")
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("verify OK"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The reason openssl prints for `serial` in the CRL, if it is listed.
fn crl_reason(text: &str, serial: &str) -> Option<String> {
    let at = text.find(&format!("Serial Number: {serial}"))?;
    let rest = &text[at..];
    let end = rest[1..].find("Serial Number:").map_or(rest.len(), |e| e + 1);
    let entry = &rest[..end];
    let reason = entry.lines().skip_while(|l| !l.contains("X509v3 CRL Reason Code")).nth(1);
    Some(reason.map(|r| r.trim().to_owned()).unwrap_or_else(|| "none".into()))
}

fn cert_json(s: &Server, serial: &str) -> serde_json::Value {
    serde_json::from_str(&s.cli_ok(&["cert", "show", serial, "--json"])).unwrap()
}

#[test]
fn renewal_supersedes_reprovisioning_revokes_and_one_certificate_can_be_revoked() {
    let s = Server::start();
    let token = s.add_device("cam-01", &[]);
    let a = enroll(&s, "cam-01", &token, "a");
    assert_eq!(whoami(&s, &a), 200);

    // Renewal with certificate A: B is issued and A is retired at once.
    let (r, _) = reenroll(&s, &a, "b");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let b = keep(&s, "b", s.path("b.key"), &r.body);
    assert_eq!(whoami(&s, &b), 200);
    assert_eq!(whoami(&s, &a), 403, "a superseded certificate still authenticates");
    // A stolen copy of A cannot renew any more: the supply of certificates ends.
    let (r, _) = reenroll(&s, &a, "thief");
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    let info = cert_json(&s, &a.serial);
    assert_eq!((info["state"].as_str(), info["crl_reason"].as_str()), (Some("revoked"), Some("superseded")));
    // The same number as openssl prints it (which pads to whole bytes).
    let bare = |s: &str| s.trim_start_matches('0').to_ascii_uppercase();
    assert_eq!(info["superseded_by"].as_str().map(bare), Some(bare(&b.serial)));
    assert_eq!(crl_reason(&crl_text(&s), &a.serial).as_deref(), Some("Superseded"));

    // Re-provisioning after key loss: a new token, a new key. Every earlier certificate
    // of the device (B, which the thief may hold) is revoked in the same step.
    let token = s.cli_ok(&["device", "token", "cam-01"]).trim().to_owned();
    let c = enroll(&s, "cam-01", &token, "c");
    assert_eq!(whoami(&s, &c), 200);
    assert_eq!(whoami(&s, &b), 403);
    let crl = crl_text(&s);
    assert_eq!(crl_reason(&crl, &b.serial).as_deref(), Some("Superseded"));
    assert_eq!(cert_json(&s, &b.serial)["state"], "revoked");
    let events = s.cli_ok(&["events", "--device", "cam-01", "--json"]);
    assert!(events.contains("certificate.superseded"), "{events}");

    // One certificate alone: C is revoked for key compromise; the device stays active
    // and may be given a new token.
    let bad = s.cli(&["cert", "revoke", &c.serial, "--reason", "lost"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown revocation reason \"lost\""));
    let out =
        s.cli_ok(&["cert", "revoke", &c.serial, "--reason", "keyCompromise", "--note", "found on eBay"]);
    assert!(out.contains("revoked (keyCompromise)"), "{out}");
    assert_eq!(whoami(&s, &c), 403);
    assert_eq!(crl_reason(&crl_text(&s), &c.serial).as_deref(), Some("Key Compromise"));
    let again = s.cli(&["cert", "revoke", &c.serial, "--reason", "keyCompromise"]);
    assert!(!again.status.success(), "revoking twice succeeded");
    assert!(String::from_utf8_lossy(&again.stderr).contains("no longer valid"));
    let shown = cert_json(&s, &c.serial);
    assert_eq!(
        (shown["crl_reason"].as_str(), shown["revocation_reason"].as_str()),
        (Some("keyCompromise"), Some("found on eBay"))
    );
    assert_eq!(shown["device_state"], "active");
    assert!(s.cli_ok(&["cert", "show", &c.serial, "--pem"]).starts_with("-----BEGIN CERTIFICATE-----"));
    // Over the admin API as well; a serial that is not hex is a precise 400.
    let token = std::fs::read_to_string(s.data_dir().join("admin.token")).unwrap();
    let auth = format!("Authorization: Bearer {}", token.trim());
    let r = curl(&["-H", &auth], &format!("http://{}/v1/certificates/{}", s.admin, c.serial));
    assert_eq!(r.json()["state"], "revoked");
    assert_eq!(curl(&["-H", &auth], &format!("http://{}/v1/certificates/xyz", s.admin)).status, 400);
    assert_eq!(curl(&["-H", &auth], &format!("http://{}/v1/certificates/0badc0de", s.admin)).status, 404);
}

#[test]
fn reenrollment_is_rate_limited_per_device() {
    let s = Server::start_with_config("[pki]\nreenroll_limit = { count = 3, per = \"1h\" }\n");
    let token = s.add_device("cam-02", &[]);
    let mut held = enroll(&s, "cam-02", &token, "r0");
    for i in 1..=3 {
        let name = format!("r{i}");
        let (r, _) = reenroll(&s, &held, &name);
        assert_eq!(r.status, 200, "renewal {i}: {}", String::from_utf8_lossy(&r.body));
        held = keep(&s, &name, s.path(&format!("{name}.key")), &r.body);
    }
    let (r, hdr) = reenroll(&s, &held, "r4");
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.detail().contains("re-enrolled 3 times within 3600 s"), "{}", r.detail());
    let headers = std::fs::read_to_string(hdr).unwrap().to_ascii_lowercase();
    let retry: u64 = headers
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("Retry-After");
    assert!((3000..=3601).contains(&retry), "Retry-After {retry}");
    // The certificate it holds still works; another device has its own budget.
    assert_eq!(whoami(&s, &held), 200);
    let other = s.add_device("cam-03", &[]);
    let o = enroll(&s, "cam-03", &other, "o0");
    assert_eq!(reenroll(&s, &o, "o1").0.status, 200);
}
