//! The operator's surface: health and readiness without the admin token, a separate
//! read-only scrape token for `/metrics`, `reload --config` that never silently reloads
//! another file, and log lines that network input cannot forge.
#![allow(clippy::unwrap_used)]

mod harness;

use std::os::unix::fs::PermissionsExt;

use harness::*;

fn get(s: &Server, path: &str, token: Option<&str>) -> CurlResult {
    let auth = token.map(|t| format!("Authorization: Bearer {}", t.trim()));
    let args: Vec<&str> = auth.iter().flat_map(|a| ["-H", a.as_str()]).collect();
    curl(&args, &format!("http://{}{path}", s.admin))
}

#[test]
fn probes_need_no_token_and_metrics_take_a_scrape_token_that_rotates() {
    let s = Server::start();
    let admin = std::fs::read_to_string(s.data_dir().join("admin.token")).unwrap();

    // Liveness and readiness: no token, nothing a caller could use.
    let live = get(&s, "/healthz", None);
    assert_eq!((live.status, live.json()["status"].as_str()), (200, Some("ok")));
    let ready = get(&s, "/readyz", None);
    assert_eq!((ready.status, ready.json()["status"].as_str()), (200, Some("ready")));
    assert_eq!(curl(&["-X", "POST"], &format!("http://{}/healthz", s.admin)).status, 401);

    // The scrape token: created by `up`, mode 0600, named by `portcullis metrics-token`.
    let path = s.cli_ok(&["metrics-token"]).trim().to_owned();
    assert_eq!(std::path::Path::new(&path), s.data_dir().join("metrics.token"));
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let scrape = std::fs::read_to_string(&path).unwrap();
    assert_ne!(scrape.trim(), admin.trim());

    assert_eq!(get(&s, "/metrics", None).status, 401);
    let m = get(&s, "/metrics", Some(&scrape));
    assert_eq!(m.status, 200);
    assert!(String::from_utf8_lossy(&m.body).contains("# EOF"));
    assert_eq!(get(&s, "/metrics", Some(&admin)).status, 200, "the admin token still reads metrics");
    // It reads metrics and nothing else.
    for path in ["/v1/devices", "/v1/certificates", "/v1/events", "/v1/ca/crl"] {
        assert_eq!(get(&s, path, Some(&scrape)).status, 401, "{path} with the scrape token");
    }
    let post = curl(
        &["-X", "POST", "-H", &format!("Authorization: Bearer {}", scrape.trim()), "-d", r#"{"id":"x"}"#],
        &format!("http://{}/v1/devices", s.admin),
    );
    assert_eq!(post.status, 401);

    // Rotation: the running server takes the new token and refuses the old one.
    assert_eq!(s.cli_ok(&["metrics-token", "--rotate"]).trim(), path);
    let rotated = std::fs::read_to_string(&path).unwrap();
    assert_ne!(rotated, scrape);
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(get(&s, "/metrics", Some(&scrape)).status, 401);
    assert_eq!(get(&s, "/metrics", Some(&rotated)).status, 200);
}

#[test]
fn reload_with_another_config_than_the_servers_is_refused_with_the_fix() {
    // A newcomer's server: started on the embedded defaults.
    let s = Server::start_without_config();
    let cfg = s.path("portcullis.toml");
    std::fs::write(&cfg, "[[gateway.routes]]\nprefix = \"/api/\"\nupstream = \"http://127.0.0.1:9\"\n")
        .unwrap();
    let cfg_arg = cfg.to_str().unwrap();
    for cmd in ["gateway", "dns"] {
        let out = s.cli(&["--config", cfg_arg, cmd, "reload"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd} reload with another config succeeded");
        assert!(err.contains("started without --config"), "{err}");
        assert!(err.contains(&format!("portcullis --config {cfg_arg} up")), "{err}");
    }
    // Without --config it reloads what the server runs with, and says so.
    let out = s.cli_ok(&["gateway", "reload"]);
    assert!(out.contains("reloaded: 0 routes (embedded defaults"), "{out}");

    // A server started with a file: the same file (even relative) reloads; another is refused.
    let s = Server::start_with_config(
        "[[gateway.routes]]\nprefix = \"/a/\"\nupstream = \"http://127.0.0.1:9\"\n",
    );
    let own = s.path("portcullis.toml");
    let out = s.cli_ok(&["--config", own.to_str().unwrap(), "gateway", "reload"]);
    assert!(out.contains(&format!("reloaded: 1 routes from {}", own.display())), "{out}");
    let relative = std::process::Command::new(BIN)
        .current_dir(s.dir.path())
        .args(["--data-dir", "data", "--config", "portcullis.toml", "gateway", "reload"])
        .output()
        .unwrap();
    assert!(relative.status.success(), "{}", String::from_utf8_lossy(&relative.stderr));
    let out = s.cli(&["--config", cfg_arg, "gateway", "reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("was started with {}", own.display())), "{err}");
}

#[test]
fn network_input_cannot_forge_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let s = Server::start_logged(dir, "", Some(&log));

    // An EST username with a newline and a fake log line behind it (refused: no such
    // device). No ':' in it: Basic credentials end the username at the first one.
    let forged = "cam\n2026-12-07T00.00.00.000000Z  INFO portcullis FORGED admin login\u{1b}[2J";
    let r = curl_enroll(&s, forged, "pct_nope", b"MIIB");
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));

    // A DNS query whose first label holds a newline.
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    let label = b"x\nINFO FORGED dns";
    q.push(label.len() as u8);
    q.extend_from_slice(label);
    q.extend_from_slice(b"\x04test\x00\x00\x01\x00\x01");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    udp.send_to(&q, s.dns.unwrap()).unwrap();
    let mut buf = [0u8; 512];
    let _ = udp.recv_from(&mut buf);

    // Both reached the log, and every line of it is one the server wrote.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let text = std::fs::read_to_string(&log).unwrap();
    let marked: Vec<&str> = text.lines().filter(|l| l.to_ascii_lowercase().contains("forged")).collect();
    assert!(marked.len() >= 2, "the refused enrollment and the query are logged:\n{text}");
    for line in &marked {
        assert!(line.starts_with("2026-12-07T") || line.starts_with("20"), "forged line: {line:?}");
        assert!(!line.starts_with("2026-12-07T00.00.00"), "forged line: {line:?}");
        assert!(!line.contains('\u{1b}'), "raw escape sequence in {line:?}");
    }
    assert!(
        text.contains(
            "device=cam\\n2026-12-07T00.00.00.000000Z  INFO portcullis FORGED admin login\\u{1b}[2J"
        ),
        "{text}"
    );
}
