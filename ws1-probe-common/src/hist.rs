//! The latency histogram layout kept by the kernel.
//!
//! Each histogram holds two bucket sets, both filled in the kernel for every observation:
//!
//! * **export buckets**: the Prometheus `le` bounds (default 1 µs … 10 s in 1-2.5-5 steps). A value
//!   equal to a bound counts in that bucket, as Prometheus defines `le`, so exported buckets are
//!   exact, not interpolated from finer data.
//! * **fine buckets**: log-linear, 16 per power of two, exact below 32 ns. The CLI derives
//!   quantiles from them; the bucket width is at most 1/16 of its lower edge, so a quantile taken
//!   at the bucket midpoint is within 3.2 % of the true value (the issue asks for ≤ 7 %).

/// Number of export bound slots the kernel holds. Unused slots are `u64::MAX`, and the last slot
/// always is, so at most `EXPORT_BOUND_SLOTS - 1` real bounds fit and a value above all of them
/// lands in the first `u64::MAX` slot: the `+Inf` bucket.
pub const EXPORT_BOUND_SLOTS: usize = 32;
/// Largest number of configurable `le` bounds.
pub const MAX_EXPORT_BOUNDS: usize = EXPORT_BOUND_SLOTS - 1;
/// Export buckets: one per slot (real bounds, then `+Inf`).
pub const EXPORT_BUCKETS: usize = EXPORT_BOUND_SLOTS;

/// log2 of the number of fine buckets per power of two.
pub const FINE_SUB_BITS: u32 = 4;
/// Fine buckets per power of two.
pub const FINE_SUB: u64 = 1 << FINE_SUB_BITS;
/// Largest power of two tracked separately; larger values land in the last bucket
/// (2^36 ns ≈ 68.7 s).
pub const FINE_MAX_LOG2: u32 = 36;
/// Number of fine buckets.
pub const FINE_BUCKETS: usize = ((FINE_MAX_LOG2 - FINE_SUB_BITS + 2) as usize) * FINE_SUB as usize;

/// Default export bounds in nanoseconds: 1 µs … 10 s in 1-2.5-5 steps (22 bounds).
pub const DEFAULT_EXPORT_BOUNDS_NS: [u64; 22] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
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
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A latency histogram as stored per CPU in the kernel.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LatencyHist {
    /// Number of observations. Shared (atomic) histograms leave it 0 and readers use
    /// [`LatencyHist::observations`], the sum of the export buckets.
    pub count: u64,
    /// Sum of observations in nanoseconds.
    pub sum_ns: u64,
    /// Largest observation in nanoseconds.
    pub max_ns: u64,
    /// Export buckets (not cumulative): `export[i]` counts values in `(bound[i-1], bound[i]]`.
    pub export: [u64; EXPORT_BUCKETS],
    /// Fine log-linear buckets (not cumulative), see [`fine_index`].
    pub fine: [u64; FINE_BUCKETS],
}

impl LatencyHist {
    /// Number of observations: every observation lands in exactly one export bucket.
    pub fn observations(&self) -> u64 {
        self.export.iter().sum()
    }

    /// An empty histogram.
    pub const ZERO: Self = Self {
        count: 0,
        sum_ns: 0,
        max_ns: 0,
        export: [0; EXPORT_BUCKETS],
        fine: [0; FINE_BUCKETS],
    };
}

#[cfg(feature = "user")]
crate::impl_pod!(LatencyHist);

/// Floor of log2 for `v > 0`, without `leading_zeros` (the BPF target has no such instruction).
#[inline(always)]
pub const fn log2_floor(mut v: u64) -> u32 {
    let mut r = 0;
    if v >= 1 << 32 {
        v >>= 32;
        r += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        r += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        r += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        r += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        r += 2;
    }
    if v >= 1 << 1 {
        r += 1;
    }
    r
}

/// Fine bucket index of a value in nanoseconds. Always `< FINE_BUCKETS`.
#[inline(always)]
pub const fn fine_index(ns: u64) -> usize {
    if ns < 2 * FINE_SUB {
        return ns as usize;
    }
    let mut m = log2_floor(ns);
    let mut ns = ns;
    if m > FINE_MAX_LOG2 {
        m = FINE_MAX_LOG2;
        ns = (1u64 << (FINE_MAX_LOG2 + 1)) - 1;
    }
    let sub = (ns >> (m - FINE_SUB_BITS)) - FINE_SUB;
    let idx = (m - FINE_SUB_BITS + 1) as u64 * FINE_SUB + sub;
    if idx >= FINE_BUCKETS as u64 {
        FINE_BUCKETS - 1
    } else {
        idx as usize
    }
}

