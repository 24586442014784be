//! Per-key GCRA (generic cell rate algorithm): `burst` requests at once, then one every
//! `1 / per_second`. State is one instant per key; idle keys are evicted so the map stays
//! bounded by the number of recently active devices.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A rate: sustained requests per second and the burst allowed on top.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained requests per second (> 0).
    pub per_second: f64,
    /// Requests allowed at once (>= 1).
    pub burst: u32,
}

/// A keyed GCRA limiter.
#[derive(Debug)]
pub struct Limiter<K> {
    interval: Duration,
    tolerance: Duration,
    max_keys: usize,
    tat: Mutex<HashMap<K, Instant>>,
}

impl<K: Eq + Hash + Clone> Limiter<K> {
    /// A limiter for `rate`, keeping at most `max_keys` keys before evicting idle ones.
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        let interval = Duration::from_secs_f64(1.0 / rate.per_second.max(1e-6));
        Self {
            interval,
            tolerance: interval * rate.burst.max(1),
            max_keys: max_keys.max(1),
            tat: Mutex::new(HashMap::new()),
        }
    }

    /// Admits one request for `key` at `now`, or says how long to wait.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let Ok(mut map) = self.tat.lock() else {
            // A poisoned lock means a panic elsewhere; refuse rather than admit blindly.
            return Err(self.interval);
        };
        let tat = map.get(key).copied().unwrap_or(now).max(now);
        let new_tat = tat + self.interval;
        let allow_at = new_tat.checked_sub(self.tolerance).unwrap_or(now);
        if now < allow_at {
            return Err(allow_at - now);
        }
        if map.len() >= self.max_keys && !map.contains_key(key) {
            // Keys whose theoretical arrival time has passed hold no state worth keeping.
            map.retain(|_, t| *t > now);
        }
        if map.len() < self.max_keys || map.contains_key(key) {
            map.insert(key.clone(), new_tat);
        }
        Ok(())
    }

    /// Keys currently tracked.
    pub fn tracked(&self) -> usize {
        self.tat.lock().map(|m| m.len()).unwrap_or(0)
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
        let l = Limiter::new(Rate { per_second: 100.0, burst: 1 }, 10);
        let t0 = Instant::now();
        for i in 0..10 {
            assert!(l.check(&i, t0).is_ok());
        }
        assert_eq!(l.tracked(), 10);
        // A second later every key is idle; a new key evicts them instead of growing.
        assert!(l.check(&99, t0 + Duration::from_secs(1)).is_ok());
        assert_eq!(l.tracked(), 1);
    }
}
