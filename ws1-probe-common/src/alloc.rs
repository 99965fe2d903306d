//! Shared types of the allocation probe (precise mode: uprobes on the malloc family).

/// Key of `ALLOCS`: addresses are per process, so the tgid is part of the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllocKey {
    pub tgid: u32,
    pub _pad: u32,
    pub addr: u64,
}

/// An outstanding allocation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocInfo {
    pub size: u64,
    /// `bpf_ktime_get_ns` when the allocation returned.
    pub ts_ns: u64,
    pub service: u32,
    /// Id in `ALLOC_STACKS`; or, at most -2, an id in `ALLOC_TOP_STACKS` (the calling function
    /// only, see [`top_stack_id`]); -1 when no stack could be taken.
    pub stack_id: i32,
}

/// A call in progress, keyed by thread in `ALLOC_PENDING`: what the entry probe saw.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingAlloc {
    /// Requested bytes.
    pub size: u64,
    /// realloc/reallocarray: the block being resized (freed when the call succeeds).
    pub old_ptr: u64,
    /// posix_memalign: where the result pointer is written.
    pub memptr: u64,
}

/// Per-service counters, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocStats {
    pub alloc_bytes: u64,
    pub allocs: u64,
    pub free_bytes: u64,
    pub frees: u64,
    /// Allocation calls that returned NULL.
    pub failed: u64,
    /// Allocations not recorded because `ALLOCS` was full, and their bytes.
    pub untracked: u64,
    pub untracked_bytes: u64,
    /// Anonymous memory mapped with mmap outside the allocator, and unmapped again.
    pub mmap_bytes: u64,
    pub munmap_bytes: u64,
    /// Growth of the program break by brk outside the allocator.
    pub brk_bytes: u64,
    /// Non-cumulative size buckets, see [`size_bucket`].
    pub size_buckets: [u64; SIZE_BUCKETS],
}

impl AllocStats {
    /// Bytes of tracked allocations not freed yet.
    pub const fn outstanding_bytes(&self) -> u64 {
        self.alloc_bytes
            .saturating_sub(self.untracked_bytes)
            .saturating_sub(self.free_bytes)
    }

    /// Adds another CPU's or service's counters.
    pub fn add(&mut self, s: &AllocStats) {
        self.alloc_bytes += s.alloc_bytes;
        self.allocs += s.allocs;
        self.free_bytes += s.free_bytes;
        self.frees += s.frees;
        self.failed += s.failed;
        self.untracked += s.untracked;
        self.untracked_bytes += s.untracked_bytes;
        self.mmap_bytes += s.mmap_bytes;
        self.munmap_bytes += s.munmap_bytes;
        self.brk_bytes += s.brk_bytes;
        let mut i = 0;
        while i < SIZE_BUCKETS {
            self.size_buckets[i] += s.size_buckets[i];
            i += 1;
        }
    }

    pub const ZERO: Self = Self {
        alloc_bytes: 0,
        allocs: 0,
        free_bytes: 0,
        frees: 0,
        failed: 0,
        untracked: 0,
        untracked_bytes: 0,
        mmap_bytes: 0,
        munmap_bytes: 0,
        brk_bytes: 0,
        size_buckets: [0; SIZE_BUCKETS],
    };
}

/// Size histogram `le` bounds in bytes: 16 B … 16 MiB in ×4 steps, then `+Inf`.
pub const SIZE_BOUNDS: [u64; 11] = [
    16,
    64,
    256,
    1 << 10,
    4 << 10,
    16 << 10,
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
    16 << 20,
];
pub const SIZE_BUCKETS: usize = SIZE_BOUNDS.len() + 1;

/// Size bucket of an allocation: the first bound `>= size` (Prometheus `le`), or `+Inf`.
#[inline(always)]
pub const fn size_bucket(size: u64) -> usize {
    if size <= 16 {
        return 0;
    }
    // Smallest l with size <= 2^l, then bound i = 2^(4 + 2i) >= size.
    let l = crate::hist::log2_floor(size - 1) + 1;
    let i = (l - 4).div_ceil(2) as usize;
    if i > SIZE_BOUNDS.len() {
        SIZE_BOUNDS.len()
    } else {
        i
    }
}

