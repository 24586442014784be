//! The DNS port against real clients (`dig` from Debian dnsutils, raw UDP) and a local
//! upstream that counts what reaches it.
#![allow(clippy::unwrap_used)]

mod harness;

use std::process::Command;
use std::time::Duration;

use harness::dns_upstream::DnsUpstream;
use harness::{Server, dig_at};

/// `dig @server NAME TYPE` with extra flags; the whole output.
fn dig(s: &Server, args: &[&str]) -> String {
    dig_at(s.dns.expect("dns port"), args)
}

fn status(out: &str) -> &str {
    out.split("status: ").nth(1).and_then(|r| r.split(',').next()).unwrap_or("?")
}

fn config(up: &DnsUpstream, dead: std::net::SocketAddr, extra: &str) -> String {
    let dir = tempfile::tempdir().unwrap().keep();
    let list = dir.join("ads.txt");
    std::fs::write(
        &list,
        "# a blocklist in three formats\n0.0.0.0 hosts-entry.test\n||ads.test^\n@@||ok.ads.test^\n*.wild.test\ngarbage line here\n",
    )
    .unwrap();
    format!(
        r#"
[dns]
upstreams = ["{dead}", "{up}"]
upstream_timeout = "300ms"
unknown_clients = "lobby"
{extra}

[dns.lists.ads]
path = "{list}"

[[dns.policies]]
name = "lobby"
mode = "blocklist"
lists = ["ads"]
deny = ["evil.test"]
"#,
        up = up.addr,
        list = list.display()
    )
}

#[test]
fn blocklist_policy_cache_cname_and_failover() {
    let up = DnsUpstream::start();
    // A first upstream that never answers: every query fails over to the second.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let s = Server::start_with_config(&config(&up, dead.local_addr().unwrap(), ""));

    let out = dig(&s, &["allowed.test", "A"]);
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert!(out.contains("192.0.2.1"), "{out}");
    // Second time from the cache: the upstream saw it once, the TTL counts down.
    let again = dig(&s, &["allowed.test", "A"]);
    assert!(again.contains("192.0.2.1"), "{again}");
    assert_eq!(up.asked("allowed.test."), 1);

    // Blocked by the list (subtree rule), by a hosts entry, by a deny rule: NXDOMAIN, and
    // nothing asked upstream.
    for name in ["ads.test", "x.ads.test", "hosts-entry.test", "evil.test", "a.wild.test"] {
        let out = dig(&s, &[name, "A"]);
        assert_eq!(status(&out), "NXDOMAIN", "{name}: {out}");
    }
    assert_eq!(up.asked("ads.test.") + up.asked("x.ads.test."), 0);
    // An exception and the wildcard's own name are resolved.
    assert_eq!(status(&dig(&s, &["ok.ads.test", "A"])), "NOERROR");
    assert_eq!(status(&dig(&s, &["wild.test", "A"])), "NOERROR");

    // CNAME inspection: alias.test is fine, but its chain leads into ads.test.
    let out = dig(&s, &["alias.test", "A"]);
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    assert_eq!(up.asked("alias.test."), 1, "the answer was fetched, then blocked");

    // Negative caching from the SOA (2 s): asked once within it, again after it.
    assert_eq!(status(&dig(&s, &["gone.test", "A"])), "NXDOMAIN");
    assert_eq!(status(&dig(&s, &["gone.test", "A"])), "NXDOMAIN");
    assert_eq!(up.asked("gone.test."), 1);
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(status(&dig(&s, &["gone.test", "A"])), "NXDOMAIN");
    assert_eq!(up.asked("gone.test."), 2);

    // TTL expiry: a 1-second answer is fetched again after it expires.
    dig(&s, &["short.test", "A"]);
    std::thread::sleep(Duration::from_millis(1200));
    dig(&s, &["short.test", "A"]);
    assert_eq!(up.asked("short.test."), 2);
}

