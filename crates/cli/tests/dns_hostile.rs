//! The DNS port under hostile conditions: an upstream that stalls on one name, thousands
//! of slow TCP clients, a UDP flood of unique names in a slow zone. The names that can be
//! answered keep being answered, and descriptors and memory stay bounded.
#![allow(clippy::unwrap_used)]

mod harness;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use harness::dns_upstream::{DnsUpstream, STALL};
use harness::{Server, dig_at};

fn status(out: &str) -> String {
    out.split("status: ").nth(1).and_then(|r| r.split(',').next()).unwrap_or("no answer").to_owned()
}

/// One test of this file at a time: the flood test loads both cores of a small machine on
/// purpose, and the stall tests measure deadlines of a few hundred milliseconds.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn open_resolver(upstreams: &str, extra: &str) -> Server {
    Server::start_with_config(&format!(
        "[dns]\nupstreams = [{upstreams}]\nunknown_clients = \"open\"\n{extra}\n\
         [[dns.policies]]\nname = \"open\"\nmode = \"blocklist\"\n"
    ))
}

/// One round: a name that stalls beyond the deadline, asked together with ten others;
/// then, once the stalled answer has arrived late, ten more. Returns the statuses.
fn stall_round(at: SocketAddr, round: usize, tcp_client: bool) -> (String, Vec<String>, Vec<String>) {
    let flags: &[&str] = if tcp_client { &["+tcp"] } else { &[] };
    let ask = move |name: String| {
        let flags = flags.to_vec();
        std::thread::spawn(move || {
            let mut args = flags;
            args.extend([name.as_str(), "A"]);
            status(&dig_at(at, &args))
        })
    };
    let stalled = ask(format!("r{round}.stall.test"));
    std::thread::sleep(Duration::from_millis(50));
    let others: Vec<_> = (0..10).map(|i| ask(format!("r{round}-n{i}.test"))).collect();
    let others: Vec<String> = others.into_iter().map(|t| t.join().unwrap()).collect();
    let stalled = stalled.join().unwrap();
    // The stalled answer arrives late on the upstream connection; it must not be taken
    // for anyone else's.
    std::thread::sleep(STALL + Duration::from_millis(500));
    let after: Vec<_> = (0..10).map(|i| ask(format!("r{round}-late{i}.test"))).collect();
    let after = after.into_iter().map(|t| t.join().unwrap()).collect();
    (stalled, others, after)
}

fn assert_stall_costs_only_itself(at: SocketAddr, what: &str) {
    for round in 0..2 {
        let (stalled, others, after) = stall_round(at, round, round == 1);
        assert_eq!(stalled, "SERVFAIL", "{what}: the stalled name");
        assert!(others.iter().all(|s| s == "NOERROR"), "{what}, round {round}: beside the stall: {others:?}");
        assert!(
            after.iter().all(|s| s == "NOERROR"),
            "{what}, round {round}: after the late answer: {after:?}"
        );
    }
}

/// A TCP upstream (RFC 7766, answering out of order) that stalls on one name for longer
/// than `upstream_timeout`: only that query fails; the late answer is dropped, never
/// handed to a later query.
#[test]
fn a_stalling_tcp_upstream_costs_only_the_stalled_query() {
    let _one = one_at_a_time();
    let up = DnsUpstream::start();
    let a = open_resolver(&format!("\"tcp://{}\"", up.addr), "upstream_timeout = \"500ms\"");
    assert_stall_costs_only_itself(a.dns.unwrap(), "tcp upstream");
}