/// Inclusive lower edge in nanoseconds of fine bucket `idx`.
pub const fn fine_lower(idx: usize) -> u64 {
    let idx = idx as u64;
    if idx < 2 * FINE_SUB {
        return idx;
    }
    let m = idx / FINE_SUB + FINE_SUB_BITS as u64 - 1;
    let sub = idx % FINE_SUB;
    (FINE_SUB + sub) << (m - FINE_SUB_BITS as u64)
}

/// Exclusive upper edge in nanoseconds of fine bucket `idx`.
pub const fn fine_upper(idx: usize) -> u64 {
    if idx + 1 >= FINE_BUCKETS {
        u64::MAX
    } else {
        fine_lower(idx + 1)
    }
}

/// Export bucket index for `ns`: the first slot whose bound is `>= ns` (Prometheus `le`).
///
/// `bounds` is sorted ascending and padded with `u64::MAX`; a value above every real bound lands
/// in the first padding slot, which the agent reports as `+Inf`. Five comparisons, no loop.
#[inline(always)]
pub fn export_index(bounds: &[u64; EXPORT_BOUND_SLOTS], ns: u64) -> usize {
    let mut lo = 0usize;
    let mut step = EXPORT_BOUND_SLOTS / 2;
    // A branch-only binary search: after the five halvings `lo` is the number of bounds below
    // `ns` (bounds are sorted, so that is the first index with bound >= ns).
    while step > 0 {
        if bounds[lo + step - 1] < ns {
            lo += step;
        }
        step /= 2;
    }
    lo
}

/// Pads a sorted bound list into the kernel's fixed-size slot array.
pub const fn pad_bounds<const N: usize>(bounds: &[u64; N]) -> [u64; EXPORT_BOUND_SLOTS] {
    let mut out = [u64::MAX; EXPORT_BOUND_SLOTS];
    let mut i = 0;
    while i < N && i < MAX_EXPORT_BOUNDS {
        out[i] = bounds[i];
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_matches_leading_zeros() {
        for shift in 0..64 {
            for v in [
                1u64 << shift,
                (1u64 << shift) | 1,
                (1u64 << shift).wrapping_mul(3) / 2,
            ] {
                if v == 0 {
                    continue;
                }
                assert_eq!(log2_floor(v), 63 - v.leading_zeros(), "v={v}");
            }
        }
    }

    #[test]
    fn fine_buckets_are_contiguous_and_contain_their_values() {
        for idx in 0..FINE_BUCKETS - 1 {
            let lo = fine_lower(idx);
            let hi = fine_upper(idx);
            assert!(lo < hi, "bucket {idx} empty");
            assert_eq!(fine_index(lo), idx, "lower edge of {idx}");
            assert_eq!(fine_index(hi - 1), idx, "upper edge of {idx}");
            assert_eq!(fine_index(hi), idx + 1);
            // Relative width bounds the quantile error: (hi - lo) / lo <= 1/16 above 32 ns.
            if lo >= 2 * FINE_SUB {
                assert!(
                    (hi - lo) * FINE_SUB <= lo,
                    "bucket {idx} too wide: {lo}..{hi}"
                );
            }
        }
        assert_eq!(fine_index(u64::MAX), FINE_BUCKETS - 1);
        assert_eq!(fine_index(1 << 40), FINE_BUCKETS - 1);
    }

    #[test]
    fn export_index_is_le() {
        let bounds = pad_bounds(&DEFAULT_EXPORT_BOUNDS_NS);
        assert_eq!(export_index(&bounds, 0), 0);
        assert_eq!(
            export_index(&bounds, 1_000),
            0,
            "equal to a bound counts in it"
        );
        assert_eq!(export_index(&bounds, 1_001), 1);
        assert_eq!(export_index(&bounds, 2_500), 1);
        assert_eq!(export_index(&bounds, 10_000_000_000), 21);
        assert_eq!(export_index(&bounds, 10_000_000_001), 22, "+Inf");
        assert_eq!(export_index(&bounds, u64::MAX), 22);
        for (i, b) in DEFAULT_EXPORT_BOUNDS_NS.iter().enumerate() {
            assert_eq!(export_index(&bounds, *b), i);
            assert_eq!(export_index(&bounds, b + 1), i + 1);
        }
    }

    #[test]
    fn export_index_most_bounds() {
        let mut bounds = [0u64; MAX_EXPORT_BOUNDS];
        for (i, b) in bounds.iter_mut().enumerate() {
            *b = (i as u64 + 1) * 10;
        }
        let slots = pad_bounds(&bounds);
        assert_eq!(slots[EXPORT_BOUND_SLOTS - 1], u64::MAX);
        assert_eq!(export_index(&slots, 310), 30);
        assert_eq!(export_index(&slots, 311), 31, "+Inf is the last bucket");
        assert!(export_index(&slots, u64::MAX) < EXPORT_BUCKETS);
        assert_eq!(export_index(&slots, 5), 0);
    }
}