#[test]
fn truncation_tcp_retry_malformed_and_any() {
    let up = DnsUpstream::start();
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let s = Server::start_with_config(&config(&up, dead.local_addr().unwrap(), ""));
    let dns = s.dns.unwrap();

    // Without EDNS a 20-record TXT answer does not fit 512 bytes: TC over UDP…
    let out = dig(&s, &["big.test", "TXT", "+noedns", "+ignore"]);
    assert!(out.contains(" tc"), "no TC flag: {out}");
    // …and dig's retry over TCP gets all of it.
    let out = dig(&s, &["big.test", "TXT", "+noedns"]);
    assert_eq!(out.matches("\"record ").count(), 20, "{out}");
    let out = dig(&s, &["big.test", "TXT", "+tcp"]);
    assert_eq!(out.matches("\"record ").count(), 20, "{out}");

    // ANY gets the minimal RFC 8482 answer.
    let out = dig(&s, &["allowed.test", "ANY"]);
    assert!(out.contains("RFC8482"), "{out}");

    // Malformed packets: FORMERR with the query's id when there is a header, silence
    // when there is not; the server keeps answering.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.send_to(&[0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff, 0xff], dns).unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    assert!(n >= 12);
    assert_eq!(&buf[..2], &[0x12, 0x34]);
    assert_eq!(buf[3] & 0x0f, 1, "FORMERR");
    sock.send_to(&[1, 2, 3], dns).unwrap();
    assert!(sock.recv_from(&mut buf).is_err(), "a 3-byte packet gets no answer");
    for junk in [vec![0u8; 0], vec![0xff; 600], (0..=255u8).collect()] {
        let _ = sock.send_to(&junk, dns);
    }
    assert_eq!(status(&dig(&s, &["allowed.test", "A"])), "NOERROR");
}

#[test]
fn unknown_clients_are_refused_by_default() {
    let up = DnsUpstream::start();
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let cfg = config(&up, dead.local_addr().unwrap(), "").replace("unknown_clients = \"lobby\"", "");
    let s = Server::start_with_config(&cfg);
    let out = dig(&s, &["allowed.test", "A"]);
    assert_eq!(status(&out), "REFUSED", "{out}");
    assert_eq!(up.asked("allowed.test."), 0, "never an open resolver");
}

/// `dig` from a chosen loopback source address (each stands for one device).
fn dig_from(s: &Server, src: &str, args: &[&str]) -> String {
    let mut a = vec!["-b", src];
    a.extend_from_slice(args);
    dig(s, &a)
}

