//! Syscall latency: raw tracepoints on sys_enter/sys_exit.
//!
//! sys_enter records the start time of a targeted thread's syscall; sys_exit folds the duration
//! into a histogram keyed by (service, syscall) and counts `-errno` returns in a per-CPU map.
//! O(1) work per event, nothing streamed.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{HashMap, PerCpuHashMap},
};
use ws1_probe_common::{
    hist::{DEFAULT_EXPORT_BOUNDS_NS, EXPORT_BOUND_SLOTS, LatencyHist, pad_bounds},
    syscalls::{
        ERROR_ENTRIES, HIST_ENTRIES, MAX_ERRNO, START_ENTRIES, SyscallErrorKey, SyscallKey,
        SyscallStart,
    },
    targets::DropReason,
};

use crate::{
    hist,
    targets::{count_drop, service_of},
};

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions; aya marks every raw helper unsafe.
    unsafe { bpf_ktime_get_ns() }
}

/// tid → the thread's syscall in flight (`ts_ns == 0`: none). One entry per targeted thread,
/// removed when the thread exits.
#[map]
static SYSCALL_START: HashMap<u32, SyscallStart> = HashMap::with_max_entries(START_ENTRIES, 0);

/// (service, syscall) → latency histogram, shared by all CPUs (see hist.rs for why).
#[map]
static SYSCALL_HIST: HashMap<SyscallKey, LatencyHist> = HashMap::with_max_entries(HIST_ENTRIES, 0);

/// (service, syscall, errno) → failed calls, per CPU.
#[map]
static SYSCALL_ERRORS: PerCpuHashMap<SyscallErrorKey, u64> =
    PerCpuHashMap::with_max_entries(ERROR_ENTRIES, 0);

/// Prometheus `le` bounds in nanoseconds, padded with `u64::MAX`; the agent may override them.
#[unsafe(no_mangle)]
static SYSCALL_BOUNDS_NS: [u64; EXPORT_BOUND_SLOTS] = pad_bounds(&DEFAULT_EXPORT_BOUNDS_NS);

#[inline(always)]
pub fn try_sys_enter(nr: u64) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(service) = service_of((pid_tgid >> 32) as u32) else {
        return 0;
    };
    let tid = pid_tgid as u32;
    let now = now_ns();
    // A thread's entry lives from its first targeted syscall until it exits; updating it in
    // place costs a lookup, where insert + delete per syscall would churn the hash table.
    match SYSCALL_START.get_ptr_mut(tid) {
        // SAFETY: only this thread reads or writes its own entry (keyed by its tid).
        Some(start) => unsafe {
            (*start).ts_ns = now;
            (*start).nr = nr as u32;
            (*start).service = service;
        },
        None => {
            let start = SyscallStart {
                ts_ns: now,
                nr: nr as u32,
                service,
            };
            if SYSCALL_START.insert(tid, start, 0).is_err() {
                count_drop(DropReason::SyscallStartFull);
            }
        }
    }
    0
}

#[inline(always)]
pub fn try_sys_exit(ret: i64) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // The cheap filter first, so untargeted processes skip the hash lookup below. A process
    // untargeted while inside a syscall (exec into a command that does not match) loses that
    // one call.
    if service_of((pid_tgid >> 32) as u32).is_none() {
        return 0;
    }
    let tid = pid_tgid as u32;
    let Some(entry) = SYSCALL_START.get_ptr_mut(tid) else {
        return 0;
    };
    // SAFETY: only this thread reads or writes its own entry.
    let start = unsafe { *entry };
    if start.ts_ns == 0 {
        // No syscall in flight: this one entered before the probe attached, or while the
        // process was not targeted.
        return 0;
    }
    // SAFETY: as above.
    unsafe { (*entry).ts_ns = 0 };
    let duration = now_ns().saturating_sub(start.ts_ns);
    let key = SyscallKey {
        service: start.service,
        nr: start.nr,
    };
    record(&key, duration);
    if ret < 0 && ret.unsigned_abs() <= MAX_ERRNO {
        count_error(&SyscallErrorKey {
            service: start.service,
            nr: start.nr,
            errno: ret.unsigned_abs() as u32,
            _pad: 0,
        });
    }
    0
}

#[inline(always)]
fn record(key: &SyscallKey, duration: u64) {
    let Some(hist) = hist::get_or_create(&SYSCALL_HIST, key) else {
        count_drop(DropReason::SyscallHistFull);
        return;
    };
    // SAFETY: bounds are a global the loader may have rewritten; read once per event.
    let bounds = unsafe { &*core::ptr::addr_of!(SYSCALL_BOUNDS_NS) };
    hist::observe(hist, bounds, duration);
}

#[inline(always)]
fn count_error(key: &SyscallErrorKey) {
    if let Some(count) = SYSCALL_ERRORS.get_ptr_mut(key) {
        // SAFETY: per-CPU value of this CPU.
        unsafe { *count += 1 };
        return;
    }
    if SYSCALL_ERRORS
        .insert(key, 1u64, BPF_NOEXIST as u64)
        .is_err()
    {
        // Lost a race with another CPU creating the same key, or the map is full.
        match SYSCALL_ERRORS.get_ptr_mut(key) {
            // SAFETY: per-CPU value of this CPU.
            Some(count) => unsafe { *count += 1 },
            None => count_drop(DropReason::SyscallErrorsFull),
        }
    }
}

/// Forgets a thread's entry when it exits (exit and exit_group never return to sys_exit).
#[inline(always)]
pub fn forget_thread(tid: u32) {
    let _ = SYSCALL_START.remove(tid);
}