/// Key of `ALLOC_SITES`: allocations by service and stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllocSiteKey {
    pub service: u32,
    pub stack_id: i32,
}

/// Everything allocated from one site (freed or not).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocSite {
    pub bytes: u64,
    pub count: u64,
}

/// Capacity of `ALLOC_SITES`.
pub const SITE_ENTRIES: u32 = 8_192;

/// Field offsets of the syscall tracepoints precise mode reads, from tracefs at start-up.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmapOffsets {
    /// `syscalls:sys_enter_mmap` → `len`, `flags`.
    pub mmap_len: u32,
    pub mmap_flags: u32,
    /// `syscalls:sys_enter_munmap` → `addr`, `len`.
    pub munmap_addr: u32,
    pub munmap_len: u32,
    /// `ret` of `syscalls:sys_exit_mmap` and `syscalls:sys_exit_brk`.
    pub exit_ret: u32,
    pub _pad: u32,
}

impl MmapOffsets {
    /// Linux 6.x layout, used when tracefs cannot be read.
    pub const FALLBACK: Self = Self {
        mmap_len: 24,
        mmap_flags: 40,
        munmap_addr: 16,
        munmap_len: 24,
        exit_ret: 16,
        _pad: 0,
    };
}

/// `MAP_ANONYMOUS` from include/uapi/asm-generic/mman-common.h.
pub const MAP_ANONYMOUS: u64 = 0x20;
/// Capacity of `ALLOC_MMAPS` (anonymous regions mapped outside the allocator).
pub const MMAP_ENTRIES: u32 = 65_536;
/// Capacity of `PRECISE_PIDS`.
pub const PRECISE_ENTRIES: u32 = 16_384;

/// Capacity of `ALLOCS` (outstanding allocations; not preallocated).
pub const ALLOC_ENTRIES: u32 = 1 << 20;
/// Capacity of `ALLOC_STACKS` and `ALLOC_TOP_STACKS`.
pub const STACK_ENTRIES: u32 = 16_384;

/// The `stack_id` of a stack kept in `ALLOC_TOP_STACKS` (depth 1) under `id`: the fallback when
/// `ALLOC_STACKS` has no room. Full stacks of programs without frame pointers end in garbage
/// frames that make nearly every stack distinct, so that map's buckets collide; their first
/// frame, all a report can show of them, fits in a map of one frame per stack.
#[inline(always)]
pub const fn top_stack_id(id: u32) -> i32 {
    -2 - (id & 0x3fff_ffff) as i32
}

/// The `ALLOC_TOP_STACKS` id of a `stack_id` made by [`top_stack_id`].
pub const fn top_stack_index(stack_id: i32) -> Option<u32> {
    if stack_id <= -2 {
        Some((-2 - stack_id) as u32)
    } else {
        None
    }
}

#[cfg(feature = "user")]
crate::impl_pod!(
    AllocKey,
    AllocInfo,
    PendingAlloc,
    AllocStats,
    AllocSiteKey,
    AllocSite,
    MmapOffsets
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_stack_ids_round_trip() {
        for id in [0, 1, 16_383] {
            assert!(top_stack_id(id) <= -2);
            assert_eq!(top_stack_index(top_stack_id(id)), Some(id));
        }
        assert_eq!(top_stack_index(-1), None);
        assert_eq!(top_stack_index(0), None);
        assert_eq!(top_stack_index(7), None);
    }

    #[test]
    fn size_buckets_are_le() {
        assert_eq!(size_bucket(0), 0);
        assert_eq!(size_bucket(16), 0);
        assert_eq!(size_bucket(17), 1);
        assert_eq!(size_bucket(64), 1);
        assert_eq!(size_bucket(65), 2);
        for (i, b) in SIZE_BOUNDS.iter().enumerate() {
            assert_eq!(size_bucket(*b), i, "bound {b}");
            assert_eq!(size_bucket(b + 1), i + 1, "above {b}");
        }
        assert_eq!(size_bucket(u64::MAX), SIZE_BOUNDS.len());
    }
}
