//! Reconnect timing: full-jitter exponential backoff (SPEC section 13) and the
//! server-chosen delays. Pure arithmetic over a caller-owned RNG, so a seeded RNG
//! makes every delay reproducible in tests.

/// Backoff settings. Attempt `n` (from 1) waits uniform
/// `[0, min(max_delay_ms, min_delay_ms × factor^(n−1))]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first attempt's cap (default 250 ms).
    pub min_delay_ms: u64,
    /// The cap never grows past this (default 30 000 ms).
    pub max_delay_ms: u64,
    /// Growth per attempt (default 2).
    pub factor: u32,
    /// A connection that stayed up this long after `welcome` resets the attempt
    /// counter when it drops (default 30 000 ms).
    pub stable_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            min_delay_ms: 250,
            max_delay_ms: 30_000,
            factor: 2,
            stable_ms: 30_000,
        }
    }
}

impl Backoff {
    /// The upper bound of attempt `n`'s delay (`n` from 1; 0 counts as 1).
    pub fn cap(&self, n: u32) -> u64 {
        let exp = n.saturating_sub(1);
        let grow = u64::from(self.factor.max(1)).saturating_pow(exp);
        self.min_delay_ms
            .saturating_mul(grow)
            .min(self.max_delay_ms)
    }

    /// Attempt `n`'s delay: uniform in `[0, cap(n)]`.
    pub fn delay(&self, n: u32, rng: &mut fastrand::Rng) -> u64 {
        rng.u64(0..=self.cap(n))
    }

    /// The delay after an announced close: the server's `retry_ms`, or uniform
    /// `[0, min_delay_ms]` when it sent `null`.
    pub fn server_delay(&self, retry_ms: Option<u64>, rng: &mut fastrand::Rng) -> u64 {
        retry_ms.unwrap_or_else(|| rng.u64(0..=self.min_delay_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_double_from_min_to_max() {
        let b = Backoff::default();
        let caps: Vec<u64> = (1..=10).map(|n| b.cap(n)).collect();
        assert_eq!(
            caps,
            [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(b.cap(0), 250);
        assert_eq!(b.cap(u32::MAX), 30_000, "no overflow at huge n");
    }

    #[test]
    fn full_jitter_stays_within_zero_and_the_cap_and_uses_the_range() {
        let b = Backoff::default();
        let mut rng = fastrand::Rng::with_seed(7);
        for n in 1..=12 {
            let cap = b.cap(n);
            let ds: Vec<u64> = (0..2000).map(|_| b.delay(n, &mut rng)).collect();
            assert!(ds.iter().all(|d| *d <= cap), "attempt {n}: over {cap}");
            // Full jitter, not "cap ± a little": the draws cover the low and the high end.
            assert!(ds.iter().any(|d| *d < cap / 10), "attempt {n}: nothing low");
            assert!(
                ds.iter().any(|d| *d > cap - cap / 10),
                "attempt {n}: nothing high"
            );
        }
    }

    #[test]
    fn a_seed_reproduces_the_delays() {
        let b = Backoff::default();
        let run = |seed| {
            let mut rng = fastrand::Rng::with_seed(seed);
            (1..=8).map(|n| b.delay(n, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn server_delay_is_retry_ms_or_a_short_uniform_wait() {
        let b = Backoff::default();
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(b.server_delay(Some(1234), &mut rng), 1234);
        let ds: Vec<u64> = (0..500).map(|_| b.server_delay(None, &mut rng)).collect();
        assert!(ds.iter().all(|d| *d <= 250));
        assert!(ds.iter().any(|d| *d > 125) && ds.iter().any(|d| *d < 125));
    }
}
