//! Latency histograms shared by all CPUs: lookup-or-create and atomic recording.
//!
//! Histograms live in preallocated hash maps shared by all CPUs, updated with atomic adds. A
//! per-CPU map would avoid the atomics but costs `entries × 4.6 KB × CPUs` of kernel memory when
//! preallocated (2.4 GB for 8192 entries on 64 CPUs), and without preallocation its in-kernel
//! allocations fail under bursts of new keys (measured: ~50 lost events in the first second of
//! host mode), so the shared map is the one that neither loses events nor pins memory per CPU.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{Array, HashMap},
};
use ws1_probe_common::hist::{EXPORT_BOUND_SLOTS, LatencyHist, export_index, fine_index};

/// One zeroed histogram: the source value for new entries, which are too large for the
/// 512-byte BPF stack.
#[map]
static HIST_ZERO: Array<LatencyHist> = Array::with_max_entries(1, 0);

/// The histogram of `key`, created empty if absent; `None` when the map is full.
#[inline(always)]
pub fn get_or_create<K>(map: &HashMap<K, LatencyHist>, key: &K) -> Option<*mut LatencyHist> {
    if let Some(hist) = map.get_ptr_mut(key) {
        return Some(hist);
    }
    let zero = HIST_ZERO.get(0)?;
    // BPF_NOEXIST: another CPU may have created it meanwhile; the lookup below finds that one.
    let _ = map.insert(key, zero, u64::from(BPF_NOEXIST));
    map.get_ptr_mut(key)
}

/// Records `value` (nanoseconds) in `hist`, with `bounds` as the export `le` bounds.
#[inline(always)]
pub fn observe(hist: *mut LatencyHist, bounds: &[u64; EXPORT_BOUND_SLOTS], value: u64) {
    // Through a volatile read: when LLVM knows the value's range at a call site (e.g. a u32
    // scaled up) it proves the indices in bounds and drops the checks below, and the verifier,
    // which cannot follow that proof, then rejects the access.
    // SAFETY: reads of locals.
    let export = unsafe { core::ptr::read_volatile(&export_index(bounds, value)) };
    // SAFETY: as above.
    let fine = unsafe { core::ptr::read_volatile(&fine_index(value)) };
    // SAFETY: `hist` points into a map value that lives as long as the map; every field is only
    // updated with atomic adds (the maximum excepted, see below), and indices are checked by
    // `get_mut`.
    unsafe {
        let hist = &mut *hist;
        // `count` is left at 0: it equals the sum of the export buckets, which the agent adds
        // up, so one atomic instruction per event is saved.
        atomic_add(&mut hist.sum_ns, value);
        // Racy on purpose: two CPUs raising the maximum of one key at the same instant may keep
        // the smaller; a compare-and-exchange loop per event is not worth that.
        if value > hist.max_ns {
            hist.max_ns = value;
        }
        if let Some(bucket) = hist.export.get_mut(export) {
            atomic_add(bucket, 1);
        }
        if let Some(bucket) = hist.fine.get_mut(fine) {
            atomic_add(bucket, 1);
        }
    }
}

/// `*slot += n` as one atomic instruction (BPF_ATOMIC | BPF_ADD, result unused). The BPF target
/// has no `AtomicU64::fetch_add` in `core`, so the intrinsic is called directly.
#[inline(always)]
pub fn atomic_add(slot: &mut u64, n: u64) {
    use core::intrinsics::{AtomicOrdering, atomic_xadd};
    // SAFETY: `slot` is a valid, aligned u64 for the duration of the call.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, n) };
}
