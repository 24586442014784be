//! The TCP connect scan.
//!
//! A connect scan is almost all kernel work (socket, SYN, RST or SYN-ACK, close), so the
//! engine keeps its own overhead to the syscalls that are needed: one thread per core,
//! each with a window of non-blocking connects and one `poll(2)` over all of them (the
//! design of nmap's connect scan, on every core instead of one). No per-probe epoll
//! registration, task or allocation. A socket whose connect was refused is reused for
//! the next probe: asking it for the outcome with a second `connect(2)` both reports
//! the error and returns it to the unconnected state (Linux `__inet_stream_connect`),
//! which saves a `socket`/`getsockopt`/`close` per closed port. Probes are paced by a
//! global rate cap and capped per target; a target is one address of one device.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};

/// What a connect attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    /// The handshake completed.
    Open,
    /// Refused (RST).
    Closed,
    /// No answer within the timeout, or unreachable.
    Filtered,
}

/// A global pace shared by all scan threads: at most `rate` probes per second.
#[derive(Debug)]
pub struct Pace {
    interval: Duration,
    next: Mutex<Instant>,
}

impl Pace {
    /// `per_second` probes per second.
    pub fn new(per_second: u32) -> Self {
        Self { interval: Duration::from_secs(1) / per_second.max(1), next: Mutex::new(Instant::now()) }
    }

    /// The time at which the next probe may go; the caller waits for it.
    pub fn slot(&self) -> Instant {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let at = (*next).max(now);
        *next = at + self.interval;
        at
    }

    /// Blocks the thread until the next slot (for the scan threads).
    pub fn wait_blocking(&self) {
        let at = self.slot();
        let now = Instant::now();
        if at > now + Duration::from_micros(200) {
            std::thread::sleep(at - now);
        }
    }
}

/// One probe's outcome.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// Index of the target in the slice given to [`scan`].
    pub target: usize,
    /// Port.
    pub port: u16,
    /// What was found.
    pub state: PortState,
    /// Why, when not open (`refused`, `timeout`, the errno).
    pub detail: &'static str,
}

struct InFlight {
    fd: OwnedFd,
    target: usize,
    addr: SocketAddr,
    deadline: Instant,
}

/// Asks an in-flight socket how its connect went; `None` while it is still going.
/// A socket that reports an error is back to unconnected and can be reused.
fn outcome(fd: &OwnedFd, addr: &SocketAddr) -> Option<(PortState, &'static str, bool)> {
    match rustix::net::connect(fd, addr) {
        Err(Errno::ALREADY | Errno::INPROGRESS) => None,
        Err(Errno::ISCONN) | Ok(()) => Some((PortState::Open, "open", false)),
        Err(e) => Some((classify(e), errno_word(e), true)),
    }
}

fn errno_word(e: Errno) -> &'static str {
    match e {
        Errno::CONNREFUSED => "refused",
        Errno::HOSTUNREACH => "host unreachable",
        Errno::NETUNREACH => "network unreachable",
        Errno::TIMEDOUT => "timeout",
        Errno::ACCESS | Errno::PERM => "not permitted",
        _ => "error",
    }
}

fn classify(e: Errno) -> PortState {
    if e == Errno::CONNREFUSED { PortState::Closed } else { PortState::Filtered }
}

fn close_open(fd: OwnedFd) {
    // A reset instead of a FIN: no TIME_WAIT left behind on either side.
    let _ = sockopt::set_socket_linger(&fd, Some(Duration::ZERO));
}

