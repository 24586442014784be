//! The fleet audit against simulated devices on their own loopback addresses, with
//! `nmap -sT` (Debian nmap) as the outside reference for the exposure scan.
#![allow(clippy::unwrap_used)]

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Command;

use harness::{Server, b64, curl_enroll, run};
use portcullis_simdevice::{Device, Service};
use serde_json::Value;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn sim(rt: &tokio::runtime::Runtime, addr: &str, services: &[&str]) -> Device {
    let services: Vec<Service> = services.iter().map(|s| s.parse().unwrap()).collect();
    rt.block_on(portcullis_simdevice::start(addr.parse::<IpAddr>().unwrap(), &services)).unwrap()
}

/// `(device, key) -> status` of a run's findings.
fn findings(v: &Value) -> BTreeMap<(String, String), String> {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                (f["device"].as_str().unwrap().to_owned(), f["key"].as_str().unwrap().to_owned()),
                f["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn expect(rows: &[(&str, &[&str])]) -> BTreeSet<(String, String)> {
    rows.iter().flat_map(|(d, keys)| keys.iter().map(move |k| ((*d).to_owned(), (*k).to_owned()))).collect()
}

/// Enrolls `id` with a CSR over `key` (made if missing) by openssl and curl.
fn enroll_with_key(s: &Server, id: &str, key: &std::path::Path) {
    let token = s.add_device(id, &["--group", "fleet"]);
    if !key.exists() {
        run(Command::new("openssl")
            .args(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out"])
            .arg(key));
    }
    let csr = s.path(&format!("{id}.csr.der"));
    run(Command::new("openssl")
        .args(["req", "-new", "-key"])
        .arg(key)
        .args(["-subj", &format!("/CN={id}"), "-outform", "DER", "-out"])
        .arg(&csr));
    let r = curl_enroll(s, id, &token, b64(&std::fs::read(&csr).unwrap()).as_bytes());
    assert_eq!(r.status, 200, "enroll {id}: {}", String::from_utf8_lossy(&r.body));
}

#[test]
fn simulated_fleet_gets_exactly_the_expected_findings_and_the_next_run_diffs() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let s = Server::start_logged(dir, "", Some(&log));
    let rt = runtime();
    let mud = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/mud/acme-cam.json");
    s.cli_ok(&["profile", "import-mud", mud, "--name", "camera"]);
    s.cli_ok(&["profile", "set", "broker", "--tcp", "1883,8883", "--tls-required", "1883,8883"]);
    s.cli_ok(&["profile", "set", "quiet", "--tcp", "8443", "--domains", "ntp.example"]);
    for (id, addr, profile) in [
        ("cam", "127.0.10.10", Some("camera")),
        ("broker", "127.0.10.11", Some("broker")),
        ("sensor", "127.0.10.12", None),
        ("quiet", "127.0.10.13", Some("quiet")),
        ("old", "127.0.10.14", None),
    ] {
        if id == "sensor" || id == "quiet" {
            // Two devices enrolled with one key pair: a cloned image.
            enroll_with_key(&s, id, &s.path("shared.key"));
        } else {
            s.add_device(id, &["--group", "fleet"]);
        }
        s.cli_ok(&["device", "addresses", id, addr]);
        if let Some(p) = profile {
            s.cli_ok(&["device", "profile", id, p]);
        }
    }
    s.cli_ok(&["device", "revoke", "old", "--reason", "stolen"]);
    let cam = sim(
        &rt,
        "127.0.10.10",
        &["23=telnet:root:xc3511", "80=http-basic:admin:admin", "554=rtsp", "443=tls-expired"],
    );
    let _broker = sim(&rt, "127.0.10.11", &["1883=mqtt-anon", "8883=tls-legacy"]);
    let _sensor = sim(&rt, "127.0.10.12", &["21=ftp", "22=ssh:root:root", "1884=mqtt-auth:mqtt:mqtt"]);
    let _old = sim(&rt, "127.0.10.14", &["9000=open"]);

    // Guard rails: an address outside the inventory is refused, whatever the flags.
    for bad in ["127.0.10.99", "192.0.2.1"] {
        let out = s.cli(&["audit", "run", "--address", bad, "--ports", "1-65535", "--rate", "100000"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{bad} is not the address of any device")), "{err}");
    }
    let plan = s.cli_ok(&["audit", "run", "--dry-run", "--ports", "default,1884"]);
    assert!(plan.contains("dry run: 225 probes"), "{plan}");
    assert!(plan.contains("127.0.10.14"), "{plan}");

    let out = s.cli_ok(&["audit", "run", "--ports", "default,1884", "--cert-expiry-days", "60", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["run"]["status"], "finished", "{v}");
    let got = findings(&v);
    let want = expect(&[
        (
            "cam",
            &[
                "exposure/tcp/23",
                "exposure/tcp/80",
                "plaintext/23/telnet",
                "plaintext/80/http",
                "credentials/23/telnet",
                "credentials/80/http",
                "tls/443/expired",
                "tls/443/self-signed",
            ],
        ),
        (
            "broker",
            &[
                "credentials/1883/mqtt-anonymous",
                "plaintext/1883/mqtt",
                "tls-required/1883",
                "tls/8883/legacy-version",
            ],
        ),
        (
            "sensor",
            &[
                "exposure/tcp/21",
                "exposure/tcp/22",
                "exposure/tcp/1884",
                "plaintext/21/ftp",
                "plaintext/1884/mqtt",
                "credentials/1884/mqtt",
                "credentials/22/ssh",
                "identity/cert-expiring",
                "identity/shared-key",
            ],
        ),
        ("quiet", &["identity/cert-expiring", "identity/shared-key"]),
        ("old", &["exposure/tcp/9000", "identity/revoked-online"]),
    ]);
    let got_keys: BTreeSet<_> = got.keys().cloned().collect();
    assert_eq!(
        got_keys,
        want,
        "missing: {:?}\nextra: {:?}\nprobe log: {}",
        want.difference(&got_keys).collect::<Vec<_>>(),
        got_keys.difference(&want).collect::<Vec<_>>(),
        std::fs::read_to_string(v["run"]["summary"]["probe_log"].as_str().unwrap_or_default())
            .unwrap_or_default()
    );
    assert!(got.values().all(|s| s == "new"));
    // Evidence names the user, never the password.
    let by_key = |d: &str, k: &str| {
        v["findings"].as_array().unwrap().iter().find(|f| f["device"] == d && f["key"] == k).unwrap().clone()
    };
    let telnet = by_key("cam", "credentials/23/telnet");
    assert!(
        telnet["evidence"].as_str().unwrap().starts_with("credential accepted for user root"),
        "{telnet}"
    );
    assert_eq!(telnet["severity"], "critical");
    assert!(telnet["baselines"].to_string().contains("ETSI EN 303 645 5.1-1"));
    assert!(by_key("broker", "tls/8883/legacy-version")["title"].as_str().unwrap().contains("TLS 1.1"));
    for secret in ["xc3511", "admin:admin", "YWRtaW46YWRtaW4"] {
        assert!(!out.contains(secret), "{secret} in the run output");
    }
    let probe_log = std::fs::read_to_string(v["run"]["summary"]["probe_log"].as_str().unwrap()).unwrap();
    assert!(probe_log.lines().count() >= 225, "every probe is logged");
    assert!(probe_log.contains("\"telnet-login user=root\""));
    assert!(!probe_log.contains("xc3511"));

    // Reports in three formats.
    let md = s.cli_ok(&["audit", "report", "--format", "markdown"]);
    assert!(
        md.contains(
            "| new | critical | cam | 127.0.10.10:23 | default credential accepted by telnet on TCP 23 |"
        ),
        "{md}"
    );
    let html = s.cli_ok(&["audit", "report", "1", "--format", "html"]);
    assert!(html.starts_with("<!doctype html>") && html.contains("revoked device still answers"));
    let json: Value = serde_json::from_str(&s.cli_ok(&["audit", "report", "--format", "json"])).unwrap();
    assert_eq!(json["findings"].as_array().unwrap().len(), want.len());

    // Telnet on 23 goes away, a second telnet appears on 2323; the certificate horizon
    // goes back to its default.
    drop(cam);
    // Aborted listener tasks close their sockets on the runtime's next turn.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _cam = sim(
        &rt,
        "127.0.10.10",
        &["2323=telnet:admin:admin", "80=http-basic:admin:admin", "554=rtsp", "443=tls-expired"],
    );
    let v: Value =
        serde_json::from_str(&s.cli_ok(&["audit", "run", "--ports", "default,1884", "--json"])).unwrap();
    let got = findings(&v);
    for k in ["exposure/tcp/23", "plaintext/23/telnet", "credentials/23/telnet"] {
        assert_eq!(got[&("cam".to_owned(), k.to_owned())], "resolved", "{k}");
    }
    for k in ["exposure/tcp/2323", "plaintext/2323/telnet", "credentials/2323/telnet"] {
        assert_eq!(got[&("cam".to_owned(), k.to_owned())], "new", "{k}");
    }
    assert_eq!(got[&("cam".to_owned(), "credentials/80/http".to_owned())], "open");
    assert_eq!(got[&("quiet".to_owned(), "identity/cert-expiring".to_owned())], "resolved");
    assert_eq!(v["run"]["summary"]["findings"]["resolved"], 5, "{}", v["run"]["summary"]);
    // A narrower run (one device, scan only) resolves nothing it did not look at.
    let v: Value =
        serde_json::from_str(&s.cli_ok(&["audit", "run", "--device", "sensor", "--scan-only", "--json"]))
            .unwrap();
    let got = findings(&v);
    assert_eq!(got[&("sensor".to_owned(), "credentials/1884/mqtt".to_owned())], "open");
    assert_eq!(got[&("sensor".to_owned(), "exposure/tcp/21".to_owned())], "open");
    assert!(got.keys().all(|(d, _)| d == "sensor"));
    let runs: Value = serde_json::from_str(&s.cli_ok(&["audit", "runs", "--json"])).unwrap();
    assert_eq!(runs["runs"].as_array().unwrap().len(), 3);

    let server_log = std::fs::read_to_string(&log).unwrap();
    assert!(!server_log.contains("xc3511") && !server_log.contains("mqtt:mqtt"));
}

/// nmap's grepable output: address -> open TCP ports.
fn nmap_open(ports: &str, targets: &[&str]) -> BTreeMap<String, BTreeSet<u16>> {
    let out =
        run(Command::new("nmap").args(["-sT", "-Pn", "-n", "-T4", "-p", ports, "-oG", "-"]).args(targets));
    let mut map = BTreeMap::new();
    for line in out.lines().filter(|l| l.starts_with("Host: ") && l.contains("Ports: ")) {
        let addr = line[6..].split_whitespace().next().unwrap().to_owned();
        let open: BTreeSet<u16> = line
            .split("Ports: ")
            .nth(1)
            .unwrap()
            .split(", ")
            .filter(|p| p.contains("/open/"))
            .map(|p| p.split('/').next().unwrap().trim().parse().unwrap())
            .collect();
        map.insert(addr, open);
    }
    map
}

#[test]
fn nmap_sees_the_same_open_ports_as_the_exposure_scan() {
    let s = Server::start();
    let rt = runtime();
    let layout: &[(&str, &str, &[&str])] = &[
        ("n1", "127.0.11.10", &["22=ssh", "80=http", "8080=open", "40000=open"]),
        ("n2", "127.0.11.11", &["21=ftp", "1883=mqtt-anon", "65535=open"]),
        ("n3", "127.0.11.12", &[]),
        ("n4", "127.0.11.13", &["1=open", "554=rtsp", "1023=open", "1024=open"]),
    ];
    let mut sims = Vec::new();
    for (id, addr, services) in layout {
        s.add_device(id, &[]);
        s.cli_ok(&["device", "addresses", id, addr]);
        sims.push(sim(&rt, addr, services));
    }
    let ports = "1-2000,8080,40000,65535";
    let v: Value =
        serde_json::from_str(&s.cli_ok(&["audit", "run", "--scan-only", "--ports", ports, "--json"]))
            .unwrap();
    let mut ours: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
    for f in v["findings"].as_array().unwrap() {
        assert_eq!(f["check"], "exposure", "{f}");
        let (addr, port) = f["target"].as_str().unwrap().rsplit_once(':').unwrap();
        ours.entry(addr.to_owned()).or_default().insert(port.parse().unwrap());
    }
    let theirs = nmap_open(ports, &["127.0.11.10-13"]);
    let theirs: BTreeMap<String, BTreeSet<u16>> = theirs.into_iter().filter(|(_, p)| !p.is_empty()).collect();
    assert_eq!(ours, theirs);
    assert_eq!(ours["127.0.11.10"], BTreeSet::from([22, 80, 8080, 40000]));
    assert_eq!(v["run"]["summary"]["scan_probes"], 4 * 2003);
}

#[test]
fn a_profile_from_a_mud_file_drives_the_audit_and_the_dns_allowlist() {
    let up = harness::dns_upstream::DnsUpstream::start();
    let s = Server::start_with_config(&format!("[dns]\nupstreams = [\"{}\"]\n", up.addr));
    let mud = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/mud/acme-cam.json");
    let out = s.cli(&["profile", "import-mud", mud]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("profile acme-cam-2000 imported"), "{stdout}");
    assert!(stdout.contains("tcp 443,554,8443 udp 3702 domains cloud.acme.example,pool.ntp.org"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("local-networks"));
    let junk = s.path("junk.json");
    std::fs::write(&junk, r#"{"ietf-mud:mud": {"mud-url": "x"}}"#).unwrap();
    let out = s.cli(&["profile", "import-mud", junk.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("MUD file: no \"ietf-access-control-list:acls\""));
    s.add_device("cam-9", &[]);
    s.cli_ok(&["device", "profile", "cam-9", "acme-cam-2000"]);
    let list = s.cli_ok(&["profile", "list"]);
    assert!(list.contains("acme-cam-2000") && list.contains("cam-9"), "{list}");
    let out = s.cli(&["device", "profile", "cam-9", "nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("profile nope not found"));

    // The same profile is the device's DNS allowlist: its domains and their subdomains.
    s.cli_ok(&["device", "addresses", "cam-9", "127.0.12.9"]);
    std::thread::sleep(std::time::Duration::from_millis(600));
    let dns = s.dns.expect("dns port");
    let dig = |name: &str| {
        let out = Command::new("dig")
            .args(["-b", "127.0.12.9", &format!("@{}", dns.ip()), "-p", &dns.port().to_string()])
            .args(["+time=3", "+tries=1", name, "A"])
            .output()
            .expect("dig (Debian dnsutils) is installed");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split("status: ").nth(1).and_then(|r| r.split(',').next()).unwrap_or("?").to_owned()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut first = dig("cloud.acme.example");
    while first != "NOERROR" && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
        first = dig("cloud.acme.example");
    }
    assert_eq!(first, "NOERROR", "the device's address was not attributed within 10 s");
    assert_eq!(dig("eu.cloud.acme.example"), "NOERROR");
    assert_eq!(dig("pool.ntp.org"), "NOERROR");
    assert_eq!(dig("botnet-c2.example"), "NXDOMAIN");
    assert_eq!(up.asked("botnet-c2.example"), 0);
    let log = s.cli_ok(&["dns", "log", "--device", "cam-9", "--blocked"]);
    assert!(log.contains("botnet-c2.example") && log.contains("profile:acme-cam-2000"), "{log}");
    // Taking the profile away gives the device back to its group's policy at once.
    s.cli_ok(&["device", "profile", "cam-9", "--clear"]);
    // Within moments (the attribution table follows the registry within 250 ms; on a
    // loaded machine give it up to 10 s rather than a fixed sleep).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut last = dig("botnet-c2.example");
    while last == "NXDOMAIN" && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
        last = dig("botnet-c2.example");
    }
    assert_ne!(last, "NXDOMAIN", "the profile still applied 10 s after it was cleared");
}

/// The SSH login probe against OpenSSH's sshd (Debian openssh-server), on its own loopback
/// address with a throwaway host key: key exchange, encryption and userauth interoperate,
/// and a refused password is an answer, not an error.
/// Runs OpenSSH on `addr`:22 (password authentication on, `extra` appended to its
/// config), registers `device` there with a profile allowing port 22, runs an audit of
/// port 22 with `args`, stops sshd; the run's JSON.
fn audit_sshd(s: &Server, device: &str, addr: &str, extra: &str, args: &[&str]) -> Value {
    let sshd = std::path::Path::new("/usr/sbin/sshd");
    assert!(sshd.exists(), "/usr/sbin/sshd missing: .ci/run installs openssh-server");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("host_ed25519");
    run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key));
    let cfg = dir.path().join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "ListenAddress {addr}\nPort 22\nHostKey {}\nPidFile {}/sshd.pid\nPasswordAuthentication yes\n\
             KbdInteractiveAuthentication no\nPermitRootLogin yes\nUsePAM no\nStrictModes no\nMaxStartups 100\n{extra}",
            key.display(),
            dir.path().display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let mut child = Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(&cfg)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let up = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        std::net::TcpStream::connect(format!("{addr}:22")).is_ok()
    });
    assert!(up, "sshd did not start");
    s.add_device(device, &[]);
    s.cli_ok(&["device", "addresses", device, addr]);
    s.cli_ok(&["profile", "set", "ssh-only", "--tcp", "22"]);
    s.cli_ok(&["device", "profile", device, "ssh-only"]);
    let mut cmd = vec!["audit", "run", "--ports", "22", "--json"];
    cmd.extend_from_slice(args);
    let out = s.cli_ok(&cmd);
    let _ = child.kill();
    let _ = child.wait();
    serde_json::from_str(&out).unwrap()
}

#[test]
fn the_ssh_login_probe_speaks_to_openssh() {
    let s = Server::start();
    let v = audit_sshd(&s, "real-ssh", "127.0.13.10", "", &["--attempts", "3"]);
    let out = v.to_string();
    assert_eq!(findings(&v).len(), 0, "{out}");
    let log = std::fs::read_to_string(v["run"]["summary"]["probe_log"].as_str().unwrap()).unwrap();
    let logins: Vec<&str> = log.lines().filter(|l| l.contains("ssh-login user=")).collect();
    assert_eq!(logins.len(), 3, "{log}");
    assert!(logins.iter().all(|l| l.contains("\"result\":\"refused\"")), "{log}");
}

/// `(device, target, reason)` of the run's checks that could not be made.
fn not_tested(v: &Value) -> Vec<(String, String, String)> {
    v["run"]["summary"]["not_tested"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            assert_eq!(n["check"], "credentials");
            let s = |k: &str| n[k].as_str().unwrap().to_owned();
            (s("device"), s("target"), s("reason"))
        })
        .collect()
}

#[test]
fn a_tls_service_the_verifier_refuses_is_still_inspected() {
    // The weakest devices: a 1024-bit RSA key, signed with SHA-1, self-signed; served by
    // OpenSSL at security level 0, as old firmware does.
    let dir = tempfile::tempdir().unwrap();
    let (key, cert) = (dir.path().join("weak.key"), dir.path().join("weak.crt"));
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:1024",
            "-sha1",
            "-nodes",
            "-subj",
            "/CN=weak-cam",
            "-days",
            "2",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    let mut server = Command::new("openssl")
        .args(["s_server", "-accept", "127.0.13.21:8443", "-cipher", "DEFAULT:@SECLEVEL=0", "-www", "-cert"])
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let up = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        std::net::TcpStream::connect("127.0.13.21:8443").is_ok()
    });
    assert!(up, "openssl s_server did not start");
    let s = Server::start();
    s.add_device("weak-cam", &[]);
    s.cli_ok(&["device", "addresses", "weak-cam", "127.0.13.21"]);
    s.cli_ok(&["profile", "set", "https-only", "--tcp", "8443"]);
    s.cli_ok(&["device", "profile", "weak-cam", "https-only"]);
    let out = s.cli_ok(&["audit", "run", "--ports", "8443", "--json"]);
    let _ = server.kill();
    let _ = server.wait();
    let v: Value = serde_json::from_str(&out).unwrap();
    let got: BTreeSet<_> = findings(&v).into_keys().collect();
    let want = expect(&[(
        "weak-cam",
        &["tls/8443/weak-key", "tls/8443/weak-signature", "tls/8443/self-signed", "tls/8443/legacy-version"],
    )]);
    let log = std::fs::read_to_string(v["run"]["summary"]["probe_log"].as_str().unwrap()).unwrap();
    assert_eq!(got, want, "{out}\n{log}");
    let weak = v["findings"].as_array().unwrap().iter().find(|f| f["key"] == "tls/8443/weak-key").unwrap();
    assert!(weak["evidence"].as_str().unwrap().contains("RSA 1024 bits"), "{weak}");
    assert!(log.contains("inspected only"), "{log}");
}

