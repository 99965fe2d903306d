//! Allocations, precise mode: uprobes on the malloc family and free of targeted processes.
//!
//! An entry probe stores what the call asked for (per thread, in `ALLOC_PENDING`); the return
//! probe records the returned block in `ALLOCS` with its size, time, service and user stack, and
//! `free` removes it. What is left in `ALLOCS` is outstanding; the agent turns old entries into
//! the leak report. The stack is taken at the return probe: there the frame pointer chain starts
//! in the caller, so the function that called malloc is the first frame (at malloc's entry its
//! caller's return address is not yet on the chain).

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, BPF_F_USER_STACK, BPF_NOEXIST},
    btf_maps::StackTrace as BtfStackTrace,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{btf_map, map},
    maps::{HashMap, PerCpuHashMap, StackTrace},
    programs::{ProbeContext, RetProbeContext, TracePointContext, tracing::StackIdContext},
};
use ws1_probe_common::{
    alloc::{
        ALLOC_ENTRIES, AllocInfo, AllocKey, AllocSite, AllocSiteKey, AllocStats, MAP_ANONYMOUS,
        MMAP_ENTRIES, MmapOffsets, PRECISE_ENTRIES, PendingAlloc, SITE_ENTRIES, STACK_ENTRIES,
        size_bucket, top_stack_id,
    },
    targets::DropReason,
};

use crate::{
    hist::atomic_add,
    targets::{count_drop, service_of},
};

/// Outstanding allocations. Not preallocated: it is large and fills with use.
#[map]
static ALLOCS: HashMap<AllocKey, AllocInfo> =
    HashMap::with_max_entries(ALLOC_ENTRIES, BPF_F_NO_PREALLOC);

/// Calls in progress, by thread id.
#[map]
static ALLOC_PENDING: HashMap<u32, PendingAlloc> = HashMap::with_max_entries(16_384, 0);

/// User stacks of allocations.
#[map]
static ALLOC_STACKS: StackTrace = StackTrace::with_max_entries(STACK_ENTRIES, 0);

/// The calling function only, for allocations whose full stack finds no room in `ALLOC_STACKS`
/// (see `top_stack_id`).
#[btf_map]
static ALLOC_TOP_STACKS: BtfStackTrace<{ STACK_ENTRIES as usize }, 0, 1> = BtfStackTrace::new();

/// Bytes and calls per (service, allocation stack), freed or not: the top allocating stacks.
/// Shared by all CPUs and updated with atomic adds.
#[map]
static ALLOC_SITES: HashMap<AllocSiteKey, AllocSite> = HashMap::with_max_entries(SITE_ENTRIES, 0);

/// Processes in precise mode: the syscall tracepoints below fire host-wide, the uprobes only in
/// these.
#[map]
static PRECISE_PIDS: HashMap<u32, u32> = HashMap::with_max_entries(PRECISE_ENTRIES, 0);

/// Anonymous regions mapped outside the allocator: (tgid, address) → length.
#[map]
static ALLOC_MMAPS: HashMap<AllocKey, u64> =
    HashMap::with_max_entries(MMAP_ENTRIES, BPF_F_NO_PREALLOC);

/// An anonymous mmap in progress, by thread: its length.
#[map]
static MMAP_PENDING: HashMap<u32, u64> = HashMap::with_max_entries(16_384, 0);

/// Last program break seen per process, to turn brk results into growth.
#[map]
static LAST_BRK: HashMap<u32, u64> = HashMap::with_max_entries(PRECISE_ENTRIES, 0);

/// Tracepoint field offsets, read by the agent from tracefs.
#[unsafe(no_mangle)]
static MMAP_OFFSETS: MmapOffsets = MmapOffsets::FALLBACK;

/// Per-service counters.
#[map]
static ALLOC_STATS: PerCpuHashMap<u32, AllocStats> = PerCpuHashMap::with_max_entries(1_024, 0);

/// Which argument holds what, per allocator function.
#[derive(Clone, Copy)]
pub enum Entry {
    /// malloc(size), valloc(size), pvalloc(size)
    Size0,
    /// calloc(n, size)
    Calloc,
    /// realloc(ptr, size)
    Realloc,
    /// reallocarray(ptr, n, size)
    ReallocArray,
    /// aligned_alloc(align, size), memalign(align, size)
    Size1,
    /// posix_memalign(&ptr, align, size)
    PosixMemalign,
}

