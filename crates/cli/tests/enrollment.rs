//! Enrollment end to end: our agent, and EST by hand with openssl + curl; revocation seen
//! by openssl and refused over mTLS, also on an already-open connection.

#![allow(clippy::unwrap_used)]

mod harness;

use std::process::Command;
use std::time::{Duration, Instant};

use harness::*;
use portcullis_core::{DeviceId, Token};

#[test]
fn openssl_and_curl_enroll_verify_and_see_revocation() {
    let s = Server::start();
    let (root, chain) = s.ca_files();
    let dir = s.dir.path();

    // cacerts: base64 certs-only PKCS#7 holding the root and the issuing CA.
    let cacerts =
        curl(&["--cacert", root.to_str().unwrap()], &format!("{}/.well-known/est/cacerts", s.url()));
    assert_eq!(cacerts.status, 200);
    assert_eq!(certs_from_pkcs7_b64(&cacerts.body).len(), 2);
    let csrattrs =
        curl(&["--cacert", root.to_str().unwrap()], &format!("{}/.well-known/est/csrattrs", s.url()));
    assert_eq!(csrattrs.status, 204);

    // EST by hand.
    let token = s.add_device("cam-curl", &[]);
    let (key, csr) = openssl_csr(dir, "cam-curl", &p256(), &[]);
    let r = curl_enroll(&s, "cam-curl", &token, b64(&std::fs::read(&csr).unwrap()).as_bytes());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let certs = certs_from_pkcs7_b64(&r.body);
    assert_eq!(certs.len(), 1);
    let cert_path = dir.join("cam-curl.crt");
    std::fs::write(&cert_path, pem_cert(&certs[0])).unwrap();

    // The whole chain verifies with openssl, and the cert carries the SPIFFE URI SAN.
    let out = run(Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&root)
        .arg("-untrusted")
        .arg(&chain)
        .arg(&cert_path));
    assert!(out.contains(": OK"), "{out}");
    let text = run(Command::new("openssl").args(["x509", "-noout", "-text", "-in"]).arg(&cert_path));
    assert!(text.contains("URI:spiffe://portcullis.local/device/cam-curl"), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    let serial = run(Command::new("openssl").args(["x509", "-noout", "-serial", "-in"]).arg(&cert_path));
    let serial = serial.trim().trim_start_matches("serial=").to_ascii_uppercase();

    // mTLS with curl works while the device is active.
    let mtls = |path: &str| curl_mtls(&s, &cert_path, &key, path, &[]);
    let who = mtls("/portcullis/whoami");
    assert_eq!(who.status, 200);
    assert_eq!(who.json()["device"], "cam-curl");

    // Revoke: the CRL lists the serial, verifies under the CA, and mTLS is refused.
    s.cli_ok(&["device", "revoke", "cam-curl", "--reason", "stolen"]);
    let crl_der = curl(&["--cacert", root.to_str().unwrap()], &format!("{}/crl", s.url()));
    assert_eq!(crl_der.status, 200);
    let crl_file = dir.join("crl.der");
    std::fs::write(&crl_file, &crl_der.body).unwrap();
    let crl_text = run(Command::new("openssl")
        .args(["crl", "-inform", "DER", "-noout", "-text", "-CAfile"])
        .arg(&chain)
        .arg("-in")
        .arg(&crl_file));
    assert!(crl_text.to_ascii_uppercase().contains(&serial), "serial {serial} not in CRL:\n{crl_text}");
    let crl_pem = curl(&["--cacert", root.to_str().unwrap()], &format!("{}/crl?format=pem", s.url()));
    assert!(String::from_utf8_lossy(&crl_pem.body).starts_with("-----BEGIN X509 CRL-----"));
    let crl_pem2 = curl(&["--cacert", root.to_str().unwrap()], &format!("{}/crl.pem", s.url()));
    assert_eq!(crl_pem2.status, 200);
    assert!(s.cli_ok(&["ca", "crl"]).starts_with("-----BEGIN X509 CRL-----"));
    // openssl's own revocation check agrees.
    let both = dir.join("chain-and-crl.pem");
    std::fs::write(
        &both,
        format!("{}{}", std::fs::read_to_string(&chain).unwrap(), String::from_utf8_lossy(&crl_pem.body)),
    )
    .unwrap();
    let v = Command::new("openssl")
        .args(["verify", "-crl_check", "-CAfile"])
        .arg(&both)
        .arg(&cert_path)
        .output()
        .unwrap();
    assert!(!v.status.success());
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("revoked")
            || String::from_utf8_lossy(&v.stderr).contains("revoked")
    );

    let issued_before = s.certificate_count_now();
    let refused = mtls("/portcullis/whoami");
    assert_eq!(refused.status, 403);
    assert!(refused.detail().contains("revoked"), "{}", refused.detail());
    let reenroll = {
        let (_, csr2) = openssl_csr(dir, "cam-curl-2", &p256(), &[]);
        let body = dir.join("re.b64");
        std::fs::write(&body, b64(&std::fs::read(&csr2).unwrap())).unwrap();
        let data = format!("@{}", body.display());
        curl_mtls(
            &s,
            &cert_path,
            &key,
            "/.well-known/est/simplereenroll",
            &["-H", "Content-Type: application/pkcs10", "--data-binary", &data],
        )
    };
    assert_eq!(reenroll.status, 403);
    assert!(reenroll.detail().contains("revoked"), "{}", reenroll.detail());
    assert_eq!(s.certificate_count_now(), issued_before, "a refused re-enrollment issued a certificate");
}