#[test]
fn an_ssh_login_that_cannot_be_tried_is_reported_as_not_tested() {
    let s = Server::start();
    // Only a key exchange the audit's client does not speak (older Dropbear and OpenSSH
    // builds offer no curve25519).
    let v = audit_sshd(&s, "old-ssh", "127.0.13.12", "KexAlgorithms diffie-hellman-group14-sha256\n", &[]);
    let out = v.to_string();
    assert_eq!(findings(&v).len(), 0, "{out}");
    let nt = not_tested(&v);
    assert_eq!(nt.len(), 1, "{out}");
    assert_eq!((nt[0].0.as_str(), nt[0].1.as_str()), ("old-ssh", "127.0.13.12:22"));
    assert!(nt[0].2.contains("no common key exchange"), "{:?}", nt[0]);
    // In the report too, as its own status.
    let md = s.cli_ok(&["audit", "report", "--format", "markdown"]);
    assert!(
        md.contains("**Not tested**") && md.contains("old-ssh 127.0.13.12:22: credentials not tested"),
        "{md}"
    );
    let html = s.cli_ok(&["audit", "report", "--format", "html"]);
    assert!(html.contains("<h2>Not tested</h2>"), "{html}");
}

#[test]
fn no_password_is_sent_to_a_device_that_is_not_active() {
    let s = Server::start();
    let rt = runtime();
    let _cam = sim(&rt, "127.0.13.30", &["23=telnet:root:xc3511"]);
    s.add_device("held-cam", &[]);
    s.cli_ok(&["device", "addresses", "held-cam", "127.0.13.30"]);
    s.cli_ok(&["profile", "set", "telnet-ok", "--tcp", "23"]);
    s.cli_ok(&["device", "profile", "held-cam", "telnet-ok"]);
    s.cli_ok(&["device", "suspend", "held-cam", "--reason", "seized"]);
    let out = s.cli_ok(&["audit", "run", "--ports", "23", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let got: BTreeSet<_> = findings(&v).into_keys().collect();
    assert_eq!(got, expect(&[("held-cam", &["plaintext/23/telnet"])]), "{out}");
    let nt = not_tested(&v);
    assert_eq!(nt.len(), 1, "{out}");
    assert!(nt[0].2.starts_with("device is suspended"), "{:?}", nt[0]);
    let log = std::fs::read_to_string(v["run"]["summary"]["probe_log"].as_str().unwrap()).unwrap();
    assert!(!log.contains("telnet-login"), "a login was tried:\n{log}");
    assert_eq!(v["run"]["summary"]["login_attempts"], 0);

    // Active again: the default credential is found.
    s.cli_ok(&["device", "resume", "held-cam"]);
    let v: Value = serde_json::from_str(&s.cli_ok(&["audit", "run", "--ports", "23", "--json"])).unwrap();
    assert!(findings(&v).contains_key(&("held-cam".to_owned(), "credentials/23/telnet".to_owned())), "{v}");
    assert!(not_tested(&v).is_empty());
}
