//! Answers from the upstreams, kept for their TTL (clamped), negative answers for the
//! SOA minimum (RFC 2308), bounded in entries.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

/// Cache limits.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Entries kept at most.
    pub max_entries: usize,
    /// Positive answers are kept at least this long…
    pub min_ttl: Duration,
    /// …and at most this long.
    pub max_ttl: Duration,
    /// Negative answers (NXDOMAIN, no data) at most this long.
    pub max_negative_ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            min_ttl: Duration::from_secs(0),
            max_ttl: Duration::from_secs(86_400),
            max_negative_ttl: Duration::from_secs(3_600),
        }
    }
}

type Key = (Name, RecordType, DNSClass);

struct Entry {
    msg: Message,
    stored: Instant,
    expires: Instant,
}

/// A TTL cache of upstream answers.
pub struct Cache {
    cfg: CacheConfig,
    map: Mutex<HashMap<Key, Entry>>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("cfg", &self.cfg).field("entries", &self.len()).finish()
    }
}

impl Cache {
    /// An empty cache.
    pub fn new(cfg: CacheConfig) -> Self {
        Self { cfg, map: Mutex::new(HashMap::new()) }
    }

    /// Entries held (expired ones included until they are swept).
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn key(name: &Name, qtype: RecordType, class: DNSClass) -> Key {
        (name.to_lowercase(), qtype, class)
    }

    /// A cached answer with its TTLs counted down, if one is still fresh.
    pub fn get(&self, name: &Name, qtype: RecordType, class: DNSClass, now: Instant) -> Option<Message> {
        let map = self.map.lock().ok()?;
        let e = map.get(&Self::key(name, qtype, class))?;
        if now >= e.expires {
            return None;
        }
        let elapsed = u32::try_from(now.duration_since(e.stored).as_secs()).unwrap_or(u32::MAX);
        let mut msg = e.msg.clone();
        for r in msg.answers.iter_mut().chain(msg.authorities.iter_mut()) {
            r.ttl = r.ttl.saturating_sub(elapsed);
        }
        Some(msg)
    }

    /// How long `msg` may be kept: the smallest TTL of its answers, or for a negative
    /// answer the SOA's (RFC 2308 section 5: min of the SOA TTL and its MINIMUM); `None`
    /// for what is not cached (errors, negative answers without a SOA, truncated ones).
    pub fn lifetime(&self, msg: &Message) -> Option<Duration> {
        if msg.metadata.truncation {
            return None;
        }
        let negative = match msg.metadata.response_code {
            ResponseCode::NoError => msg.answers.is_empty(),
            ResponseCode::NXDomain => true,
            _ => return None,
        };
        if negative {
            let soa = msg.authorities.iter().find_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            })?;
            return Some(Duration::from_secs(u64::from(soa)).min(self.cfg.max_negative_ttl));
        }
        let ttl = msg.answers.iter().map(|r| r.ttl).min()?;
        Some(Duration::from_secs(u64::from(ttl)).clamp(self.cfg.min_ttl, self.cfg.max_ttl))
    }

    /// Stores `msg` as the answer to the question, if it may be cached.
    pub fn put(&self, name: &Name, qtype: RecordType, class: DNSClass, msg: &Message, now: Instant) {
        let Some(life) = self.lifetime(msg) else { return };
        if life.is_zero() {
            return;
        }
        let Ok(mut map) = self.map.lock() else { return };
        if map.len() >= self.cfg.max_entries {
            map.retain(|_, e| e.expires > now);
            if map.len() >= self.cfg.max_entries {
                // Still full of fresh entries: drop the ones closest to expiry (a tenth).
                let mut by_expiry: Vec<(Instant, Key)> =
                    map.iter().map(|(k, e)| (e.expires, k.clone())).collect();
                by_expiry.sort_by_key(|(t, _)| *t);
                for (_, k) in by_expiry.into_iter().take(self.cfg.max_entries / 10 + 1) {
                    map.remove(&k);
                }
            }
        }
        let mut stored = msg.clone();
        stored.edns = None;
        map.insert(Self::key(name, qtype, class), Entry { msg: stored, stored: now, expires: now + life });
    }
}