#[inline(always)]
fn targeted() -> Option<(u32, u32, u32)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    service_of(tgid).map(|service| (pid_tgid as u32, tgid, service))
}

pub fn try_entry(ctx: &ProbeContext, kind: Entry) -> Result<u32, i32> {
    let Some((tid, _, _)) = targeted() else {
        return Ok(0);
    };
    let arg = |n: usize| ctx.arg::<u64>(n).unwrap_or(0);
    let pending = match kind {
        Entry::Size0 => pending(arg(0), 0, 0),
        Entry::Calloc => pending(mul(arg(0), arg(1)), 0, 0),
        Entry::Realloc => pending(arg(1), arg(0), 0),
        Entry::ReallocArray => pending(mul(arg(1), arg(2)), arg(0), 0),
        Entry::Size1 => pending(arg(1), 0, 0),
        Entry::PosixMemalign => pending(arg(2), 0, arg(0)),
    };
    if ALLOC_PENDING.insert(tid, pending, 0).is_err() {
        count_drop(DropReason::AllocPendingFull);
    }
    Ok(0)
}

/// Saturating multiply without 128-bit arithmetic (the BPF target has no `__multi3`, and LLVM
/// turns the usual overflow checks into one). Factors below 2^32 cannot overflow; a calloc with
/// a larger factor fails anyway, so the exact value does not matter.
#[inline(always)]
fn mul(a: u64, b: u64) -> u64 {
    if a >> 32 != 0 || b >> 32 != 0 {
        u64::MAX
    } else {
        a * b
    }
}

#[inline(always)]
const fn pending(size: u64, old_ptr: u64, memptr: u64) -> PendingAlloc {
    PendingAlloc {
        size,
        old_ptr,
        memptr,
    }
}

/// Return of every pointer-returning allocator.
pub fn try_return(ctx: &RetProbeContext) -> Result<u32, i32> {
    let Some((tid, tgid, service)) = targeted() else {
        return Ok(0);
    };
    let Some(p) = take_pending(tid) else {
        return Ok(0);
    };
    let ptr: u64 = ctx.ret();
    finish(ctx, tgid, service, &p, ptr);
    Ok(0)
}

/// Return of posix_memalign: 0 on success, the block is in `*memptr`.
pub fn try_return_posix_memalign(ctx: &RetProbeContext) -> Result<u32, i32> {
    let Some((tid, tgid, service)) = targeted() else {
        return Ok(0);
    };
    let Some(p) = take_pending(tid) else {
        return Ok(0);
    };
    let ret: i32 = ctx.ret();
    let ptr = if ret == 0 {
        // SAFETY: a user pointer the call just wrote; a failed read yields 0 (not recorded).
        unsafe { bpf_probe_read_user(p.memptr as *const u64) }.unwrap_or(0)
    } else {
        0
    };
    finish(ctx, tgid, service, &p, ptr);
    Ok(0)
}

/// Return of jemalloc's `xallocx`, which resizes `ptr` in place and returns its real size
/// (the old one when it could not grow): the tracked block takes that size.
pub fn try_return_xallocx(ctx: &RetProbeContext) -> Result<u32, i32> {
    let Some((tid, tgid, service)) = targeted() else {
        return Ok(0);
    };
    let Some(p) = take_pending(tid) else {
        return Ok(0);
    };
    let size: u64 = ctx.ret();
    let key = AllocKey {
        tgid,
        _pad: 0,
        addr: p.old_ptr,
    };
    let Some(info) = ALLOCS.get_ptr_mut(&key) else {
        return Ok(0);
    };
    // SAFETY: pointer from a successful lookup; only this process's threads touch its blocks,
    // and a block is resized by one call at a time.
    let old = unsafe { (*info).size };
    if size == 0 || size == old {
        return Ok(0);
    }
    // SAFETY: as above.
    unsafe { (*info).size = size };
    update_stats(service, |s| {
        if size > old {
            s.alloc_bytes += size - old;
        } else {
            s.free_bytes += old - size;
        }
    });
    Ok(0)
}