/// Scans `ports` on every target in `targets` (which this thread owns), at most
/// `per_target` probes in flight per target and `window` in all. Calls `done` for every
/// probe. Runs on the calling thread; returns when all probes are answered or timed out.
pub fn scan(
    targets: &[(usize, IpAddr)],
    ports: &[u16],
    per_target: usize,
    window: usize,
    timeout: Duration,
    pace: &Pace,
    mut done: impl FnMut(Outcome),
) {
    let mut next_port = vec![0usize; targets.len()];
    let mut in_flight_for = vec![0usize; targets.len()];
    let mut flight: Vec<InFlight> = Vec::with_capacity(window);
    let mut spare: Vec<(bool, OwnedFd)> = Vec::new();
    let mut cursor = 0usize;
    let mut remaining = targets.len() * ports.len();
    let mut backoff = false;
    while remaining > 0 {
        // Fill the window, round-robin over targets that still have ports and room.
        let mut idle_rounds = 0;
        while !backoff && flight.len() < window && idle_rounds < targets.len() {
            let t = cursor % targets.len();
            cursor = cursor.wrapping_add(1);
            if next_port[t] >= ports.len() || in_flight_for[t] >= per_target {
                idle_rounds += 1;
                continue;
            }
            idle_rounds = 0;
            let (idx, ip) = targets[t];
            let port = ports[next_port[t]];
            let addr = SocketAddr::new(ip, port);
            let family = if ip.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
            let reused =
                spare.iter().rposition(|(v4, _)| *v4 == ip.is_ipv4()).map(|i| spare.swap_remove(i).1);
            let fresh = || {
                rustix::net::socket_with(
                    family,
                    SocketType::STREAM,
                    SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
                    None,
                )
            };
            let fd = match reused.map_or_else(fresh, Ok) {
                Ok(fd) => fd,
                Err(Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM) => {
                    // Out of descriptors: drain what is in flight first.
                    backoff = true;
                    break;
                }
                Err(e) => {
                    next_port[t] += 1;
                    remaining -= 1;
                    done(Outcome { target: idx, port, state: PortState::Filtered, detail: errno_word(e) });
                    continue;
                }
            };
            pace.wait_blocking();
            match rustix::net::connect(&fd, &addr) {
                Ok(()) => {
                    next_port[t] += 1;
                    remaining -= 1;
                    close_open(fd);
                    done(Outcome { target: idx, port, state: PortState::Open, detail: "open" });
                }
                Err(Errno::INPROGRESS) => {
                    next_port[t] += 1;
                    in_flight_for[t] += 1;
                    flight.push(InFlight { fd, target: t, addr, deadline: Instant::now() + timeout });
                }
                Err(Errno::AGAIN | Errno::ADDRNOTAVAIL) => {
                    // No ephemeral port free right now: retry this probe after a drain.
                    backoff = true;
                    break;
                }
                Err(e) => {
                    next_port[t] += 1;
                    remaining -= 1;
                    done(Outcome { target: idx, port, state: classify(e), detail: errno_word(e) });
                }
            }
        }
        if flight.is_empty() {
            if backoff {
                std::thread::sleep(Duration::from_millis(10));
                backoff = false;
            }
            continue;
        }
        let now = Instant::now();
        let wait = flight
            .iter()
            .map(|f| f.deadline)
            .min()
            .map_or(Duration::ZERO, |d| d.saturating_duration_since(now));
        let wait = wait.min(Duration::from_millis(50));
        let ready: Vec<(usize, PollFlags)> = {
            let mut fds: Vec<PollFd<'_>> =
                flight.iter().map(|f| PollFd::new(&f.fd, PollFlags::OUT)).collect();
            let ts = Timespec { tv_sec: wait.as_secs() as i64, tv_nsec: i64::from(wait.subsec_nanos()) };
            match poll(&mut fds, Some(&ts)) {
                Ok(0) | Err(Errno::INTR) => Vec::new(),
                Ok(_) => fds
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| !p.revents().is_empty())
                    .map(|(i, p)| (i, p.revents()))
                    .collect(),
                Err(_) => Vec::new(),
            }
        };
        let mut finished: Vec<(usize, PortState, &'static str, bool)> = Vec::with_capacity(ready.len());
        for (i, _) in ready {
            let f = &flight[i];
            if let Some((state, detail, reusable)) = outcome(&f.fd, &f.addr) {
                finished.push((i, state, detail, reusable));
            }
        }
        let now = Instant::now();
        for (i, f) in flight.iter().enumerate() {
            if f.deadline <= now && !finished.iter().any(|(j, ..)| *j == i) {
                finished.push((i, PortState::Filtered, "timeout", false));
            }
        }
        // Remove from the back so indices stay valid.
        finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        for (i, state, detail, reusable) in finished {
            let f = flight.swap_remove(i);
            in_flight_for[f.target] -= 1;
            remaining -= 1;
            if state == PortState::Open {
                close_open(f.fd);
            } else if reusable && spare.len() < window {
                spare.push((f.addr.is_ipv4(), f.fd));
            }
            done(Outcome { target: targets[f.target].0, port: f.addr.port(), state, detail });
        }
        backoff = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_open_port_among_closed_ones() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = l.local_addr().unwrap().port();
        // A port that was free a moment ago is (almost certainly) closed.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut seen = Vec::new();
        let pace = Pace::new(100_000);
        scan(
            &[(7, "127.0.0.1".parse().unwrap())],
            &[open, closed],
            2,
            8,
            Duration::from_secs(1),
            &pace,
            |o| seen.push((o.target, o.port, o.state)),
        );
        seen.sort_by_key(|s| s.1 != open);
        assert_eq!(seen, vec![(7, open, PortState::Open), (7, closed, PortState::Closed)]);
    }
}
