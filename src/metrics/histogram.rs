//! A histogram with fixed buckets and lock-free atomic counts: observing is a couple of
//! relaxed atomic adds, cheap enough for every connection, and the web UI can read the bucket
//! counts to chart percentiles (the prometheus-client histogram keeps them behind a lock and
//! does not expose them).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Connect latency, 50 µs to 5 s: a local connect takes tens of µs, a remote one ms.
pub const CONNECT_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// Connection lifetime, 1 ms to an hour.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0,
];

/// HTTP request duration, 500 µs to a minute.
pub const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

#[derive(Debug, Clone)]
pub struct AtomicHistogram {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    bounds: &'static [f64],
    /// One count per bucket (not cumulative), plus the +Inf bucket last.
    counts: Box<[AtomicU64]>,
    /// Sum of observations in nanoseconds, so it can be an atomic integer.
    sum_nanos: AtomicU64,
}

/// Bucket counts at one moment, cumulative as Prometheus reports them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub bounds: &'static [f64],
    /// `cumulative[i]` observations were <= `bounds[i]`; the last entry is the total count.
    pub cumulative: Vec<u64>,
    pub sum_seconds: f64,
}

impl AtomicHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        AtomicHistogram {
            inner: Arc::new(Inner {
                bounds,
                counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum_nanos: AtomicU64::new(0),
            }),
        }
    }

    pub fn observe(&self, seconds: f64) {
        let i = self
            .inner
            .bounds
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(self.inner.bounds.len());
        self.inner.counts[i].fetch_add(1, Ordering::Relaxed);
        self.inner
            .sum_nanos
            .fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
    }

    /// Observations so far, without the allocation of a [`Snapshot`].
    pub fn count(&self) -> u64 {
        self.inner
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut total = 0;
        let cumulative = self
            .inner
            .counts
            .iter()
            .map(|c| {
                total += c.load(Ordering::Relaxed);
                total
            })
            .collect();
        Snapshot {
            bounds: self.inner.bounds,
            cumulative,
            sum_seconds: self.inner.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

impl Snapshot {
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// Observations between `earlier` and `self`, for per-interval percentiles.
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            bounds: self.bounds,
            cumulative: self
                .cumulative
                .iter()
                .zip(earlier.cumulative.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            sum_seconds: (self.sum_seconds - earlier.sum_seconds).max(0.0),
        }
    }

    /// The `q` quantile (0..1), linearly interpolated inside its bucket as Prometheus'
    /// `histogram_quantile` does; None without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut prev_count = 0u64;
        let mut prev_bound = 0.0;
        for (i, &c) in self.cumulative.iter().enumerate() {
            if c as f64 >= rank {
                let Some(&upper) = self.bounds.get(i) else {
                    return Some(prev_bound); // +Inf bucket: the highest finite bound
                };
                let in_bucket = (c - prev_count) as f64;
                let frac = if in_bucket > 0.0 {
                    (rank - prev_count as f64) / in_bucket
                } else {
                    1.0
                };
                return Some(prev_bound + (upper - prev_bound) * frac.clamp(0.0, 1.0));
            }
            prev_count = c;
            prev_bound = self.bounds.get(i).copied().unwrap_or(prev_bound);
        }
        Some(prev_bound)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let s = self.snapshot();
        // The encoder accumulates bucket counts itself: hand it each bucket's own count.
        let mut below = 0;
        let buckets: Vec<(f64, u64)> = s
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(s.cumulative.iter().map(|&c| {
                let own = c - below;
                below = c;
                own
            }))
            .collect();
        encoder.encode_histogram::<NoLabelSet>(s.sum_seconds, s.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_and_quantiles() {
        let h = AtomicHistogram::new(&[1.0, 2.0, 4.0]);
        for v in [0.5, 1.5, 1.5, 3.0, 10.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.cumulative, [1, 3, 4, 5]);
        assert!((s.sum_seconds - 16.5).abs() < 1e-6);
        assert_eq!(s.quantile(0.2), Some(1.0));
        let p50 = s.quantile(0.5).unwrap();
        assert!(p50 > 1.0 && p50 <= 2.0, "{p50}");
        assert_eq!(s.quantile(1.0), Some(4.0));
        let empty = AtomicHistogram::new(&[1.0]).snapshot();
        assert_eq!(empty.quantile(0.5), None);
    }

    #[test]
    fn interval_difference() {
        let h = AtomicHistogram::new(&[1.0]);
        h.observe(0.5);
        let a = h.snapshot();
        h.observe(0.5);
        h.observe(2.0);
        let d = h.snapshot().since(&a);
        assert_eq!(d.cumulative, [1, 2]);
    }
}
