//! Process targeting in the kernel: `TARGETS` maps a tgid to its service id, and
//! `TARGET_FILTER` holds the same facts as an array indexed by tgid for the hot path.
//!
//! The agent fills `TARGETS` from a /proc scan at start. From then on the kernel keeps it current
//! without the agent on the hot path: a forked process inherits its parent's service
//! (`task:task_newtask`, which runs in the parent), an exec applies the agent's cached decision
//! for the new command name or, when there is none, tells the agent through `EXEC_EVENTS`, and
//! the death of a thread group removes its entry (`sched:sched_process_exit`), so entries do not
//! leak.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use ws1_probe_common::sched::ProcEvent;
use ws1_probe_common::targets::{
    CLONE_THREAD, COMM_ENTRIES, Comm, DropReason, EXEC_RINGBUF_BYTES, ExecEvent, SERVICE_NONE,
    SERVICE_OTHER, TARGET_ENTRIES, TracepointOffsets,
};

/// tgid → service id of every targeted process: the record the agent lists and counts.
#[map]
static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(TARGET_ENTRIES, 0);

/// tgid → service id + 1 (0: not targeted). The hot-path filter: the verifier inlines array
/// lookups to a bounds check and an add, where a hash lookup costs a jhash and a bucket walk,
/// and every syscall of every process on the host pays for this lookup. The loader sizes it to
/// `kernel.pid_max` (2 bytes per possible pid).
#[map]
static TARGET_FILTER: Array<u16> = Array::with_max_entries(TARGET_ENTRIES, 0);

/// comm → service id (or `SERVICE_NONE`), for exec decisions that depend on the name alone.
#[map]
static COMM_SERVICES: HashMap<Comm, u32> = HashMap::with_max_entries(COMM_ENTRIES, 0);

/// Execs the kernel could not decide; rare, so streamed rather than aggregated.
#[map]
static EXEC_EVENTS: RingBuf = RingBuf::with_byte_size(EXEC_RINGBUF_BYTES, 0);

/// Per-CPU drop counters indexed by `DropReason`.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DropReason::COUNT, 0);

/// Non-zero when the agent observes the whole host: unknown processes count as `other`.
#[unsafe(no_mangle)]
static HOST_MODE: u32 = 0;

/// Tracepoint field offsets, read by the agent from tracefs at start-up.
#[unsafe(no_mangle)]
static TP_OFFSETS: TracepointOffsets = TracepointOffsets::FALLBACK;

#[inline(always)]
fn host_mode() -> bool {
    // SAFETY: a plain read of a global the loader may have rewritten; volatile so the compiler
    // does not fold in the compile-time value.
    unsafe { core::ptr::read_volatile(&HOST_MODE) != 0 }
}

#[inline(always)]
fn offsets() -> TracepointOffsets {
    // SAFETY: as in `host_mode`.
    unsafe { core::ptr::read_volatile(&TP_OFFSETS) }
}

/// Service of a process, or `None` when it is not targeted. The one lookup every collector does
/// first.
#[inline(always)]
pub fn service_of(tgid: u32) -> Option<u32> {
    match TARGET_FILTER.get(tgid) {
        Some(&slot) if slot != 0 => Some(u32::from(slot) - 1),
        _ if host_mode() => Some(SERVICE_OTHER),
        _ => None,
    }
}

/// Records `tgid` as targeted by `service` in both maps.
#[inline(always)]
fn target(tgid: u32, service: u32) {
    if TARGETS.insert(tgid, service, 0).is_err() {
        count_drop(DropReason::TargetsFull);
        return;
    }
    if let Some(slot) = TARGET_FILTER.get_ptr_mut(tgid) {
        // SAFETY: a u16 array element; service ids fit (the agent caps them below u16::MAX).
        unsafe { *slot = (service + 1) as u16 };
    }
}

/// Removes `tgid` from both maps.
#[inline(always)]
fn untarget(tgid: u32) {
    let _ = TARGETS.remove(tgid);
    if let Some(slot) = TARGET_FILTER.get_ptr_mut(tgid) {
        // SAFETY: a u16 array element.
        unsafe { *slot = 0 };
    }
}

/// Counts a dropped event.
#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(counter) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU value of this CPU; programs do not migrate while they run.
        unsafe { *counter += 1 };
    }
}

pub fn try_task_newtask(ctx: &TracePointContext) -> Result<u32, i32> {
    let off = offsets();
    // SAFETY: the offset was read from this tracepoint's format file.
    let flags: u64 = unsafe { ctx.read_at(off.newtask_clone_flags as usize)? };
    if flags & CLONE_THREAD != 0 {
        // A new thread shares its process's entry.
        return Ok(0);
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(service) = TARGETS.get_ptr(parent) else {
        return Ok(0);
    };
    // SAFETY: pointer from a successful lookup.
    let service = unsafe { *service };
    // SAFETY: the offset was read from this tracepoint's format file.
    let child: i32 = unsafe { ctx.read_at(off.newtask_pid as usize)? };
    target(child as u32, service);
    crate::sched::count_event(service, ProcEvent::Start);
    Ok(0)
}

pub fn try_sched_process_exec(_ctx: &TracePointContext) -> Result<u32, i32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let comm = bpf_get_current_comm()?;
    if let Some(decision) = COMM_SERVICES.get_ptr(comm) {
        // SAFETY: pointer from a successful lookup.
        let decision = unsafe { *decision };
        if decision == SERVICE_NONE {
            untarget(tgid);
        } else {
            // An exec that moves a process into a service starts one of its processes.
            // SAFETY: pointer from a successful lookup.
            if TARGETS.get_ptr(tgid).map(|s| unsafe { *s }) != Some(decision) {
                crate::sched::count_event(decision, ProcEvent::Start);
            }
            target(tgid, decision);
        }
        return Ok(0);
    }
    let prev_service = match TARGETS.get_ptr(tgid) {
        // SAFETY: pointer from a successful lookup.
        Some(service) => unsafe { *service },
        None => SERVICE_NONE,
    };
    match EXEC_EVENTS.reserve::<ExecEvent>(0) {
        Some(mut entry) => {
            entry.write(ExecEvent {
                tgid,
                prev_service,
                comm,
            });
            entry.submit(0);
        }
        None => count_drop(DropReason::ExecRingFull),
    }
    Ok(0)
}

pub fn try_sched_process_exit(ctx: &TracePointContext) -> Result<u32, i32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    let off = offsets();
    let group_dead = if off.exit_group_dead == u32::MAX {
        tid == tgid
    } else {
        // SAFETY: the offset was read from this tracepoint's format file.
        let dead: u8 = unsafe { ctx.read_at(off.exit_group_dead as usize)? };
        dead != 0
    };
    if group_dead {
        if let Some(service) = service_of(tgid) {
            crate::sched::group_exit(tgid, service);
        }
        untarget(tgid);
    }
    Ok(0)
}
