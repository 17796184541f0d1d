//! A fixed-bucket histogram of durations that any thread may record into without a lock, read as
//! Prometheus reads one: bucket counts by upper bound (the exposition accumulates them), a sum and
//! a count.
//!
//! The datapath records a connect latency or a connection's lifetime into its own worker's
//! histogram (a relaxed atomic add on a line no other worker writes); the control loop records its
//! build times and sync lag into one of its own. Readers add up the histograms of the same bounds.
//! Invariants: a value lands in the first bucket whose upper bound is at least the value, or in the
//! implicit `+Inf` bucket; [`HistogramSnapshot::count`] is the sum of the buckets; nothing
//! allocates after construction, nothing panics (sums saturate at `u64::MAX` nanoseconds, 584
//! years).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) for a backend connect: 100 µs on loopback to seconds across a WAN.
pub const CONNECT_SECONDS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// Upper bounds (seconds) for how long a connection or flow lives: a request to a day-long stream.
pub const LIFETIME_SECONDS: &[f64] =
    &[0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 86400.0];

/// Upper bounds (seconds) for control-plane work: a build, or a change from its watch event to
/// its publish.
pub const CONTROL_SECONDS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Bounds at most; the `+Inf` bucket comes on top.
const MAX_BOUNDS: usize = 15;

/// See the module doc. `bounds` must be ascending and at most 15 long (longer ones are cut).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts; index `bounds.len()` is `+Inf`.
    buckets: [AtomicU64; MAX_BOUNDS + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds: &bounds[..bounds.len().min(MAX_BOUNDS)],
            buckets: Default::default(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn record(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        let index = self.bounds.iter().position(|&bound| seconds <= bound).unwrap_or(self.bounds.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(value.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .sum_nanos
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |sum| Some(sum.saturating_add(nanos)));
    }

    pub fn read(&self) -> HistogramSnapshot {
        let mut snapshot = HistogramSnapshot::empty(self.bounds);
        snapshot.add(self);
        snapshot
    }
}

/// What a [`Histogram`] (or the sum of several of the same bounds) held when read.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub bounds: &'static [f64],
    /// Non-cumulative, `bounds.len() + 1` long.
    pub buckets: Vec<u64>,
    pub sum_nanos: u64,
}

impl HistogramSnapshot {
    pub fn empty(bounds: &'static [f64]) -> HistogramSnapshot {
        let bounds = &bounds[..bounds.len().min(MAX_BOUNDS)];
        HistogramSnapshot { bounds, buckets: vec![0; bounds.len() + 1], sum_nanos: 0 }
    }

    /// Adds what `histogram` holds now; one of other bounds is not added (it cannot be merged).
    pub fn add(&mut self, histogram: &Histogram) {
        if !std::ptr::eq(self.bounds, histogram.bounds) && self.bounds != histogram.bounds {
            return;
        }
        for (sum, bucket) in self.buckets.iter_mut().zip(&histogram.buckets) {
            *sum = sum.saturating_add(bucket.load(Ordering::Relaxed));
        }
        self.sum_nanos = self.sum_nanos.saturating_add(histogram.sum_nanos.load(Ordering::Relaxed));
    }

    /// Adds another snapshot of the same bounds (ignored otherwise).
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        if self.bounds != other.bounds {
            return;
        }
        for (sum, bucket) in self.buckets.iter_mut().zip(&other.buckets) {
            *sum = sum.saturating_add(*bucket);
        }
        self.sum_nanos = self.sum_nanos.saturating_add(other.sum_nanos);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().fold(0u64, |sum, &n| sum.saturating_add(n))
    }

    pub fn sum_seconds(&self) -> f64 {
        self.sum_nanos as f64 / 1e9
    }

    /// `(upper bound, values in that bucket alone)`, the last bound `f64::INFINITY`.
    pub fn by_bound(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        self.bounds.iter().copied().chain([f64::INFINITY]).zip(self.buckets.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_the_first_bucket_at_least_as_large_and_read_cumulatively() {
        let histogram = Histogram::new(&[0.001, 0.01, 0.1]);
        for value in [
            Duration::from_micros(500),
            Duration::from_millis(1),
            Duration::from_millis(5),
            Duration::from_secs(3),
        ] {
            histogram.record(value);
        }
        let read = histogram.read();
        assert_eq!(read.buckets, [2, 1, 0, 1]);
        assert_eq!(read.count(), 4);
        let by_bound: Vec<_> = read.by_bound().collect();
        assert_eq!(by_bound, [(0.001, 2), (0.01, 1), (0.1, 0), (f64::INFINITY, 1)]);
        assert!((read.sum_seconds() - 3.0065).abs() < 1e-9, "{}", read.sum_seconds());
    }

    #[test]
    fn snapshots_of_the_same_bounds_add_up_and_others_are_not_mixed_in() {
        let (a, b) = (Histogram::new(CONNECT_SECONDS), Histogram::new(CONNECT_SECONDS));
        a.record(Duration::from_millis(2));
        b.record(Duration::from_millis(2));
        b.record(Duration::from_secs(100));
        let mut sum = a.read();
        sum.add(&b);
        assert_eq!(sum.count(), 3);
        assert_eq!(sum.buckets[CONNECT_SECONDS.len()], 1, "100 s is beyond every bound");
        let other = Histogram::new(LIFETIME_SECONDS);
        other.record(Duration::from_secs(1));
        sum.add(&other);
        sum.merge(&other.read());
        assert_eq!(sum.count(), 3);
    }

    #[test]
    fn a_sum_beyond_u64_nanoseconds_saturates() {
        let histogram = Histogram::new(LIFETIME_SECONDS);
        histogram.record(Duration::MAX);
        histogram.record(Duration::MAX);
        let read = histogram.read();
        assert_eq!(read.sum_nanos, u64::MAX);
        assert_eq!(read.count(), 2);
    }
}
