//! An authoritative-style DNS server on 127.0.0.1 (UDP and TCP) answering from a fixed
//! table, counting the questions it gets: the upstream the resolver forwards to. Names
//! under `stall.test.` are answered only after [`STALL`]; every other question is answered
//! at once, also on a TCP connection where a stalled one is pending (answers out of
//! order, as RFC 7766 lets a server do).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long names under `stall.test.` wait for their answer.
pub const STALL: std::time::Duration = std::time::Duration::from_secs(3);

fn stalls(q: &Message) -> bool {
    q.queries.first().is_some_and(|q| q.name.to_ascii().to_ascii_lowercase().ends_with("stall.test."))
}

pub struct DnsUpstream {
    pub addr: SocketAddr,
    asked: Arc<Mutex<HashMap<String, usize>>>,
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn soa() -> Record {
    Record::from_rdata(
        name("test."),
        300,
        RData::SOA(SOA::new(name("ns.test."), name("admin.test."), 1, 3600, 600, 86400, 2)),
    )
}

/// The zone: A records, a CNAME chain into a blocked name, a big TXT set (truncation),
/// an NXDOMAIN with a 2-second negative TTL, a 1-second TTL.
fn answer(q: &Message) -> Message {
    let mut r = Message::response(q.metadata.id, q.metadata.op_code);
    r.metadata.recursion_available = true;
    r.add_queries(q.queries.iter().cloned());
    let Some(query) = q.queries.first() else { return r };
    let qn = query.name.to_ascii().to_ascii_lowercase();
    let a =
        |n: &str, ttl: u32, ip: [u8; 4]| Record::from_rdata(name(n), ttl, RData::A(A(Ipv4Addr::from(ip))));
    match (qn.as_str(), query.query_type) {
        ("allowed.test.", RecordType::A) => {
            r.add_answer(a("allowed.test.", 300, [192, 0, 2, 1]));
        }
        ("ads.test.", RecordType::A) | ("x.ads.test.", RecordType::A) => {
            r.add_answer(a(&qn, 300, [192, 0, 2, 2]));
        }
        ("alias.test.", RecordType::A) => {
            r.add_answer(Record::from_rdata(
                name("alias.test."),
                300,
                RData::CNAME(CNAME(name("tracker.ads.test."))),
            ));
            r.add_answer(a("tracker.ads.test.", 300, [192, 0, 2, 3]));
        }
        ("short.test.", RecordType::A) => {
            r.add_answer(a("short.test.", 1, [192, 0, 2, 4]));
        }
        ("big.test.", RecordType::TXT) => {
            for i in 0..20 {
                let text = format!("record {i:02} {}", "x".repeat(60));
                r.add_answer(Record::from_rdata(name("big.test."), 300, RData::TXT(TXT::new(vec![text]))));
            }
        }
        ("gone.test.", _) => {
            r.metadata.response_code = ResponseCode::NXDomain;
            r.add_authority(soa());
        }
        _ => {
            r.add_authority(soa());
        }
    }
    r
}

impl DnsUpstream {
    pub fn start() -> Self {
        // A free UDP port is not always free for TCP (other tests run beside this one):
        // try again with another.
        let (std_udp, addr, std_tcp) = (0..50)
            .find_map(|_| {
                let udp = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
                let addr = udp.local_addr().ok()?;
                let tcp = std::net::TcpListener::bind(addr).ok()?;
                Some((udp, addr, tcp))
            })
            .expect("a loopback port free for both UDP and TCP");
        std_udp.set_nonblocking(true).unwrap();
        std_tcp.set_nonblocking(true).unwrap();
        let asked: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let seen = asked.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let udp = tokio::net::UdpSocket::from_std(std_udp).unwrap();
                let tcp = tokio::net::TcpListener::from_std(std_tcp).unwrap();
                let seen_tcp = seen.clone();
                tokio::spawn(async move {
                    loop {
                        let Ok((s, _)) = tcp.accept().await else { return };
                        let seen = seen_tcp.clone();
                        tokio::spawn(async move {
                            let (mut rd, wr) = tokio::io::split(s);
                            let wr = Arc::new(tokio::sync::Mutex::new(wr));
                            while let Ok(n) = rd.read_u16().await {
                                let mut buf = vec![0u8; usize::from(n)];
                                if rd.read_exact(&mut buf).await.is_err() {
                                    return;
                                }
                                let Ok(q) = Message::from_vec(&buf) else { return };
                                count(&seen, &q);
                                let wr = wr.clone();
                                tokio::spawn(async move {
                                    if stalls(&q) {
                                        tokio::time::sleep(STALL).await;
                                    }
                                    let out = answer(&q).to_vec().unwrap();
                                    let mut framed = (out.len() as u16).to_be_bytes().to_vec();
                                    framed.extend_from_slice(&out);
                                    let _ = wr.lock().await.write_all(&framed).await;
                                });
                            }
                        });
                    }
                });
                let udp = Arc::new(udp);
                let mut buf = vec![0u8; 4096];
                loop {
                    let Ok((n, src)) = udp.recv_from(&mut buf).await else { continue };
                    let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
                    count(&seen, &q);
                    let udp = udp.clone();
                    let stall = stalls(&q);
                    let reply = async move {
                        let resp = answer(&q);
                        let mut out = resp.to_vec().unwrap();
                        let limit = q.edns.as_ref().map_or(512, |e| usize::from(e.max_payload()));
                        if out.len() > limit {
                            let mut t = resp.truncate();
                            t.metadata.truncation = true;
                            out = t.to_vec().unwrap();
                        }
                        let _ = udp.send_to(&out, src).await;
                    };
                    if stall {
                        tokio::spawn(async move {
                            tokio::time::sleep(STALL).await;
                            reply.await;
                        });
                    } else {
                        reply.await;
                    }
                }
            });
        });
        Self { addr, asked }
    }

    /// How often `name` (lower case, with the trailing dot) was asked, over UDP and TCP.
    pub fn asked(&self, name: &str) -> usize {
        self.asked.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

fn count(seen: &Mutex<HashMap<String, usize>>, q: &Message) {
    if let Some(query) = q.queries.first() {
        *seen.lock().unwrap().entry(query.name.to_ascii().to_ascii_lowercase()).or_default() += 1;
    }
}