#[test]
fn devices_are_attributed_by_address_and_their_queries_logged() {
    let up = DnsUpstream::start();
    let dir = tempfile::tempdir().unwrap().keep();
    std::fs::write(dir.join("vendor.txt"), "||allowed.test^\n").unwrap();
    std::fs::write(dir.join("ads.txt"), "||ads.test^\n").unwrap();
    let cfg = format!(
        r#"
[dns]
upstreams = ["{up}"]

[dns.lists.vendor]
path = "{vendor}"
[dns.lists.ads]
path = "{ads}"

[[dns.policies]]
name = "cameras"
groups = ["cameras"]
mode = "allowlist"
lists = ["vendor"]

[[dns.policies]]
name = "lobby"
groups = ["lobby"]
mode = "blocklist"
lists = ["ads"]
block = "null"
"#,
        up = up.addr,
        vendor = dir.join("vendor.txt").display(),
        ads = dir.join("ads.txt").display()
    );
    let s = Server::start_with_config(&cfg);
    s.add_device("cam-01", &["--group", "cameras"]);
    s.add_device("screen-01", &["--group", "lobby"]);
    s.add_device("other-01", &["--group", "lobby"]);
    let out = s.cli_ok(&["device", "addresses", "cam-01", "127.0.0.2"]);
    assert!(out.contains("127.0.0.2"), "{out}");
    s.cli_ok(&["device", "addresses", "screen-01", "127.0.0.3/32", "127.0.8.0/24"]);
    // One address, one device; and only real addresses.
    let taken = s.cli(&["device", "addresses", "other-01", "127.0.0.2"]);
    assert!(!taken.status.success());
    assert!(String::from_utf8_lossy(&taken.stderr).contains("held by device cam-01"));
    let bad = s.cli(&["device", "addresses", "other-01", "not-an-ip"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not an IP address or CIDR block"));
    std::thread::sleep(Duration::from_millis(600)); // the resolver's view follows within 250 ms

    // The camera: default-deny allowlist.
    assert!(dig_from(&s, "127.0.0.2", &["allowed.test", "A"]).contains("192.0.2.1"));
    let out = dig_from(&s, "127.0.0.2", &["ads.test", "A"]);
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    let out = dig_from(&s, "127.0.0.2", &["news.test", "A"]);
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    // The screen (exact address and a /24): blocklist answering 0.0.0.0.
    let out = dig_from(&s, "127.0.0.3", &["ads.test", "A"]);
    assert!(out.contains("0.0.0.0"), "{out}");
    assert!(dig_from(&s, "127.0.8.77", &["ads.test", "A"]).contains("0.0.0.0"));
    assert_eq!(status(&dig_from(&s, "127.0.8.77", &["news.test", "A"])), "NOERROR");
    // Nobody's address: refused.
    assert_eq!(status(&dig_from(&s, "127.0.0.1", &["allowed.test", "A"])), "REFUSED");

    // The query log, per device, blocked only, and the top blocked names.
    let mut log = String::new();
    for _ in 0..40 {
        log = s.cli_ok(&["dns", "log", "--device", "cam-01", "--blocked"]);
        if log.lines().count() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(log.lines().count(), 2, "{log}");
    assert!(log.contains("news.test") && log.contains("not in allowlist (default deny)"), "{log}");
    assert!(!log.contains("allowed.test"), "{log}");
    let json: serde_json::Value =
        serde_json::from_str(&s.cli_ok(&["dns", "log", "--json", "--since", "1h"])).unwrap();
    let all = json["queries"].as_array().unwrap();
    assert!(all.iter().any(|q| q["action"] == "refused" && q["client"] == "127.0.0.1"), "{json}");
    assert!(all.iter().any(|q| q["device"] == "screen-01" && q["action"] == "blocked"));
    let top = s.cli_ok(&["dns", "top", "--device", "screen-01"]);
    assert!(top.lines().next().unwrap().contains("ads.test"), "{top}");
    assert!(top.lines().next().unwrap().trim_start().starts_with('2'), "{top}");
    let metrics = s.metrics_now();
    assert!(metrics.contains("portcullis_dns_queries_total{action=\"blocked\"}"), "{metrics}");

    // Suspending the camera refuses its queries within a second.
    s.cli_ok(&["device", "suspend", "cam-01"]);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(status(&dig_from(&s, "127.0.0.2", &["allowed.test", "A"])), "REFUSED");
}

#[test]
fn dns_over_tls_and_https_attribute_by_certificate() {
    let up = DnsUpstream::start();
    let dir = tempfile::tempdir().unwrap().keep();
    std::fs::write(dir.join("vendor.txt"), "||allowed.test^\n").unwrap();
    let cfg = format!(
        r#"
[dns]
upstreams = ["{up}"]
unknown_clients = "open"

[dns.lists.vendor]
path = "{vendor}"

[[dns.policies]]
name = "cameras"
groups = ["cameras"]
mode = "allowlist"
lists = ["vendor"]

[[dns.policies]]
name = "open"
mode = "blocklist"
"#,
        up = up.addr,
        vendor = dir.join("vendor.txt").display()
    );
    let s = Server::start_with_config(&cfg);
    let (cert, key) = harness::upstream::enroll(&s, "cam-01", "cameras");
    let (root, _) = s.ca_files();
    let dot = s.dot.expect("dot port");
    let ca = format!("+tls-ca={}", root.display());
    // DoT, and DoH on the device port, verified against the CA.
    let tls = |extra: &[&str]| dig_at(dot, &[&["+tls", &ca, "+tls-hostname=localhost"], extra].concat());
    let certfile = format!("+tls-certfile={}", cert.display());
    let keyfile = format!("+tls-keyfile={}", key.display());

    // DoT with the camera's certificate: its allowlist applies.
    let out = tls(&[&certfile, &keyfile, "allowed.test", "A"]);
    assert!(out.contains("192.0.2.1"), "{out}");
    let out = tls(&[&certfile, &keyfile, "news.test", "A"]);
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    // DoT without a certificate: an unknown client (here: the open policy).
    assert_eq!(status(&tls(&["news.test", "A"])), "NOERROR");

    // DoH (RFC 8484) on the device port: dig POST and GET, curl POST.
    let https =
        |extra: &[&str]| dig_at(s.device, &[&["+https", &ca, "+tls-hostname=localhost"], extra].concat());
    let out = https(&[&certfile, &keyfile, "news.test", "A"]);
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    let out = https(&[&certfile, &keyfile, "+https-get", "allowed.test", "A"]);
    assert!(out.contains("192.0.2.1"), "{out}");
    assert_eq!(status(&https(&["news.test", "A"])), "NOERROR");
    // A query for allowed.test A (id 0, RD) sent by curl as application/dns-message.
    let q: &[u8] = b"\x00\x00\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07allowed\x04test\x00\x00\x01\x00\x01";
    std::fs::write(dir.join("q.bin"), q).unwrap();
    let r = harness::curl_mtls(
        &s,
        &cert,
        &key,
        "/dns-query",
        &[
            "-H",
            "Content-Type: application/dns-message",
            "--data-binary",
            &format!("@{}", dir.join("q.bin").display()),
        ],
    );
    assert_eq!(r.status, 200);
    assert!(r.body.windows(4).any(|w| w == [192, 0, 2, 1]), "{:?}", r.body);
    // Wrong content type and garbage are refused with a problem, and the port keeps going.
    let r =
        harness::curl_mtls(&s, &cert, &key, "/dns-query", &["-H", "Content-Type: text/plain", "--data", "x"]);
    assert_eq!(r.status, 415);
    let r = harness::curl_mtls(&s, &cert, &key, "/dns-query?dns=!!!", &[]);
    assert_eq!(r.status, 400);

    // Revocation applies to the open DoT/DoH paths at the next query.
    s.cli_ok(&["device", "revoke", "cam-01"]);
    assert_eq!(status(&tls(&[&certfile, &keyfile, "allowed.test", "A"])), "REFUSED");
    let mut log = String::new();
    for _ in 0..40 {
        log = s.cli_ok(&["dns", "log", "--device", "cam-01"]);
        if log.contains("refused") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(log.contains("device is not active"), "{log}");
}

/// A one-file HTTP server on 127.0.0.1 whose body can be changed; counts GETs.
struct ListServer {
    addr: std::net::SocketAddr,
    body: std::sync::Arc<std::sync::Mutex<String>>,
    gets: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Answer 503 from now on.
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ListServer {
    fn start(body: &str) -> Self {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let body = std::sync::Arc::new(std::sync::Mutex::new(body.to_owned()));
        let gets = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (b, g, f) = (body.clone(), gets.clone(), failing.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                g.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let text = b.lock().unwrap().clone();
                if f.load(std::sync::atomic::Ordering::SeqCst) {
                    let _ = write!(
                        c,
                        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    continue;
                }
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
            }
        });
        Self { addr, body, gets, failing }
    }
}

/// `allowed.test A` with the given id, as a raw UDP query.
fn raw_query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07allowed\x04test\x00\x00\x01\x00\x01");
    q
}

#[test]
fn lists_from_urls_and_files_refresh_with_an_atomic_swap() {
    let up = DnsUpstream::start();
    let web = ListServer::start("||ads.test^\n");
    let dir = tempfile::tempdir().unwrap().keep();
    let file = dir.join("local.txt");
    std::fs::write(&file, "# nothing yet\n").unwrap();
    let cfg = format!(
        r#"
[dns]
upstreams = ["{up}"]
unknown_clients = "lobby"
per_client = {{ per_second = 1000000, burst = 1000000 }}

[dns.lists.remote]
url = "http://{web}/ads.txt"
refresh = "1s"

[dns.lists.local]
path = "{file}"
refresh = "1s"

[[dns.policies]]
name = "lobby"
mode = "blocklist"
lists = ["remote", "local"]
"#,
        up = up.addr,
        web = web.addr,
        file = file.display()
    );
    let s = Server::start_with_config(&cfg);
    let wait_for = |name: &str, want: &str| {
        for _ in 0..60 {
            if status(&dig(&s, &[name, "A"])) == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{name} never became {want}");
    };
    // Fetched at start; a copy is kept in the data dir for the next start.
    wait_for("ads.test", "NXDOMAIN");
    assert!(std::fs::read_to_string(s.data_dir().join("dns-lists/remote.txt")).unwrap().contains("ads.test"));
    // Both change while queries keep coming: every answer is a whole one.
    let dns = s.dns.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop2, target) = (stop.clone(), dns);
    let load = std::thread::spawn(move || {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let (mut ok, mut bad) = (0u32, 0u32);
        let mut id = 0u16;
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            id = id.wrapping_add(1);
            sock.send_to(&raw_query(id), target).unwrap();
            let mut buf = [0u8; 512];
            match sock.recv_from(&mut buf) {
                Ok((n, _)) if n > 12 && buf[..2] == id.to_be_bytes() && buf[3] & 0x0f == 0 => ok += 1,
                _ => bad += 1,
            }
        }
        (ok, bad)
    });
    *web.body.lock().unwrap() = "||tracker.test^\n".into();
    std::fs::write(&file, "0.0.0.0 local-ad.test\n").unwrap();
    wait_for("tracker.test", "NXDOMAIN");
    wait_for("local-ad.test", "NXDOMAIN");
    wait_for("ads.test", "NOERROR");
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, bad) = load.join().unwrap();
    assert!(ok > 100, "{ok} answers");
    assert_eq!(bad, 0, "{bad} of {} queries failed during refreshes", ok + bad);
    assert!(web.gets.load(std::sync::atomic::Ordering::SeqCst) >= 2);

    // The list server fails: the current copy keeps serving.
    web.failing.store(true, std::sync::atomic::Ordering::SeqCst);
    let before = web.gets.load(std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(web.gets.load(std::sync::atomic::Ordering::SeqCst) > before, "refresh was tried");
    assert_eq!(status(&dig(&s, &["tracker.test", "A"])), "NXDOMAIN");
}

#[test]
fn encrypted_upstreams_dot_and_doh_are_verified() {
    // Instance B: an open resolver in front of the test upstream, reachable over DoT and DoH.
    let up = DnsUpstream::start();
    let b = Server::start_with_config(&format!(
        "[dns]\nupstreams = [\"{}\"]\nunknown_clients = \"open\"\n[[dns.policies]]\nname = \"open\"\nmode = \"blocklist\"\n",
        up.addr
    ));
    let (b_root, _) = b.ca_files();
    let b_dot = b.dot.unwrap();
    let through = |upstreams: &str, ca: bool| -> Server {
        let ca_line = if ca { format!("upstream_ca = \"{}\"\n", b_root.display()) } else { String::new() };
        Server::start_with_config(&format!(
            "[dns]\nupstreams = [{upstreams}]\n{ca_line}upstream_timeout = \"1s\"\nunknown_clients = \"open\"\n[[dns.policies]]\nname = \"open\"\nmode = \"blocklist\"\n"
        ))
    };
    // Over DoT, after a first DoT upstream that refuses connections (failover).
    let a = through(&format!("\"tls://127.0.0.1:1#localhost\", \"tls://{b_dot}#localhost\""), true);
    let out = dig(&a, &["allowed.test", "A"]);
    assert!(out.contains("192.0.2.1"), "{out}");
    assert_eq!(up.asked("allowed.test."), 1);
    // Over DoH (RFC 8484 POST) to B's device port.
    let a = through(&format!("\"https://localhost:{}/dns-query\"", b.device.port()), true);
    let out = dig(&a, &["short.test", "A"]);
    assert!(out.contains("192.0.2.4"), "{out}");
    assert_eq!(up.asked("short.test."), 1);
    // An upstream whose certificate is not trusted is never used.
    let a = through(&format!("\"tls://{b_dot}#localhost\""), false);
    assert_eq!(status(&dig(&a, &["gone.test", "A"])), "SERVFAIL");
    assert_eq!(up.asked("gone.test."), 0);
}

#[test]
fn dnspython_over_udp_tcp_and_tls_with_a_client_certificate() {
    let up = DnsUpstream::start();
    let dir = tempfile::tempdir().unwrap().keep();
    std::fs::write(dir.join("ads.txt"), "||ads.test^\n").unwrap();
    let s = Server::start_with_config(&format!(
        r#"
[dns]
upstreams = ["{up}"]
unknown_clients = "open"
[dns.lists.ads]
path = "{ads}"
[[dns.policies]]
name = "open"
mode = "blocklist"
[[dns.policies]]
name = "cameras"
groups = ["cameras"]
mode = "blocklist"
lists = ["ads"]
"#,
        up = up.addr,
        ads = dir.join("ads.txt").display()
    ));
    let (cert, key) = harness::upstream::enroll(&s, "cam-01", "cameras");
    let (root, _) = s.ca_files();
    let (dns, dot) = (s.dns.unwrap(), s.dot.unwrap());
    let script = format!(
        r#"
import ssl, dns.message, dns.query, dns.rcode
def ask(how, name, **kw):
    q = dns.message.make_query(name, "A")
    r = getattr(dns.query, how)(q, "127.0.0.1", timeout=3, **kw)
    return dns.rcode.to_text(r.rcode()), [a.to_text() for rr in r.answer for a in rr]
print("udp", *ask("udp", "allowed.test", port={dp}))
print("tcp", *ask("tcp", "ads.test", port={dp}))
ctx = ssl.create_default_context(cafile="{root}")
ctx.load_cert_chain("{cert}", "{key}")
ctx.set_alpn_protocols(["dot"])
print("tls", *ask("tls", "ads.test", port={tp}, ssl_context=ctx, server_hostname="localhost"))
print("tls", *ask("tls", "allowed.test", port={tp}, ssl_context=ctx, server_hostname="localhost"))
"#,
        dp = dns.port(),
        tp = dot.port(),
        root = root.display(),
        cert = cert.display(),
        key = key.display()
    );
    let out = Command::new("python3").arg("-c").arg(&script).output().expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dnspython (pip dnspython) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    // By address (unknown client, open policy) over UDP and TCP; by certificate over DoT.
    assert_eq!(
        lines,
        [
            "udp NOERROR ['192.0.2.1']",
            "tcp NOERROR ['192.0.2.2']",
            "tls NXDOMAIN []",
            "tls NOERROR ['192.0.2.1']"
        ]
    );
}

#[test]
fn policies_are_shown_overridden_per_device_reloaded_and_rate_limited() {
    let up = DnsUpstream::start();
    let dir = tempfile::tempdir().unwrap().keep();
    std::fs::write(dir.join("vendor.txt"), "||allowed.test^\nnot a rule\n").unwrap();
    let cfg = |extra_device: &str| {
        format!(
            r#"
[dns]
upstreams = ["{up}"]
per_client = {{ per_second = 20, burst = 20 }}
[dns.lists.vendor]
path = "{vendor}"
[[dns.policies]]
name = "cameras"
groups = ["cameras"]
mode = "allowlist"
lists = ["vendor"]
[[dns.policies]]
name = "lab"
devices = [{extra_device}]
mode = "blocklist"
"#,
            up = up.addr,
            vendor = dir.join("vendor.txt").display()
        )
    };
    let s = Server::start_with_config(&cfg(""));
    std::fs::write(s.path("portcullis.toml"), cfg("")).unwrap();
    let p = s.cli_ok(&["dns", "policies"]);
    assert!(p.contains("policy cameras (allowlist)"), "{p}");
    assert!(p.contains("every other name: DENIED"), "{p}");
    assert!(p.contains("list vendor: 1 rules, 0 comments, 1 junk lines skipped"), "{p}");
    assert!(p.contains("queries from no known device: refuse"), "{p}");

    s.add_device("cam-01", &["--group", "cameras"]);
    s.cli_ok(&["device", "addresses", "cam-01", "127.0.0.2"]);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(status(&dig_from(&s, "127.0.0.2", &["news.test", "A"])), "NXDOMAIN");
    // A device-level override, by reload: the camera now gets the lab's blocklist.
    std::fs::write(s.path("portcullis.toml"), cfg("\"cam-01\"")).unwrap();
    s.cli_ok(&["dns", "reload"]);
    assert_eq!(status(&dig_from(&s, "127.0.0.2", &["news.test", "A"])), "NOERROR");

    // 20 queries/s with a burst of 20 per address: a flood from one address is cut off,
    // another address is still answered.
    let sock = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let dns = s.dns.unwrap();
    for id in 0..200u16 {
        sock.send_to(&raw_query(id), dns).unwrap();
    }
    let mut answered = 0;
    let mut buf = [0u8; 512];
    while sock.recv_from(&mut buf).is_ok() {
        answered += 1;
    }
    assert!((15..=40).contains(&answered), "{answered} of 200 answered");
    assert_eq!(
        status(&dig_from(&s, "127.0.0.3", &["allowed.test", "A"])),
        "REFUSED",
        "other clients still served"
    );
}

/// A plain list matches the names it lists (Pi-hole's reading) unless it says
/// `match = "subtree"` (a threat list: the names below a listed domain are blocked too,
/// as unbound and dnsmasq read such lists).
#[test]
fn plain_lists_match_exactly_or_their_subtree() {
    let up = DnsUpstream::start();
    let dir = tempfile::tempdir().unwrap().keep();
    let (ads, threats) = (dir.join("ads.txt"), dir.join("threats.txt"));
    std::fs::write(&ads, "tracker.test\n0.0.0.0 pixel.test\n").unwrap();
    std::fs::write(&threats, "c2.test\n0.0.0.0 dropper.test\n").unwrap();
    let cfg = |matching: &str| {
        format!(
            r#"
[dns]
upstreams = ["{up}"]
unknown_clients = "lobby"
[dns.lists.ads]
path = "{ads}"
[dns.lists.threats]
path = "{threats}"
match = "{matching}"
[[dns.policies]]
name = "lobby"
mode = "blocklist"
lists = ["ads", "threats"]
"#,
            up = up.addr,
            ads = ads.display(),
            threats = threats.display()
        )
    };
    let s = Server::start_with_config(&cfg("subtree"));
    for name in ["tracker.test", "pixel.test", "c2.test", "x.c2.test", "a.b.dropper.test", "dropper.test"] {
        assert_eq!(status(&dig(&s, &[name, "A"])), "NXDOMAIN", "{name}");
    }
    // The exact list's subdomains are not on it: resolved upstream.
    for name in ["www.tracker.test", "cdn.pixel.test"] {
        assert_eq!(status(&dig(&s, &[name, "A"])), "NOERROR", "{name}");
    }
    assert_eq!(up.asked("x.c2.test.") + up.asked("a.b.dropper.test."), 0, "blocked without asking");
    let policies = s.cli_ok(&["dns", "policies", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&policies).unwrap();
    let matching: Vec<_> = v["lists"].as_array().unwrap().iter().map(|l| l["match"].clone()).collect();
    assert_eq!(matching, [serde_json::json!("exact"), serde_json::json!("subtree")], "{policies}");
}
