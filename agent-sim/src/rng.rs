//! The simulator's randomness: `fastrand`'s seedable generator (8 bytes per
//! device), seeded from the fleet seed and the device id so a run is
//! reproducible, plus the few draws the simulator needs on top of it.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Rng(fastrand::Rng);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(fastrand::Rng::with_seed(seed))
    }

    /// Seeded from a fleet seed and a name (e.g. a device id).
    pub fn for_name(seed: u64, name: &str) -> Rng {
        Rng::new(seed ^ fnv1a(name.as_bytes()))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.u64(..)
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        self.0.f64()
    }

    /// Uniform in [0, n); 0 when n is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.0.u64(..n)
        }
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.f64() < p
    }

    /// One of `items`, which must not be empty.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.0.usize(..items.len())]
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        self.0.shuffle(items);
    }

    /// Uniform in [lo, hi].
    pub fn duration_between(&mut self, lo: Duration, hi: Duration) -> Duration {
        if hi <= lo {
            return lo;
        }
        lo + (hi - lo).mul_f64(self.f64())
    }

    /// Exponentially distributed waiting time for events at `per_hour`.
    pub fn exp_wait(&mut self, per_hour: f64) -> Option<Duration> {
        if per_hour <= 0.0 {
            return None;
        }
        let u = 1.0 - self.f64(); // (0, 1]
        let hours = -u.ln() / per_hour;
        Some(Duration::from_secs_f64(
            (hours * 3600.0).min(86_400.0 * 365.0),
        ))
    }
}

/// FNV-1a, 64 bit: a stable hash for seeds and command ids.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_in_range() {
        let mut a = Rng::for_name(7, "lamp0001");
        let mut b = Rng::for_name(7, "lamp0001");
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
            let x = a.f64();
            b.f64();
            assert!((0.0..1.0).contains(&x));
            assert!(a.below(10) < 10);
            b.below(10);
        }
        assert_ne!(
            Rng::for_name(7, "lamp0001").next_u64(),
            Rng::for_name(7, "lamp0002").next_u64()
        );
    }
}
