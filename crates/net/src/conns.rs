//! Admission of connections: a total cap, a cap per source address, and shedding of idle
//! anonymous connections when the total is reached.
//!
//! A listener asks [`Conns::admit`] for every connection it accepts, before any TLS or
//! protocol work. The answer is a [`Slot`] that the connection holds until it ends, or a
//! refusal the listener acts on at once by closing the socket (counted by reason): the
//! kernel's accept queue is never used as a waiting room, where a flood of connections
//! that say nothing would starve everyone behind it.
//!
//! Every connection starts *anonymous*. One that proves a device identity (a client
//! certificate that chains to the CA) is marked with [`Slot::identified`] and from then on
//! is never shed. When the total cap is reached, the oldest anonymous connection that
//! has no request in flight is told to close ([`Slot::shed`] completes) and the newcomer
//! takes its place; only when no such connection is left is the newcomer refused. So a
//! flood of idle connections from anywhere can neither push out the fleet's devices nor
//! keep new ones from connecting, and an anonymous client in the middle of a request
//! (an enrollment) finishes it.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

/// Limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections at once, all sources together.
    pub max: usize,
    /// Connections at once from one source address.
    pub per_ip: usize,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its source address already holds `per_ip` connections.
    PerIp,
    /// The total cap is reached and every connection is identified or busy.
    Full,
}

impl Refused {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::PerIp => "per_ip",
            Self::Full => "full",
        }
    }
}

/// What a connection's holder and the table share: whether it is busy, and the signal
/// to close.
#[derive(Debug)]
struct Ctl {
    id: u64,
    ip: IpAddr,
    /// Requests in flight (a request counts until its response body is dropped).
    busy: AtomicUsize,
    /// Milliseconds since `opened` of the last time `busy` went to 0 (or of the start).
    idle_since_ms: AtomicU64,
    opened: Instant,
    /// Set when the table shed it (its counts were already given back).
    shed: AtomicBool,
    close: Notify,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
    /// Anonymous connections, oldest first.
    anonymous: BTreeMap<u64, Arc<Ctl>>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct Labels {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

/// Counters of a listener's admissions, registered once per process and shared by the
/// listeners (labelled by name).
#[derive(Debug, Clone, Default)]
pub struct ConnMetrics {
    refused: Family<Labels, Counter>,
    shed: Family<ListenerLabel, Counter>,
    open: Family<ListenerLabel, Gauge>,
    closed_idle: Family<Labels, Counter>,
}

impl ConnMetrics {
    /// Registers the families in `registry` (under the caller's prefix).
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "connections_refused",
            "Connections closed at accept: per_ip (the source's cap) or full (total cap, nothing to shed)",
            self.refused.clone(),
        );
        registry.register(
            "connections_shed",
            "Idle anonymous connections closed to admit a new one at the total cap",
            self.shed.clone(),
        );
        registry.register("connections_open", "Connections open now", self.open.clone());
        registry.register(
            "connections_closed_idle",
            "Connections closed by a deadline: handshake, first request, keep-alive idle, http2 idle",
            self.closed_idle.clone(),
        );
    }
}

/// One listener's admission table.
#[derive(Debug)]
pub struct Conns {
    name: &'static str,
    limits: ConnLimits,
    table: Mutex<Table>,
    metrics: ConnMetrics,
    refused_per_ip: Counter,
    refused_full: Counter,
    shed: Counter,
    open: Gauge,
}

impl Conns {
    /// A table for the listener `name` (a metric label) with `limits`.
    pub fn new(name: &'static str, limits: ConnLimits, metrics: ConnMetrics) -> Arc<Self> {
        let label = ListenerLabel { listener: name };
        let refused_per_ip =
            metrics.refused.get_or_create(&Labels { listener: name, reason: "per_ip" }).clone();
        let refused_full = metrics.refused.get_or_create(&Labels { listener: name, reason: "full" }).clone();
        let shed = metrics.shed.get_or_create(&label).clone();
        let open = metrics.open.get_or_create(&label).clone();
        Arc::new(Self {
            name,
            limits: ConnLimits { max: limits.max.max(1), per_ip: limits.per_ip.max(1) },
            table: Mutex::new(Table::default()),
            refused_per_ip,
            refused_full,
            shed,
            open,
            metrics,
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> ConnLimits {
        self.limits
    }

    /// Admits a connection from `ip`, shedding the oldest idle anonymous connection if the
    /// total cap is reached; the refusal is counted.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        let Ok(mut t) = self.table.lock() else { return Err(Refused::Full) };
        let from_ip = t.per_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= self.limits.per_ip {
            drop(t);
            self.refused_per_ip.inc();
            return Err(Refused::PerIp);
        }
        if t.total >= self.limits.max {
            let victim = t.anonymous.values().find(|c| c.busy.load(Ordering::Acquire) == 0).cloned();
            let Some(victim) = victim else {
                drop(t);
                self.refused_full.inc();
                return Err(Refused::Full);
            };
            t.anonymous.remove(&victim.id);
            Self::release(&mut t, victim.ip);
            victim.shed.store(true, Ordering::Release);
            victim.close.notify_one();
            self.shed.inc();
            self.open.dec();
        }
        t.next_id += 1;
        let ctl = Arc::new(Ctl {
            id: t.next_id,
            ip,
            busy: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            opened: Instant::now(),
            shed: AtomicBool::new(false),
            close: Notify::new(),
        });
        t.total += 1;
        *t.per_ip.entry(ip).or_default() += 1;
        t.anonymous.insert(ctl.id, ctl.clone());
        drop(t);
        self.open.inc();
        Ok(Slot { conns: self.clone(), ctl })
    }

    fn release(t: &mut Table, ip: IpAddr) {
        t.total -= 1;
        if let Some(n) = t.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                t.per_ip.remove(&ip);
            }
        }
    }

