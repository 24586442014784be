//! Answers from the upstreams, kept for their TTL (clamped), negative answers for the
//! SOA minimum (RFC 2308), bounded in entries.

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
    /// Hashed with foldhash seeded at random per process (hashbrown's default; SipHash cost
    /// more than the rest of a lookup), looked up for every allowed query; bounded by
    /// `max_entries`.
    map: Mutex<hashbrown::HashMap<Key, Entry>>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("cfg", &self.cfg).field("entries", &self.len()).finish()
    }
}

impl Cache {
    /// An empty cache.
    pub fn new(cfg: CacheConfig) -> Self {
        Self { cfg, map: Mutex::new(hashbrown::HashMap::new()) }
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

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, OpCode};
    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::{A, SOA};

    fn answer(name: &str, ttl: u32) -> (Name, Message) {
        let n = Name::from_ascii(name).unwrap();
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.add_answer(Record::from_rdata(n.clone(), ttl, RData::A(A([192, 0, 2, 1].into()))));
        (n, m)
    }

    #[test]
    fn ttls_clamps_negative_answers_and_the_size_bound() {
        let cfg = CacheConfig {
            max_entries: 10,
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(60),
            max_negative_ttl: Duration::from_secs(30),
        };
        let c = Cache::new(cfg);
        let now = Instant::now();
        let (n, m) = answer("a.test.", 1);
        assert_eq!(c.lifetime(&m), Some(Duration::from_secs(5)), "min clamp");
        let (_, long) = answer("b.test.", 100_000);
        assert_eq!(c.lifetime(&long), Some(Duration::from_secs(60)), "max clamp");
        c.put(&n, RecordType::A, DNSClass::IN, &m, now);
        let got = c.get(&n, RecordType::A, DNSClass::IN, now + Duration::from_secs(3)).unwrap();
        assert_eq!(got.answers[0].ttl, 0, "TTL counted down, never below 0");
        assert!(c.get(&n, RecordType::A, DNSClass::IN, now + Duration::from_secs(6)).is_none());
        // Negative: the SOA's min(TTL, MINIMUM), at most max_negative_ttl; none without a SOA.
        let mut nx = Message::new(1, MessageType::Response, OpCode::Query);
        nx.metadata.response_code = ResponseCode::NXDomain;
        assert_eq!(c.lifetime(&nx), None);
        let soa = SOA::new(Name::root(), Name::root(), 1, 1, 1, 1, 20);
        nx.add_authority(Record::from_rdata(Name::root(), 3600, RData::SOA(soa)));
        assert_eq!(c.lifetime(&nx), Some(Duration::from_secs(20)));
        // Bounded: 25 names into 10 entries.
        for i in 0..25 {
            let (n, m) = answer(&format!("n{i}.test."), 60);
            c.put(&n, RecordType::A, DNSClass::IN, &m, now);
            assert!(c.len() <= 10);
        }
        let (last, _) = answer("n24.test.", 60);
        assert!(c.get(&last, RecordType::A, DNSClass::IN, now).is_some(), "the newest entry is kept");
    }
}