pub fn try_free(ctx: &ProbeContext) -> Result<u32, i32> {
    let Some((_, tgid, service)) = targeted() else {
        return Ok(0);
    };
    let ptr = ctx.arg::<u64>(0).unwrap_or(0);
    if ptr != 0 {
        release(tgid, service, ptr);
    }
    Ok(0)
}

#[inline(always)]
fn take_pending(tid: u32) -> Option<PendingAlloc> {
    let p = ALLOC_PENDING.get_ptr(tid)?;
    // SAFETY: pointer from a successful lookup, copied before the entry is removed.
    let p = unsafe { *p };
    let _ = ALLOC_PENDING.remove(tid);
    Some(p)
}

#[inline(always)]
fn finish<C: EbpfContext + StackIdContext>(
    ctx: &C,
    tgid: u32,
    service: u32,
    p: &PendingAlloc,
    ptr: u64,
) {
    // realloc frees the old block when it succeeds, or when asked for 0 bytes.
    if p.old_ptr != 0 && (ptr != 0 || p.size == 0) {
        release(tgid, service, p.old_ptr);
    }
    if p.size == 0 {
        return;
    }
    if ptr == 0 {
        update_stats(service, |s| s.failed += 1);
        return;
    }
    let user = u64::from(BPF_F_USER_STACK);
    let stack_id = match ctx.get_stackid(&ALLOC_STACKS, user) {
        Ok(id) => id as i32,
        Err(_) => match ctx.get_stackid(&ALLOC_TOP_STACKS, user) {
            Ok(id) => top_stack_id(id as u32),
            Err(_) => {
                count_drop(DropReason::AllocStackLost);
                -1
            }
        },
    };
    let info = AllocInfo {
        size: p.size,
        // SAFETY: no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        service,
        stack_id,
    };
    let key = AllocKey {
        tgid,
        _pad: 0,
        addr: ptr,
    };
    let tracked = ALLOCS.insert(&key, &info, 0).is_ok();
    count_site(service, stack_id, p.size);
    let size = p.size;
    update_stats(service, |s| {
        s.alloc_bytes += size;
        s.allocs += 1;
        if let Some(b) = s.size_buckets.get_mut(size_bucket(size)) {
            *b += 1;
        }
        if !tracked {
            s.untracked += 1;
            s.untracked_bytes += size;
        }
    });
}

#[inline(always)]
fn count_site(service: u32, stack_id: i32, size: u64) {
    let key = AllocSiteKey { service, stack_id };
    let site = match ALLOC_SITES.get_ptr_mut(&key) {
        Some(site) => site,
        None => {
            let zero = AllocSite { bytes: 0, count: 0 };
            let _ = ALLOC_SITES.insert(&key, &zero, u64::from(BPF_NOEXIST));
            match ALLOC_SITES.get_ptr_mut(&key) {
                Some(site) => site,
                None => return,
            }
        }
    };
    // SAFETY: a map value shared by all CPUs, only updated with atomic adds.
    unsafe {
        atomic_add(&mut (*site).bytes, size);
        atomic_add(&mut (*site).count, 1);
    }
}

/// A block was freed: forget it, counting its bytes if it was tracked.
#[inline(always)]
fn release(tgid: u32, service: u32, ptr: u64) {
    let key = AllocKey {
        tgid,
        _pad: 0,
        addr: ptr,
    };
    let Some(info) = ALLOCS.get_ptr(&key) else {
        // Allocated before the probe attached, or not tracked.
        return;
    };
    // SAFETY: pointer from a successful lookup, read before the entry is removed.
    let size = unsafe { (*info).size };
    if ALLOCS.remove(&key).is_ok() {
        update_stats(service, |s| {
            s.free_bytes += size;
            s.frees += 1;
        });
    }
}

#[inline(always)]
fn update_stats(service: u32, f: impl FnOnce(&mut AllocStats)) {
    let stats = match ALLOC_STATS.get_ptr_mut(service) {
        Some(s) => s,
        None => {
            let _ = ALLOC_STATS.insert(service, AllocStats::ZERO, u64::from(BPF_NOEXIST));
            match ALLOC_STATS.get_ptr_mut(service) {
                Some(s) => s,
                None => return,
            }
        }
    };
    // SAFETY: this CPU's value; programs do not migrate while they run.
    f(unsafe { &mut *stats });
}