    /// Counts a connection closed by one of its deadlines (`state`: handshake,
    /// first_request, keep_alive, http2_idle, …).
    pub fn closed_idle(&self, state: &'static str) {
        self.metrics.closed_idle.get_or_create(&Labels { listener: self.name, reason: state }).inc();
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.table.lock().map(|t| t.total).unwrap_or(0)
    }
}

/// A connection's place in its listener's table; dropping it gives the place back.
#[derive(Debug)]
pub struct Slot {
    conns: Arc<Conns>,
    ctl: Arc<Ctl>,
}

impl Slot {
    /// The connection proved a device identity: it is never shed.
    pub fn identified(&self) {
        if let Ok(mut t) = self.conns.table.lock() {
            t.anonymous.remove(&self.ctl.id);
        }
    }

    /// Completes when the table wants this connection closed to make room.
    pub async fn shed(&self) {
        self.ctl.close.notified().await;
    }

    /// A request started; it counts as busy until the guard is dropped.
    pub fn busy(&self) -> Busy {
        self.ctl.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self.ctl.clone())
    }

    /// How long the connection has had no request in flight; `None` while one is.
    pub fn idle_for(&self) -> Option<std::time::Duration> {
        if self.ctl.busy.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = std::time::Duration::from_millis(self.ctl.idle_since_ms.load(Ordering::Acquire));
        Some(self.ctl.opened.elapsed().saturating_sub(since))
    }

    /// The table this slot belongs to.
    pub fn conns(&self) -> &Arc<Conns> {
        &self.conns
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.ctl.shed.load(Ordering::Acquire) {
            return; // the table gave our place away already
        }
        if let Ok(mut t) = self.conns.table.lock() {
            t.anonymous.remove(&self.ctl.id);
            Conns::release(&mut t, self.ctl.ip);
        }
        self.conns.open.dec();
    }
}

/// A request in flight on a connection (see [`Slot::busy`]).
#[derive(Debug)]
pub struct Busy(Arc<Ctl>);

impl Drop for Busy {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.idle_since_ms.store(ms, Ordering::Release);
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    #[test]
    fn per_ip_cap_and_release() {
        let c = Conns::new("t", ConnLimits { max: 10, per_ip: 2 }, ConnMetrics::default());
        let a = c.admit(ip(1)).unwrap();
        let _b = c.admit(ip(1)).unwrap();
        assert_eq!(c.admit(ip(1)).unwrap_err(), Refused::PerIp);
        let _other = c.admit(ip(2)).unwrap();
        drop(a);
        assert!(c.admit(ip(1)).is_ok());
    }

    #[tokio::test]
    async fn at_the_cap_the_oldest_idle_anonymous_connection_is_shed() {
        let c = Conns::new("t", ConnLimits { max: 3, per_ip: 10 }, ConnMetrics::default());
        let device = c.admit(ip(1)).unwrap();
        device.identified();
        let busy_anon = c.admit(ip(2)).unwrap();
        let guard = busy_anon.busy();
        let idle_anon = c.admit(ip(3)).unwrap();
        // Full: the idle anonymous one goes, not the device, not the busy one.
        let newcomer = c.admit(ip(4)).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), idle_anon.shed()).await.unwrap();
        assert_eq!(c.open(), 3);
        // Full again, the newcomer is idle and anonymous: it goes next.
        let next = c.admit(ip(5)).unwrap();
        next.identified();
        tokio::time::timeout(std::time::Duration::from_secs(1), newcomer.shed()).await.unwrap();
        // Now nothing is sheddable: refused.
        drop(idle_anon);
        drop(newcomer);
        assert_eq!(c.open(), 3);
        assert_eq!(c.admit(ip(6)).unwrap_err(), Refused::Full);
        // The busy one becomes idle: sheddable.
        drop(guard);
        assert!(busy_anon.idle_for().is_some());
        assert!(c.admit(ip(6)).is_ok());
        drop(device);
    }
}
