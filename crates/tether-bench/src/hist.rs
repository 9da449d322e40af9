//! A mergeable latency histogram in microseconds: exact below 256 µs, then 128
//! buckets per power of two (under 0.8 % error), so child processes can ship theirs
//! to the parent as a short list instead of every sample.

use serde::{Deserialize, Serialize};

const EXACT: u64 = 256;
const SUB_BITS: u32 = 7; // 128 buckets per power of two
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = EXACT as usize + (64 - 8) * SUB as usize;

/// Counts per bucket, the exact maximum and the sample count.
#[derive(Clone, Debug)]
pub struct Hist {
    counts: Vec<u64>,
    max: u64,
    n: u64,
}

/// The sparse form a child prints: `[[bucket, count], …]`, max and n.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SparseHist {
    buckets: Vec<(u32, u64)>,
    max: u64,
    n: u64,
}

fn bucket(v: u64) -> usize {
    if v < EXACT {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= 8
    let sub = (v >> (e - SUB_BITS)) & (SUB - 1);
    EXACT as usize + (e as usize - 8) * SUB as usize + sub as usize
}

/// The middle of bucket `i`.
fn value(i: usize) -> u64 {
    if i < EXACT as usize {
        return i as u64;
    }
    let e = ((i - EXACT as usize) / SUB as usize + 8) as u32;
    let sub = ((i - EXACT as usize) % SUB as usize) as u64;
    let width = 1u64 << (e - SUB_BITS);
    ((SUB + sub) << (e - SUB_BITS)) + width / 2
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: vec![0; BUCKETS],
            max: 0,
            n: 0,
        }
    }
}

impl Hist {
    /// Records one latency in µs.
    pub fn record(&mut self, us: u64) {
        if let Some(c) = self.counts.get_mut(bucket(us)) {
            *c += 1;
        }
        self.max = self.max.max(us);
        self.n += 1;
    }

    /// Samples recorded.
    pub fn len(&self) -> u64 {
        self.n
    }

    /// The `p` quantile (0..=1) in milliseconds; None when empty.
    pub fn percentile_ms(&self, p: f64) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let rank = ((self.n - 1) as f64 * p).round() as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen > rank {
                return Some(value(i).min(self.max) as f64 / 1000.0);
            }
        }
        Some(self.max as f64 / 1000.0)
    }

    /// The largest sample in milliseconds.
    pub fn max_ms(&self) -> Option<f64> {
        (self.n > 0).then(|| self.max as f64 / 1000.0)
    }

    /// The sparse form.
    pub fn sparse(&self) -> SparseHist {
        SparseHist {
            buckets: self
                .counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, c)| (i as u32, *c))
                .collect(),
            max: self.max,
            n: self.n,
        }
    }

    /// Adds a sparse histogram (from a child) into this one.
    pub fn merge_sparse(&mut self, s: &SparseHist) {
        for &(i, c) in &s.buckets {
            if let Some(slot) = self.counts.get_mut(i as usize) {
                *slot += c;
            }
        }
        self.max = self.max.max(s.max);
        self.n += s.n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_close() {
        let mut last = 0;
        for v in (0..5_000_000u64).step_by(997).chain([u64::MAX / 2]) {
            let b = bucket(v);
            assert!(b >= last && b < BUCKETS);
            last = b;
            let mid = value(b);
            let err = mid.abs_diff(v) as f64 / v.max(1) as f64;
            assert!(err <= 0.008, "{v} -> {mid}");
        }
    }

    #[test]
    fn percentiles_and_merge() {
        let mut h = Hist::default();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.percentile_ms(0.5).unwrap();
        assert!((p50 - 500.0).abs() < 5.0, "{p50}");
        assert_eq!(h.max_ms(), Some(1000.0));
        let mut m = Hist::default();
        m.merge_sparse(&h.sparse());
        m.merge_sparse(&h.sparse());
        assert_eq!(m.len(), 2000);
        assert_eq!(m.percentile_ms(0.99), h.percentile_ms(0.99));
    }
}
