//! The rate limiter under contention: the sharded limiter against the single-mutex one it
//! replaced, on the same keys, from 1 and 2 threads (`cargo run --release --example
//! limiter_contention`). Each thread checks N requests spread over K keys, as the DNS port
//! does per source address and the device port per device.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use portcullis_gateway::{Limiter, Rate};

/// The limiter before the change: one mutex over one map.
struct Single<K> {
    interval: Duration,
    tolerance: Duration,
    tat: Mutex<HashMap<K, Instant>>,
}

impl<K: Eq + Hash + Clone> Single<K> {
    fn new(rate: Rate) -> Self {
        let interval = Duration::from_secs_f64(1.0 / rate.per_second);
        Self { interval, tolerance: interval * rate.burst, tat: Mutex::new(HashMap::new()) }
    }

    fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let mut map = self.tat.lock().unwrap();
        let tat = map.get(key).copied().unwrap_or(now).max(now);
        let new_tat = tat + self.interval;
        let allow_at = new_tat.checked_sub(self.tolerance).unwrap_or(now);
        if now < allow_at {
            return Err(allow_at - now);
        }
        map.insert(key.clone(), new_tat);
        Ok(())
    }
}

fn run(threads: usize, n: usize, keys: u32, check: &(dyn Fn(&u32, Instant) -> bool + Sync)) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mut admitted = 0usize;
                let mut k = t as u32 * 7919;
                for _ in 0..n {
                    k = k.wrapping_mul(1_103_515_245).wrapping_add(12_345) % keys;
                    admitted += usize::from(check(&k, Instant::now()));
                }
                std::hint::black_box(admitted);
            });
        }
    });
    start.elapsed().as_nanos() as f64 / (threads * n) as f64
}

fn main() {
    let rate = Rate { per_second: 200.0, burst: 400 };
    let n = 2_000_000;
    for keys in [1_000u32, 50_000] {
        for threads in [1, 2] {
            let mut best = (f64::MAX, f64::MAX);
            for _ in 0..5 {
                let single = Single::new(rate);
                let sharded = Limiter::new(rate, 100_000);
                best.0 = best.0.min(run(threads, n, keys, &|k, now| single.check(k, now).is_ok()));
                best.1 = best.1.min(run(threads, n, keys, &|k, now| sharded.check(k, now).is_ok()));
            }
            println!(
                "keys {keys:>6}, threads {threads}: single mutex {:.1} ns/check, sharded {:.1} ns/check ({:.2}x)",
                best.0,
                best.1,
                best.0 / best.1
            );
        }
    }
}