/// Precise-mode process calling a syscall itself, not from inside the allocator (whose own
/// mmap/brk calls are already accounted as the blocks it returns): (tid, tgid, service).
#[inline(always)]
fn precise_outside_allocator() -> Option<(u32, u32, u32)> {
    let (tid, tgid, service) = targeted()?;
    PRECISE_PIDS.get_ptr(tgid)?;
    if ALLOC_PENDING.get_ptr(tid).is_some() {
        return None;
    }
    Some((tid, tgid, service))
}

#[inline(always)]
fn offsets() -> MmapOffsets {
    // SAFETY: a plain read of a global the loader may have rewritten.
    unsafe { core::ptr::read_volatile(&MMAP_OFFSETS) }
}

pub fn try_mmap_enter(ctx: &TracePointContext) -> Result<u32, i32> {
    let Some((tid, _, _)) = precise_outside_allocator() else {
        return Ok(0);
    };
    let off = offsets();
    // SAFETY: offsets read from this tracepoint's format file.
    let flags: u64 = unsafe { ctx.read_at(off.mmap_flags as usize)? };
    if flags & MAP_ANONYMOUS == 0 {
        return Ok(0);
    }
    // SAFETY: as above.
    let len: u64 = unsafe { ctx.read_at(off.mmap_len as usize)? };
    let _ = MMAP_PENDING.insert(tid, len, 0);
    Ok(0)
}

pub fn try_mmap_exit(ctx: &TracePointContext) -> Result<u32, i32> {
    let Some((tid, tgid, service)) = targeted() else {
        return Ok(0);
    };
    let Some(len) = MMAP_PENDING.get_ptr(tid) else {
        return Ok(0);
    };
    // SAFETY: pointer from a successful lookup, copied before the entry is removed.
    let len = unsafe { *len };
    let _ = MMAP_PENDING.remove(tid);
    // SAFETY: offset read from this tracepoint's format file.
    let ret: i64 = unsafe { ctx.read_at(offsets().exit_ret as usize)? };
    if ret < 0 && ret >= -4095 {
        return Ok(0);
    }
    let key = AllocKey {
        tgid,
        _pad: 0,
        addr: ret as u64,
    };
    if ALLOC_MMAPS.insert(&key, &len, 0).is_ok() {
        update_stats(service, |s| s.mmap_bytes += len);
    }
    Ok(0)
}

pub fn try_munmap_enter(ctx: &TracePointContext) -> Result<u32, i32> {
    let Some((_, tgid, service)) = precise_outside_allocator() else {
        return Ok(0);
    };
    let off = offsets();
    // SAFETY: offsets read from this tracepoint's format file.
    let addr: u64 = unsafe { ctx.read_at(off.munmap_addr as usize)? };
    let key = AllocKey {
        tgid,
        _pad: 0,
        addr,
    };
    let Some(len) = ALLOC_MMAPS.get_ptr(&key) else {
        return Ok(0);
    };
    // SAFETY: pointer from a successful lookup, copied before the entry is removed.
    let len = unsafe { *len };
    // Only a whole-region unmap releases the region; a partial one leaves it tracked.
    // SAFETY: as above.
    let unmapped: u64 = unsafe { ctx.read_at(off.munmap_len as usize)? };
    if unmapped >= len && ALLOC_MMAPS.remove(&key).is_ok() {
        update_stats(service, |s| s.munmap_bytes += len);
    }
    Ok(0)
}

pub fn try_brk_exit(ctx: &TracePointContext) -> Result<u32, i32> {
    let Some((tid, tgid, service)) = targeted() else {
        return Ok(0);
    };
    if PRECISE_PIDS.get_ptr(tgid).is_none() {
        return Ok(0);
    }
    // SAFETY: offset read from this tracepoint's format file.
    let brk: u64 = unsafe { ctx.read_at(offsets().exit_ret as usize)? };
    let last = LAST_BRK.get_ptr(tgid).map(|p| {
        // SAFETY: pointer from a successful lookup.
        unsafe { *p }
    });
    let _ = LAST_BRK.insert(tgid, brk, 0);
    // The allocator's own brk calls are accounted as the blocks it returns.
    let inside_allocator = ALLOC_PENDING.get_ptr(tid).is_some();
    if let Some(last) = last
        && brk > last
        && !inside_allocator
    {
        update_stats(service, |s| s.brk_bytes += brk - last);
    }
    Ok(0)
}
