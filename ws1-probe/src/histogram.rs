//! Userspace view of the kernel's latency histograms: merging per-CPU copies, exact cumulative
//! `le` buckets for export, and quantiles from the fine log-linear buckets.

use ws1_probe_common::hist::{
    EXPORT_BUCKETS, FINE_BUCKETS, LatencyHist, fine_index, fine_lower, fine_upper,
};

/// A latency histogram summed over CPUs (and, where the caller wants it, over keys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    pub count: u64,
    pub sum_ns: u64,
    pub max_ns: u64,
    /// Non-cumulative export buckets; index `i < bounds.len()` is `le = bounds[i]`, index
    /// `bounds.len()` is `+Inf`.
    pub export: [u64; EXPORT_BUCKETS],
    /// Non-cumulative fine buckets (see `ws1_probe_common::hist`).
    pub fine: Box<[u64; FINE_BUCKETS]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            count: 0,
            sum_ns: 0,
            max_ns: 0,
            export: [0; EXPORT_BUCKETS],
            fine: Box::new([0; FINE_BUCKETS]),
        }
    }
}

impl Histogram {
    /// Adds one kernel (per-CPU) histogram.
    pub fn add_kernel(&mut self, h: &LatencyHist) {
        self.merge(h.observations(), h.sum_ns, h.max_ns, &h.export, &h.fine);
    }

    /// Adds another merged histogram.
    pub fn add(&mut self, other: &Histogram) {
        self.merge(
            other.count,
            other.sum_ns,
            other.max_ns,
            &other.export,
            &other.fine[..],
        );
    }

    fn merge(&mut self, count: u64, sum_ns: u64, max_ns: u64, export: &[u64], fine: &[u64]) {
        self.count += count;
        self.sum_ns += sum_ns;
        self.max_ns = self.max_ns.max(max_ns);
        for (a, b) in self.export.iter_mut().zip(export) {
            *a += b;
        }
        for (a, b) in self.fine.iter_mut().zip(fine) {
            *a += b;
        }
    }

    /// Records one value the way the kernel does; used by tests and benchmarks.
    pub fn observe(&mut self, bounds_ns: &[u64], ns: u64) {
        self.count += 1;
        self.sum_ns += ns;
        self.max_ns = self.max_ns.max(ns);
        let idx = bounds_ns.partition_point(|b| *b < ns);
        self.export[idx.min(EXPORT_BUCKETS - 1)] += 1;
        self.fine[fine_index(ns)] += 1;
    }

    /// Cumulative counts for each bound in `bounds_ns` followed by `+Inf` (== `count`).
    pub fn cumulative(&self, bounds_ns: &[u64]) -> Vec<u64> {
        let mut acc = 0;
        let mut out = Vec::with_capacity(bounds_ns.len() + 1);
        for bucket in self.export.iter().take(bounds_ns.len()) {
            acc += bucket;
            out.push(acc);
        }
        out.push(self.count);
        out
    }

    /// Estimated `q`-quantile in nanoseconds (nearest-rank, `q` in 0..=1), or `None` when empty.
    ///
    /// Takes the midpoint of the fine bucket holding the rank, so the estimate is within half a
    /// bucket width (≤ 1/32 ≈ 3.1 % of the value) of the true order statistic; buckets below
    /// 32 ns are exact. Never exceeds the recorded maximum.
    pub fn quantile_ns(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut acc = 0;
        for (idx, n) in self.fine.iter().enumerate() {
            acc += n;
            if acc >= rank {
                let lo = fine_lower(idx);
                let hi = fine_upper(idx);
                let estimate = if hi - lo <= 1 { lo } else { lo + (hi - lo) / 2 };
                return Some(estimate.min(self.max_ns));
            }
        }
        Some(self.max_ns)
    }

    /// Mean in nanoseconds, or `None` when empty.
    pub fn mean_ns(&self) -> Option<u64> {
        self.sum_ns.checked_div(self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ws1_probe_common::hist::DEFAULT_EXPORT_BOUNDS_NS;

    fn exact_quantile(sorted: &[u64], q: f64) -> u64 {
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    #[test]
    fn quantiles_within_seven_percent() {
        // A deterministic spread from 40 ns to ~10 s (xorshift, no rand dependency).
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut values = Vec::new();
        let mut h = Histogram::default();
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let exp = 5 + (x % 29);
            let v = (1u64 << exp) + (x >> 40) % (1u64 << exp);
            values.push(v);
            h.observe(&DEFAULT_EXPORT_BOUNDS_NS, v);
        }
        values.sort_unstable();
        for q in [0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0] {
            let want = exact_quantile(&values, q) as f64;
            let got = h.quantile_ns(q).unwrap() as f64;
            let err = (got - want).abs() / want;
            assert!(err <= 0.07, "q={q}: got {got}, want {want}, err {err:.4}");
            assert!(
                err <= 0.032,
                "q={q}: error {err:.4} above the 1/32 design bound"
            );
        }
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::default();
        for v in [3, 7, 7, 20] {
            h.observe(&DEFAULT_EXPORT_BOUNDS_NS, v);
        }
        assert_eq!(h.quantile_ns(0.5), Some(7));
        assert_eq!(h.quantile_ns(1.0), Some(20));
        assert_eq!(h.quantile_ns(0.0), Some(3));
        assert_eq!(h.mean_ns(), Some(9));
        assert_eq!(Histogram::default().quantile_ns(0.5), None);
    }

    #[test]
    fn cumulative_le_is_inclusive() {
        let mut h = Histogram::default();
        let bounds = &DEFAULT_EXPORT_BOUNDS_NS;
        h.observe(bounds, 1_000); // exactly 1 µs: counts in le=1e-06
        h.observe(bounds, 1_001);
        h.observe(bounds, 20_000_000_000); // above 10 s: only +Inf
        let c = h.cumulative(bounds);
        assert_eq!(c.len(), bounds.len() + 1);
        assert_eq!(c[0], 1);
        assert_eq!(c[1], 2);
        assert_eq!(c[bounds.len() - 1], 2);
        assert_eq!(c[bounds.len()], 3);
    }

    #[test]
    fn merge_sums_cpus() {
        let mut k = LatencyHist::ZERO;
        k.count = 2;
        k.sum_ns = 30;
        k.max_ns = 20;
        k.export[0] = 2;
        k.fine[10] = 1;
        k.fine[20] = 1;
        let mut h = Histogram::default();
        h.add_kernel(&k);
        h.add_kernel(&k);
        assert_eq!((h.count, h.sum_ns, h.max_ns, h.export[0]), (4, 60, 20, 4));
        assert_eq!(h.fine[10], 2);
    }
}
