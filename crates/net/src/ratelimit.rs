//! Per-key GCRA (generic cell rate algorithm): `burst` requests at once, then one every
//! `1 / per_second`. State is one instant per key, kept in shards so that the workers
//! that share a limiter rarely wait for one another.
//!
//! The number of keys is bounded. A key that is not tracked is never admitted blindly:
//! when a shard is full, keys whose theoretical arrival time has passed (they carry no
//! debt, so forgetting them changes nothing) are dropped first; if every key still owes
//! time, the one closest to being idle is forgotten to make room for the new key. A flood
//! of new source addresses therefore costs the oldest state, never the limit itself.

use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::Mutex;

use hashbrown::HashTable;
use std::time::{Duration, Instant};

/// A rate: sustained requests per second and the burst allowed on top.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained requests per second (> 0).
    pub per_second: f64,
    /// Requests allowed at once (>= 1).
    pub burst: u32,
}

/// Shards of a limiter. A power of two, more than any machine this runs on has cores
/// sharing one limiter, so two workers rarely meet on one lock.
const SHARDS: usize = 32;

/// A keyed GCRA limiter.
///
/// A key is hashed once per check: the hash picks the shard (from bits the tables do not
/// use for their buckets) and finds the key in that shard's table.
#[derive(Debug)]
pub struct Limiter<K> {
    interval: Duration,
    tolerance: Duration,
    per_shard: usize,
    hasher: RandomState,
    shards: Box<[Shard<K>]>,
}

/// One shard: keys with their theoretical arrival times.
type Shard<K> = Mutex<HashTable<(K, Instant)>>;

impl<K: Eq + Hash + Clone> Limiter<K> {
    /// A limiter for `rate`, keeping at most about `max_keys` keys (rounded up to a
    /// multiple of the shard count).
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        let interval = Duration::from_secs_f64(1.0 / rate.per_second.max(1e-6));
        Self {
            interval,
            tolerance: interval * rate.burst.max(1),
            per_shard: max_keys.max(1).div_ceil(SHARDS),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
        }
    }

    /// Admits one request for `key` at `now`, or says how long to wait.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let hash = self.hasher.hash_one(key);
        let shard = &self.shards[((hash >> 32) as usize) & (SHARDS - 1)];
        let Ok(mut table) = shard.lock() else {
            // A poisoned lock means a panic elsewhere; refuse rather than admit blindly.
            return Err(self.interval);
        };
        if let Some((_, tat)) = table.find_mut(hash, |(k, _)| k == key) {
            let new_tat = (*tat).max(now) + self.interval;
            let allow_at = new_tat.checked_sub(self.tolerance).unwrap_or(now);
            if now < allow_at {
                return Err(allow_at - now);
            }
            *tat = new_tat;
            return Ok(());
        }
        // A new key starts with a full burst: admitted (`tolerance` >= `interval`).
        let rehash = |(k, _): &(K, Instant)| self.hasher.hash_one(k);
        if table.len() >= self.per_shard {
            // Keys whose theoretical arrival time has passed hold no state worth keeping.
            table.retain(|(_, t)| *t > now);
            if table.len() >= self.per_shard {
                // Every key still owes time: forget the one closest to being idle.
                let oldest =
                    table.iter().min_by_key(|(_, t)| *t).map(|(k, _)| (self.hasher.hash_one(k), k.clone()));
                if let Some((h, k)) = oldest
                    && let Ok(entry) = table.find_entry(h, |(x, _)| *x == k)
                {
                    entry.remove();
                }
            }
        }
        table.insert_unique(hash, (key.clone(), now + self.interval), rehash);
        Ok(())
    }

    /// Keys currently tracked.
    pub fn tracked(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map(|m| m.len()).unwrap_or(0)).sum()
    }

    /// Most keys it keeps.
    pub fn capacity(&self) -> usize {
        self.per_shard * SHARDS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_steady_rate() {
        let l = Limiter::new(Rate { per_second: 10.0, burst: 3 }, 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check(&"a", t0).is_ok());
        }
        let wait = l.check(&"a", t0).unwrap_err();
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100), "{wait:?}");
        assert!(l.check(&"a", t0 + Duration::from_millis(100)).is_ok());
        assert!(l.check(&"a", t0 + Duration::from_millis(100)).is_err());
        // Another key is independent.
        assert!(l.check(&"b", t0).is_ok());
    }

    #[test]
    fn idle_keys_are_evicted() {
        let l = Limiter::new(Rate { per_second: 100.0, burst: 1 }, 10 * SHARDS);
        let t0 = Instant::now();
        for i in 0..10 * SHARDS {
            assert!(l.check(&i, t0).is_ok());
        }
        let full = l.tracked();
        assert!(full > 5 * SHARDS, "{full}");
        // A second later every key is idle; new keys evict them instead of growing.
        for i in 0..10 * SHARDS {
            assert!(l.check(&(100_000 + i), t0 + Duration::from_secs(1)).is_ok());
        }
        assert!(l.tracked() <= l.capacity());
    }

    /// The limiter used to admit a new key untracked once it was full: a flood of fresh
    /// keys then turned the limit off for every newcomer.
    #[test]
    fn a_full_limiter_still_limits_new_keys() {
        let l = Limiter::new(Rate { per_second: 1.0, burst: 1 }, 64);
        let t0 = Instant::now();
        // Fill it with keys that all still owe time (none is idle).
        for i in 0..10_000u32 {
            let _ = l.check(&i, t0);
        }
        assert!(l.tracked() <= l.capacity());
        // Every newcomer gets its burst, then is limited: it was tracked.
        for i in 20_000..20_100u32 {
            assert!(l.check(&i, t0).is_ok());
            assert!(l.check(&i, t0).is_err(), "key {i} admitted twice: untracked");
        }
    }
}
