//! The admin API and CLI: authentication, data-dir hygiene, management without a
//! running server, and secrets kept out of logs and API output.

#![allow(clippy::unwrap_used)]

mod harness;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use harness::*;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn every_admin_endpoint_requires_the_bearer_token() {
    let s = Server::start();
    let token = std::fs::read_to_string(s.data_dir().join("admin.token")).unwrap();
    // /healthz and /readyz answer without one (tests/operator.rs).
    let endpoints = [
        ("GET", "/metrics"),
        ("GET", "/v1/devices"),
        ("POST", "/v1/devices"),
        ("GET", "/v1/devices/x"),
        ("POST", "/v1/devices/x/suspend"),
        ("POST", "/v1/devices/x/resume"),
        ("POST", "/v1/devices/x/revoke"),
        ("POST", "/v1/devices/x/tokens"),
        ("GET", "/v1/certificates"),
        ("GET", "/v1/groups"),
        ("GET", "/v1/events"),
        ("GET", "/v1/ca/root"),
        ("GET", "/v1/ca/chain"),
        ("GET", "/v1/ca/crl"),
        ("GET", "/no/such/endpoint"),
    ];
    for (method, path) in endpoints {
        let url = format!("http://{}{path}", s.admin);
        let none = curl(&["-X", method, "-H", "Content-Type: application/json", "-d", "{}"], &url);
        assert_eq!(none.status, 401, "{method} {path} without token");
        assert_eq!(none.json()["status"], 401);
        let wrong = curl(&["-X", method, "-H", "Authorization: Bearer pca_wrong", "-d", "{}"], &url);
        assert_eq!(wrong.status, 401, "{method} {path} with a wrong token");
    }
    let ok = curl(
        &["-H", &format!("Authorization: Bearer {}", token.trim())],
        &format!("http://{}/healthz", s.admin),
    );
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["status"], "ok");
}

#[test]
fn admin_api_errors_are_problem_documents() {
    let s = Server::start();
    let token = std::fs::read_to_string(s.data_dir().join("admin.token")).unwrap();
    let auth = format!("Authorization: Bearer {}", token.trim());
    let post = |path: &str, body: &str| {
        curl(
            &["-X", "POST", "-H", &auth, "-H", "Content-Type: application/json", "-d", body],
            &format!("http://{}{path}", s.admin),
        )
    };
    assert_eq!(post("/v1/devices", r#"{"id":"cam-1"}"#).status, 201);
    let dup = post("/v1/devices", r#"{"id":"cam-1"}"#);
    assert_eq!(dup.status, 409);
    assert!(dup.detail().contains("already exists"));
    let bad = post("/v1/devices", r#"{"id":"a/b"}"#);
    assert_eq!(bad.status, 400);
    assert!(bad.detail().contains("device id"), "{}", bad.detail());
    assert_eq!(post("/v1/devices", r#"{"id":"x","bogus":1}"#).status, 422);
    assert_eq!(post("/v1/devices", "not json").status, 400);
    assert_eq!(post("/v1/devices/nope/suspend", "{}").status, 404);
    assert_eq!(post("/v1/devices/cam-1/resume", "{}").status, 409, "resume of an active device");
    assert_eq!(post("/v1/devices", r#"{"id":"ttl","token_ttl":"soon"}"#).status, 400);
    let missing = curl(&["-H", &auth], &format!("http://{}/v1/devices/ghost", s.admin));
    assert_eq!(missing.status, 404);
    // Groups are created on demand and counted.
    assert_eq!(post("/v1/devices", r#"{"id":"cam-2","group":"cameras"}"#).status, 201);
    let groups = curl(&["-H", &auth], &format!("http://{}/v1/groups", s.admin)).json();
    let names: Vec<_> =
        groups["groups"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cameras", "default"]);
}

#[test]
fn init_refuses_overwrite_and_secrets_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let init = |td: &str| {
        Command::new(BIN).arg("--data-dir").arg(&data).args(["init", "--trust-domain", td]).output().unwrap()
    };
    let first = init("fleet.example");
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let root = std::fs::read(data.join("ca/root.crt")).unwrap();
    let second = init("other.example");
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("refusing to overwrite"));
    assert_eq!(std::fs::read(data.join("ca/root.crt")).unwrap(), root);
    for f in ["ca/root.key", "ca/issuing.key", "admin.token"] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    assert_eq!(mode(&data), 0o700);
    let bad = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.path().join("e"))
        .args(["init", "--trust-domain", "Bad Domain"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("trust domain"));
}

#[test]
fn management_works_without_a_running_server_and_secrets_stay_out_of_logs() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(dir.path());
    let cli = |args: &[&str]| {
        let out = Command::new(BIN).arg("--data-dir").arg(&data).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    cli(&["init", "--trust-domain", "lab.example"]);
    // Offline: registers in the data dir directly.
    let token = cli(&["device", "add", "sensor-1", "--group", "lab"]).trim().to_owned();
    assert!(token.starts_with("pct_"));
    assert!(cli(&["device", "list"]).contains("sensor-1"));

    // Two servers on one data dir would split the registry's truth: the second refuses.
    let log = dir.path().join("server.log");
    let s = Server::start_logged(dir, "", Some(&log));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let id = portcullis_core::DeviceId::try_new("sensor-1").unwrap();
    let st = rt
        .block_on(portcullis_agent::enroll(
            &s.url(),
            &s.root_pem(),
            &id,
            &portcullis_core::Token::from_presented(&token),
            &s.path("agent"),
        ))
        .unwrap();
    let second = Command::new(BIN)
        .arg("--data-dir")
        .arg(s.data_dir())
        .args(["up", "--device-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("another portcullis process"));
    let text = std::fs::read_to_string(s.path("agent/cert.pem")).unwrap();
    assert!(text.contains("BEGIN CERTIFICATE"));
    let show = s.cli_ok(&["device", "show", "sensor-1", "--json"]);
    assert!(show.contains(st.serial.as_str()));
    assert!(show.contains("spiffe://lab.example/device/sensor-1"));
    assert!(!show.contains("token\""), "device show must not echo tokens: {show}");
    let second_token = s.cli_ok(&["device", "token", "sensor-1"]).trim().to_owned();
    let events = s.cli_ok(&["events", "--json"]);

    // The server's own files holding secrets are private.
    assert_eq!(mode(&s.data_dir().join("tls/server.key")), 0o600);
    // No secret in the debug log, in events or in API output.
    let admin_token = std::fs::read_to_string(s.data_dir().join("admin.token")).unwrap();
    let agent_key = std::fs::read_to_string(s.path("agent/key.pem")).unwrap();
    let logged = std::fs::read_to_string(&log).unwrap();
    for secret in
        [token.as_str(), second_token.as_str(), admin_token.trim(), "PRIVATE KEY", &agent_key[40..80]]
    {
        assert!(!logged.contains(secret), "secret in log");
        assert!(!events.contains(secret), "secret in events");
        assert!(!show.contains(secret), "secret in device show");
    }
    // The registry stores tokens hashed.
    let db = std::fs::read(s.data_dir().join("registry.sqlite")).unwrap();
    let wal = std::fs::read(s.data_dir().join("registry.sqlite-wal")).unwrap_or_default();
    for hay in [&db, &wal] {
        assert!(!hay.windows(token.len()).any(|w| w == token.as_bytes()), "plaintext token in the database");
    }
}