/// The same through a DoT upstream: instance B (itself Portcullis) serves DoT and answers
/// the queries pipelined on one connection as each is ready; A asks B with a deadline
/// shorter than the stall.
#[test]
fn a_stalling_dot_upstream_costs_only_the_stalled_query() {
    let _one = one_at_a_time();
    let up = DnsUpstream::start();
    let b = open_resolver(&format!("\"{}\"", up.addr), "upstream_timeout = \"10s\"");
    let (b_root, _) = b.ca_files();
    let a = open_resolver(
        &format!("\"tls://{}#localhost\"", b.dot.unwrap()),
        &format!("upstream_timeout = \"500ms\"\nupstream_ca = \"{}\"", b_root.display()),
    );
    assert_stall_costs_only_itself(a.dns.unwrap(), "dot upstream");
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// 2,000 TCP clients that announce a query and trickle it one byte every half second (from 200 addresses), and a
/// flood of unique names in a zone whose server stalls, over UDP from 50 addresses
/// (2,500 a second, each waiting 3 s upstream: 7,500 would be in flight unbounded): the
/// device's queries (over UDP and TCP) keep being answered; the slow clients are cut off
/// by the whole-query deadline or shed; queries waiting for the upstream are bounded
/// (beyond it dropped and counted), and so are descriptors and memory.
#[test]
fn slow_clients_and_a_udp_flood_do_not_starve_a_device() {
    let _one = one_at_a_time();
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
    let up = DnsUpstream::start();
    let s = open_resolver(
        &format!("\"{}\"", up.addr),
        "upstream_timeout = \"5s\"\nmax_tcp_connections = 500\ntcp_connections_per_ip = 16\n\
         tcp_idle_timeout = \"2s\"\nmax_udp_in_flight = 256\nmax_upstream_in_flight = 512\n\
         per_client = { per_second = 1000.0, burst = 1000 }",
    );
    let dns = s.dns.unwrap();
    let pid = s.child.as_ref().unwrap().id();
    // The device's names are in the cache before the flood (a device asks the same few).
    assert_eq!(status(&dig_at(dns, &["allowed.test", "A"])), "NOERROR");
    let fds_before = fds(pid);
    let rss_before = rss_kib(pid);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Slow TCP clients: connect, then one byte of a length prefix every 500 ms.
    let slow = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for i in 0..2_000usize {
                    // 100 addresses, 20 clients each (4 more than one address may hold).
                    let from = IpAddr::V4(Ipv4Addr::new(127, 2, 0, (i / 20 + 1) as u8));
                    let stop = stop.clone();
                    tasks.push(tokio::spawn(async move {
                        use tokio::io::AsyncWriteExt;
                        let sock = tokio::net::TcpSocket::new_v4().ok()?;
                        sock.bind(SocketAddr::new(from, 0)).ok()?;
                        let mut tcp = tokio::time::timeout(Duration::from_secs(5), sock.connect(dns))
                            .await
                            .ok()?
                            .ok()?;
                        let opened = Instant::now();
                        // A 29-byte query announced, then sent one byte at a time.
                        let mut bytes = [0u8, 29].into_iter().chain(std::iter::repeat(7));
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            if tcp.write_all(&[bytes.next().unwrap()]).await.is_err() {
                                return Some((true, opened.elapsed()));
                            }
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Some((false, opened.elapsed()))
                    }));
                }
                let mut lived = Vec::new();
                for t in tasks {
                    if let Ok(Some(l)) = t.await {
                        lived.push(l);
                    }
                }
                lived
            })
        }
    });
    // The UDP flood: unique names under stall.test from 50 addresses.
    let flood = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let socks: Vec<_> = (0..50u8)
                .map(|i| {
                    std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 4, 0, i + 1)), 0))
                        .unwrap()
                })
                .collect();
            let mut sent = 0u64;
            let mut id = 0u16;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < 200_000 {
                for sock in &socks {
                    id = id.wrapping_add(1);
                    let name = format!("f{sent}.stall.test.");
                    let mut q = hickory_proto::op::Message::query();
                    q.metadata.id = id;
                    q.add_query(hickory_proto::op::Query::query(
                        hickory_proto::rr::Name::from_ascii(&name).unwrap(),
                        hickory_proto::rr::RecordType::A,
                    ));
                    let _ = sock.send_to(&q.to_vec().unwrap(), dns);
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            sent
        }
    });

    // While both run: the device is answered over UDP and TCP, every time.
    std::thread::sleep(Duration::from_secs(3));
    let mut peak_fds = 0;
    let mut peak_rss = 0;
    for round in 0..10 {
        let udp = dig_at(dns, &["allowed.test", "A"]);
        assert_eq!(status(&udp), "NOERROR", "round {round}, udp: {udp}");
        assert!(udp.contains("192.0.2.1"), "{udp}");
        let tcp = dig_at(dns, &["+tcp", "allowed.test", "A"]);
        assert_eq!(status(&tcp), "NOERROR", "round {round}, tcp: {tcp}");
        peak_fds = peak_fds.max(fds(pid));
        peak_rss = peak_rss.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.join().unwrap();
    let lived = slow.join().unwrap();
    let cut = lived.iter().filter(|(cut, _)| *cut).count();
    let longest = lived.iter().map(|(_, d)| *d).max().unwrap_or_default();
    let m = s.metrics_now();
    eprintln!(
        "udp flood: {sent} queries sent; slow tcp clients cut off: {cut}, longest held {longest:?}; fds {fds_before} -> peak {peak_fds}; \
         RSS {rss_before} -> peak {peak_rss} KiB"
    );
    // Descriptors: the base, plus at most the TCP cap and the UDP queries in flight (each
    // holds at most one upstream socket).
    assert!(peak_fds < fds_before + 500 + 256 + 50, "descriptors peaked at {peak_fds}");
    assert!(peak_rss < rss_before + 200 * 1024, "RSS peaked at {peak_rss} KiB");
    // No slow client held its connection much past the whole-query deadline (2 s; the
    // write that notices the close comes up to 0.5 s later), though the run lasted 6 s.
    assert!(lived.len() >= 1_900, "only {} slow clients connected", lived.len());
    assert!(cut >= 1_000, "only {cut} slow clients were cut off");
    assert!(longest < Duration::from_secs(5), "a slow client held on for {longest:?}");
    for line in [
        r#"portcullis_connections_closed_idle_total{listener="dns_tcp",reason="dns_idle"}"#,
        r#"portcullis_connections_refused_total{listener="dns_tcp",reason="per_ip"}"#,
        "portcullis_dns_dropped_overload_total",
    ] {
        let n: f64 = m
            .lines()
            .find(|l| l.starts_with(line))
            .and_then(|l| l[line.len()..].trim().parse().ok())
            .unwrap_or(0.0);
        assert!(n > 0.0, "{line} is {n}:\n{m}");
    }
}
