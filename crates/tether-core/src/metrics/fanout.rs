//! `tether_publish_fanout_seconds`: a histogram on atomics. One observation per
//! publish is a few relaxed adds; prometheus-client's own histogram takes a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// The upper bounds, in nanoseconds: 50 µs to 1 s.
const BOUNDS_NS: [u64; 14] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
];

/// A histogram of durations with fixed buckets ([`BOUNDS_NS`], then `+Inf`): a
/// cheap clone handle.
#[derive(Clone, Debug, Default)]
pub(crate) struct DurationHistogram {
    inner: Arc<Cells>,
}

#[derive(Debug, Default)]
struct Cells {
    /// Per bucket (not cumulative); the last is `+Inf`.
    counts: [AtomicU64; BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl DurationHistogram {
    /// Records one duration.
    pub(crate) fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        self.inner.counts[i].fetch_add(1, Ordering::Relaxed);
        self.inner.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Sum (seconds), count and per-bucket counts; the count is the buckets' total,
    /// so `_count` always equals the `+Inf` bucket.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = BOUNDS_NS
            .iter()
            .map(|&b| b as f64 / 1e9)
            .chain(std::iter::once(f64::MAX))
            .zip(self.inner.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.inner.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, count, buckets)
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = DurationHistogram::default();
        h.observe(Duration::from_micros(50)); // on the bound: that bucket
        h.observe(Duration::from_micros(51)); // the next
        h.observe(Duration::from_secs(2)); // +Inf
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert_eq!(buckets[0], (50e-6, 1));
        assert_eq!(buckets[1], (100e-6, 1));
        assert_eq!(buckets[BOUNDS_NS.len()], (f64::MAX, 1));
        assert!((sum - 2.000101).abs() < 1e-9, "{sum}");
    }
}