/// The `portcullis-agent` binary as an operator would use it.
#[test]
fn agent_binary_enroll_status_renew() {
    let agent = agent_bin();
    let s = Server::start();
    let (root, _) = s.ca_files();
    let token = s.add_device("cam-bin", &[]);
    let dir = s.path("agent-bin");
    let out = run(Command::new(&agent)
        .args(["enroll", "--server", &s.url(), "--ca"])
        .arg(&root)
        .args(["--id", "cam-bin", "--dir"])
        .arg(&dir)
        .env("PORTCULLIS_ENROLL_TOKEN", &token));
    assert!(out.contains("enrolled cam-bin"), "{out}");
    let status = run(Command::new(&agent).args(["status", "--json", "--dir"]).arg(&dir));
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["device"], "cam-bin");
    assert_eq!(status["renewal_due"], false);
    let not_due = run(Command::new(&agent).args(["renew", "--dir"]).arg(&dir));
    assert!(not_due.contains("not due"), "{not_due}");
    let renewed = run(Command::new(&agent).args(["renew", "--force", "--dir"]).arg(&dir));
    assert!(renewed.contains("renewed cam-bin"), "{renewed}");
    // curl with the agent's files proves the identity to the device port.
    let who = curl_mtls(&s, &dir.join("chain.pem"), &dir.join("key.pem"), "/portcullis/whoami", &[]);
    assert_eq!(who.status, 200);
    // A wrong token fails with the server's reason and a non-zero exit.
    s.add_device("cam-bin2", &[]);
    let bad = Command::new(&agent)
        .args(["enroll", "--server", &s.url(), "--ca"])
        .arg(&root)
        .args(["--id", "cam-bin2", "--token", "pct_nope", "--dir"])
        .arg(s.path("agent-bin2"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid device id or enrollment token"));
}

#[test]
fn accepted_key_types_and_server_decides_content() {
    let s = Server::start();
    let dir = s.dir.path();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("k-p384", vec!["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"]),
        ("k-ed25519", vec!["-newkey", "ed25519"]),
        ("k-rsa2048", vec!["-newkey", "rsa:2048"]),
    ];
    for (id, newkey) in cases {
        let token = s.add_device(id, &[]);
        let (_, csr) = openssl_csr(dir, id, &newkey, &[]);
        let r = curl_enroll(&s, id, &token, b64(&std::fs::read(&csr).unwrap()).as_bytes());
        assert_eq!(r.status, 200, "{id}: {}", String::from_utf8_lossy(&r.body));
    }

    // A CSR asking to be a CA, for other names and other usages gets none of it.
    let token = s.add_device("greedy", &[]);
    let (_, csr) = openssl_csr(
        dir,
        "greedy",
        &p256(),
        &[
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "subjectAltName=DNS:evil.example,URI:spiffe://portcullis.local/device/other",
            "-addext",
            "extendedKeyUsage=serverAuth,codeSigning",
            "-addext",
            "keyUsage=keyCertSign",
        ],
    );
    let r = curl_enroll(&s, "greedy", &token, b64(&std::fs::read(&csr).unwrap()).as_bytes());
    assert_eq!(r.status, 200);
    let cert = &certs_from_pkcs7_b64(&r.body)[0];
    let path = dir.join("greedy.crt");
    std::fs::write(&path, pem_cert(cert)).unwrap();
    let text = run(Command::new("openssl").args(["x509", "-noout", "-text", "-in"]).arg(&path));
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(!text.contains("evil.example"), "{text}");
    assert!(!text.contains("device/other"), "{text}");
    assert!(!text.contains("Code Signing") && !text.contains("TLS Web Server"), "{text}");
    assert!(!text.contains("Certificate Sign"), "{text}");
    assert!(text.contains("URI:spiffe://portcullis.local/device/greedy"), "{text}");
    assert!(text.contains("Subject: CN = greedy"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_enrolls_renews_and_live_state_applies_to_open_connections() {
    let s = Server::start();
    let root = s.root_pem();
    let token = s.add_device("cam-agent", &["--group", "cameras"]);
    let agent_dir = s.path("agent");
    let id = DeviceId::try_new("cam-agent").unwrap();
    let st = portcullis_agent::enroll(&s.url(), &root, &id, &Token::from_presented(&token), &agent_dir)
        .await
        .unwrap();
    assert_eq!(st.device, id);
    assert!(!st.renewal_due);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(agent_dir.join("key.pem")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    // The same token cannot enroll twice.
    let again =
        portcullis_agent::enroll(&s.url(), &root, &id, &Token::from_presented(&token), &s.path("agent2"))
            .await;
    assert!(format!("{:#}", again.unwrap_err()).contains("already been used"));

    // Not due: nothing happens. Forced: a new certificate and a new key.
    assert!(matches!(
        portcullis_agent::renew(&agent_dir, false).await.unwrap(),
        portcullis_agent::Renewal::NotDue(_)
    ));
    let old_key = std::fs::read(agent_dir.join("key.pem")).unwrap();
    let renewed = match portcullis_agent::renew(&agent_dir, true).await.unwrap() {
        portcullis_agent::Renewal::Renewed(s) => s,
        other => panic!("{other:?}"),
    };
    assert_ne!(renewed.serial, st.serial);
    assert_ne!(std::fs::read(agent_dir.join("key.pem")).unwrap(), old_key);
    let show = s.cli_ok(&["device", "show", "cam-agent", "--json"]);
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(show["certificates"].as_array().unwrap().len(), 2);
    assert_eq!(show["device"]["group"], "cameras");

    // One keep-alive connection, authenticated by the renewed certificate.
    let dir = portcullis_agent::AgentDir::open(&agent_dir).unwrap();
    let client =
        portcullis_agent::EstClient::new(&s.url(), &root, Some(dir.identity_pem().unwrap())).unwrap();
    let mut conn = client.open().await.unwrap();
    assert_eq!(conn.get("/portcullis/whoami").await.unwrap().0, 200);

    // Suspension applies to the open connection within a second, resumption too.
    s.cli_ok(&["device", "suspend", "cam-agent", "--reason", "maintenance"]);
    let t0 = Instant::now();
    let (status, body) = conn.get("/portcullis/whoami").await.unwrap();
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("suspended"));
    assert!(t0.elapsed() < Duration::from_secs(1));
    s.cli_ok(&["device", "resume", "cam-agent"]);
    assert_eq!(conn.get("/portcullis/whoami").await.unwrap().0, 200);
    // A suspended device cannot re-enroll either.
    s.cli_ok(&["device", "suspend", "cam-agent"]);
    let before = s.certificate_count().await;
    let err = portcullis_agent::renew(&agent_dir, true).await.unwrap_err();
    assert!(format!("{err:#}").contains("403"), "{err:#}");
    assert!(format!("{err:#}").contains("suspended"), "{err:#}");
    assert_eq!(s.certificate_count().await, before);
    s.cli_ok(&["device", "resume", "cam-agent"]);

    s.cli_ok(&["device", "revoke", "cam-agent"]);
    let (status, body) = conn.get("/portcullis/whoami").await.unwrap();
    assert_eq!(status, 403);
    assert!(String::from_utf8_lossy(&body).contains("revoked"));
    // New connections too, and the registry says so.
    assert_eq!(client.get("/portcullis/whoami").await.unwrap().0, 403);
    let list = s.cli_ok(&["device", "list", "--json"]);
    assert!(list.contains("\"revoked\""));
    let status = portcullis_agent::status(&agent_dir).unwrap();
    assert_eq!(status.serial, renewed.serial);
}

#[test]
fn up_prints_listeners_and_stops_cleanly_on_sigterm() {
    let mut s = Server::start();
    assert_ne!(s.device.port(), 0);
    assert_ne!(s.admin.port(), 0);
    let status = s.sigterm();
    assert!(status.success(), "{status:?}");
    assert!(!s.data_dir().join("admin.addr").exists());
    // Restart on the same data dir keeps the CA and the registry.
    let root_before = std::fs::read(s.data_dir().join("ca/root.crt")).unwrap();
    let dir = s.into_dir();
    let s2 = Server::start_in(dir, "");
    assert_eq!(std::fs::read(s2.data_dir().join("ca/root.crt")).unwrap(), root_before);
}

/// `portcullis-agent run` keeps a short-lived identity fresh by itself.
#[test]
fn agent_run_renews_before_expiry() {
    let agent = agent_bin();
    let s = Server::start_with_config("[pki]\ndevice_cert_lifetime = \"9s\"\n");
    let (root, _) = s.ca_files();
    let token = s.add_device("cam-run", &[]);
    let dir = s.path("agent-run");
    run(Command::new(&agent)
        .args(["enroll", "--server", &s.url(), "--ca"])
        .arg(&root)
        .args(["--id", "cam-run", "--token", &token, "--dir"])
        .arg(&dir));
    let first = portcullis_agent::status(&dir).unwrap();
    let mut child = Command::new(&agent)
        .args(["run", "--check-every", "1s", "--dir"])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A third of 9 s (plus the 0.9 s backdate) is left about 6 s after issuance.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut renewed = None;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        let now = portcullis_agent::status(&dir).unwrap();
        if now.serial != first.serial {
            renewed = Some((now, time::OffsetDateTime::now_utc()));
            break;
        }
    }
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let exit = child.wait().unwrap();
    let (renewed, seen_at) = renewed.expect("the agent did not renew within 20 s");
    assert!(renewed.not_after > first.not_after);
    assert!(seen_at < first.not_after, "renewed only after the old certificate expired");
    assert!(exit.success(), "agent did not stop cleanly on SIGTERM: {exit:?}");
}
