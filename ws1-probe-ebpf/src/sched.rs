//! The scheduler probe: process lifecycle (starts, exits by reason, crashes) and run-queue
//! latency.
//!
//! Run-queue latency is the time a thread of a targeted process is runnable but not running,
//! as BCC's runqlat measures it: from its wakeup (`sched_wakeup`, `sched_wakeup_new`) or its
//! preemption (`sched_switch` whose `prev` stays runnable) to the `sched_switch` that puts it
//! on a CPU. The `tp_btf` programs get `struct task_struct` pointers the verifier trusts, so
//! the enqueue time lives in the task's own local storage (`RUNQ_START`): the kernel frees it
//! with the task (no map to size by thread count, nothing leaks when a thread exits while
//! waiting), and only tasks of targeted processes ever get an entry. The switch-in, which runs
//! for every context switch of the machine, first loads `next->bpf_storage` and returns when it
//! is empty, so an unobserved task costs that one load.
//!
//! Lifecycle counters are bumped by the targeting hooks (`targets.rs`), which already decide
//! when a thread group starts and dies; this module holds the maps and the O(1) updates.

use core::{ffi::c_void, ptr::null_mut};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE, bpf_map_type},
    helpers::{
        bpf_get_current_comm, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::bpf_task_storage_get,
    },
    macros::{btf_map, map},
    maps::{HashMap, LruHashMap, PerCpuHashMap, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use ws1_probe_common::{
    hist::{DEFAULT_EXPORT_BOUNDS_NS, EXPORT_BOUND_SLOTS, LatencyHist, pad_bounds},
    sched::{
        CRASH_RINGBUF_BYTES, CrashEvent, PROC_EVENT_ENTRIES, ProcEvent, ProcKey, RUNQ_HIST_ENTRIES,
        RUNQ_TID_ENTRIES, RunqSeen, RunqStart, SchedSettings, exit_event,
    },
    targets::DropReason,
};

use crate::{
    hist,
    targets::{count_drop, service_of},
};

/// A task-local storage map definition in the BTF layout the loader reads (aya-ebpf 0.2.1 has
/// socket, inode and cgroup storage but not task storage; this is its `btf_map_def!` layout).
#[repr(C)]
pub struct TaskStorage<T> {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: the fields are placeholders the loader patches; never dereferenced from Rust.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> TaskStorage<T> {
    pub const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }

    #[inline(always)]
    fn as_ptr(&self) -> *mut c_void {
        core::ptr::from_ref(self).cast_mut().cast()
    }
}

/// When each runnable thread of a targeted process became runnable (see the module comment).
#[btf_map]
static RUNQ_START: TaskStorage<RunqStart> = TaskStorage::new();

/// The kernel's run-queue delay and arrival count of each observed thread when it last left a
/// CPU (see `try_switch_info`).
#[btf_map]
static RUNQ_SEEN: TaskStorage<RunqSeen> = TaskStorage::new();

/// Thread id → when it became runnable: `RUNQ_START` for the raw tracepoint fallback, whose
/// task pointers are plain numbers the storage helper does not accept.
#[map]
static RUNQ_START_TID: LruHashMap<u32, RunqStart> =
    LruHashMap::with_max_entries(RUNQ_TID_ENTRIES, 0);

/// Service id → run-queue latency histogram, shared by all CPUs (see hist.rs).
#[map]
static RUNQ_HIST: HashMap<u32, LatencyHist> = HashMap::with_max_entries(RUNQ_HIST_ENTRIES, 0);

/// (service, start or exit reason) → count, per CPU. Starts and exits are rare; a per-CPU
/// counter needs no atomic and no pre-created entry.
#[map]
static PROC_EVENTS: PerCpuHashMap<ProcKey, u64> =
    PerCpuHashMap::with_max_entries(PROC_EVENT_ENTRIES, 0);

/// Processes of a service killed by a signal, for the agent's crash log line.
#[map]
static CRASH_EVENTS: RingBuf = RingBuf::with_byte_size(CRASH_RINGBUF_BYTES, 0);

/// Prometheus `le` bounds in nanoseconds (the syscall bounds); the agent may override them.
#[unsafe(no_mangle)]
static RUNQ_BOUNDS_NS: [u64; EXPORT_BOUND_SLOTS] = pad_bounds(&DEFAULT_EXPORT_BOUNDS_NS);

/// `task_struct` offsets from BTF; rewritten by the loader.
#[unsafe(no_mangle)]
static SCHED_SETTINGS: SchedSettings = SchedSettings::UNKNOWN;

#[inline(always)]
fn settings() -> SchedSettings {
    // SAFETY: a plain read of a loader-set global; volatile so the compile-time value is not
    // folded in.
    unsafe { core::ptr::read_volatile(&SCHED_SETTINGS) }
}

#[inline(always)]
fn bounds() -> &'static [u64; EXPORT_BOUND_SLOTS] {
    // SAFETY: a reference to a global the loader may have rewritten; read through `observe`.
    unsafe { &*core::ptr::addr_of!(RUNQ_BOUNDS_NS) }
}

/// Counts one start or exit of a process of `service`.
#[inline(always)]
pub fn count_event(service: u32, event: ProcEvent) {
    let key = ProcKey {
        service,
        event: event as u32,
    };
    match PROC_EVENTS.get_ptr_mut(&key) {
        // SAFETY: this CPU's value; programs do not migrate while they run.
        Some(n) => unsafe { *n += 1 },
        None => {
            if PROC_EVENTS.insert(&key, &1, 0).is_err() {
                count_drop(DropReason::SchedMapFull);
            }
        }
    }
}

/// The death of a targeted thread group (the current task is its last thread): counts the
/// exit by reason and streams a crash event when a signal killed it.
#[inline(always)]
pub fn group_exit(tgid: u32, service: u32) {
    let off = settings().task_exit_code;
    if off == u32::MAX {
        return;
    }
    // SAFETY: the current task pointer is valid while its program runs.
    let task = unsafe { bpf_get_current_task() };
    let at = task.wrapping_add(u64::from(off)) as *const i32;
    // SAFETY: bpf_probe_read_kernel checks the address; the offset is the BTF offset of
    // `task_struct.exit_code`, which do_exit sets before this tracepoint fires.
    let Ok(code) = (unsafe { bpf_probe_read_kernel(at) }) else {
        return;
    };
    let code = code as u32;
    let event = exit_event(code);
    count_event(service, event);
    if event != ProcEvent::ExitSignal {
        return;
    }
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    match CRASH_EVENTS.reserve::<CrashEvent>(0) {
        Some(mut entry) => {
            entry.write(CrashEvent {
                tgid,
                service,
                code,
                _pad: 0,
                comm,
            });
            entry.submit(0);
        }
        None => count_drop(DropReason::SchedMapFull),
    }
}

/// The process of `task`, read at its BTF offset with a plain load.
#[inline(always)]
fn tgid_of(task: *const u8, off: u32) -> u32 {
    // SAFETY: `task` is a `tp_btf` argument, a `struct task_struct *` the verifier trusts; the
    // offset comes from the kernel's BTF and the verifier checks the load against the struct
    // (a faulting load reads 0).
    unsafe { *task.add(off as usize).cast::<i32>() as u32 }
}

/// Records that `task` became runnable now, when its process is targeted.
#[inline(always)]
fn enqueue(task: *mut c_void, s: &SchedSettings) {
    if s.task_tgid == u32::MAX {
        return;
    }
    let tgid = tgid_of(task.cast(), s.task_tgid);
    // The idle tasks (pid 0, one per CPU) are always runnable and run only when nothing else
    // is: their "waits" are not latency (host mode would count them as `other`).
    if tgid == 0 {
        return;
    }
    let Some(service) = service_of(tgid) else {
        return;
    };
    let flags = u64::from(BPF_LOCAL_STORAGE_GET_F_CREATE);
    // SAFETY: `task` is a trusted task pointer from the tracepoint's arguments; the map is a
    // task storage map with `RunqStart` values.
    let start =
        unsafe { bpf_task_storage_get(RUNQ_START.as_ptr(), task.cast(), null_mut(), flags) }
            .cast::<RunqStart>();
    if start.is_null() {
        // Out of memory, or the helper refused a nested run on this CPU.
        return;
    }
    // SAFETY: non-null storage of this task, valid while the program runs. Only the scheduler
    // hooks of this task's run queue write it.
    unsafe {
        (*start).ts_ns = bpf_ktime_get_ns();
        (*start).service = service;
    }
}

/// `sched_wakeup` and `sched_wakeup_new` (argument: the woken task). The current task is the
/// waker, so the filter reads the wakee's tgid.
pub fn try_wakeup(ctx: &BtfTracePointContext) -> Result<u32, i64> {
    let task: *mut c_void = ctx.arg(0);
    enqueue(task, &settings());
    Ok(0)
}

/// `sched_switch` (arguments: `bool preempt, struct task_struct *prev, struct task_struct
/// *next, unsigned int prev_state`): a preempted `prev` starts waiting; `next` stops.
pub fn try_switch(ctx: &BtfTracePointContext) -> Result<u32, i64> {
    let s = settings();
    let preempt: u64 = ctx.arg(0);
    let prev_state: u64 = ctx.arg(3);
    // Still runnable: preempted (it stays on the run queue whatever its state says), or it
    // gave up the CPU without blocking (sched_yield).
    if preempt & 0xff != 0 || prev_state as u32 == 0 {
        let prev: *mut c_void = ctx.arg(1);
        enqueue(prev, &s);
    }
    let next: *mut c_void = ctx.arg(2);
    if s.task_bpf_storage != u32::MAX {
        // SAFETY: as in `tgid_of`; the pointer is only compared with NULL.
        let storage = unsafe {
            *next
                .cast::<u8>()
                .add(s.task_bpf_storage as usize)
                .cast::<u64>()
        };
        if storage == 0 {
            return Ok(0);
        }
    }
    // SAFETY: a trusted task pointer; no creation.
    let start = unsafe { bpf_task_storage_get(RUNQ_START.as_ptr(), next.cast(), null_mut(), 0) }
        .cast::<RunqStart>();
    if start.is_null() {
        return Ok(0);
    }
    switched_in(start);
    Ok(0)
}

/// `sched_switch` reading the kernel's own run-queue accounting (`CONFIG_SCHED_INFO`), the
/// default: no clock read and no wakeup hook.
///
/// The scheduler accounts every wait itself: `sched_info_enqueue` notes when a task is queued
/// (at wakeup, and when a preempted task stays runnable), and at the switch-in
/// `sched_info_arrive` adds the wait to `sched_info.run_delay` and counts the arrival in
/// `pcount`. So when `prev` leaves the CPU, `run_delay` already holds the wait that preceded
/// the run now ending; the program keeps the last values it saw in the thread's local storage
/// (`RUNQ_SEEN`) and records the difference: exactly one wait per run, reported when the run
/// ends. The current task is `prev`, so only one task is looked at per context switch, and an
/// unobserved one costs a load and an array lookup. A thread seen for the first time is
/// recorded only when it has run once (`pcount == 1`: its whole `run_delay` is its first wait);
/// otherwise the values are the baseline for its next run.
pub fn try_switch_info(ctx: &BtfTracePointContext) -> Result<u32, i64> {
    let s = settings();
    let prev: *mut c_void = ctx.arg(1);
    let tgid = tgid_of(prev.cast(), s.task_tgid);
    // The idle tasks have no `sched_info` accounting and are not latency.
    if tgid == 0 {
        return Ok(0);
    }
    let Some(service) = service_of(tgid) else {
        return Ok(0);
    };
    // SAFETY: as in `tgid_of`: BTF offsets into the trusted task, checked by the verifier.
    let (delay, count) = unsafe {
        let base = prev.cast::<u8>();
        (
            *base.add(s.task_run_delay as usize).cast::<u64>(),
            *base.add(s.task_pcount as usize).cast::<u64>(),
        )
    };
    let flags = u64::from(BPF_LOCAL_STORAGE_GET_F_CREATE);
    // SAFETY: a trusted task pointer; the map is a task storage map with `RunqSeen` values.
    let seen = unsafe { bpf_task_storage_get(RUNQ_SEEN.as_ptr(), prev.cast(), null_mut(), flags) }
        .cast::<RunqSeen>();
    if seen.is_null() {
        return Ok(0);
    }
    // SAFETY: non-null storage of the current task, which only this CPU's switches touch.
    let last = unsafe { *seen };
    // SAFETY: as above.
    unsafe {
        (*seen).run_delay = delay;
        (*seen).pcount = count;
    }
    let wait = if last.pcount == 0 && count == 1 {
        delay
    } else if last.pcount != 0 && count == last.pcount.wrapping_add(1) {
        delay.wrapping_sub(last.run_delay)
    } else {
        // A first sight after several runs, or arrivals not seen (the process was not
        // observed then): nothing to attribute to one run.
        return Ok(0);
    };
    observe(service, wait);
    Ok(0)
}

#[inline(always)]
fn observe(service: u32, wait: u64) {
    match hist::get_or_create(&RUNQ_HIST, &service) {
        Some(h) => hist::observe(h, bounds(), wait),
        None => count_drop(DropReason::SchedMapFull),
    }
}

/// A waiting thread got the CPU: its wait since `start` goes into its service's histogram.
#[inline(always)]
fn switched_in(start: *mut RunqStart) {
    // SAFETY: `start` is the thread's storage or map value, valid while the program runs.
    let (ts, service) = unsafe { ((*start).ts_ns, (*start).service) };
    if ts == 0 {
        return;
    }
    // SAFETY: as above.
    unsafe { (*start).ts_ns = 0 };
    // SAFETY: no preconditions.
    let wait = unsafe { bpf_ktime_get_ns() }.saturating_sub(ts);
    observe(service, wait);
}

/// A `u32` member of the task at `task` (a kernel address), read with `bpf_probe_read_kernel`.
#[inline(always)]
fn task_u32(task: u64, off: u32) -> Option<u32> {
    if off == u32::MAX {
        return None;
    }
    let at = task.wrapping_add(u64::from(off)) as *const u32;
    // SAFETY: bpf_probe_read_kernel checks the address; the offset comes from BTF.
    unsafe { bpf_probe_read_kernel(at) }.ok()
}

/// The raw tracepoints' `enqueue`: the enqueue time goes into `RUNQ_START_TID`.
#[inline(always)]
fn enqueue_raw(task: u64, s: &SchedSettings) -> Option<()> {
    let tgid = task_u32(task, s.task_tgid)?;
    if tgid == 0 {
        return None;
    }
    let service = service_of(tgid)?;
    let tid = task_u32(task, s.task_pid)?;
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match RUNQ_START_TID.get_ptr_mut(&tid) {
        // SAFETY: the map value of this thread; only the scheduler hooks of its run queue
        // write it.
        Some(start) => unsafe {
            (*start).ts_ns = now;
            (*start).service = service;
        },
        None => {
            let start = RunqStart {
                ts_ns: now,
                service,
                _pad: 0,
            };
            // An LRU map makes room by evicting; it does not fail for want of space.
            let _ = RUNQ_START_TID.insert(&tid, &start, 0);
        }
    }
    Some(())
}

/// Raw `sched_wakeup`/`sched_wakeup_new` (argument: the woken task's address).
pub fn try_wakeup_raw(ctx: &RawTracePointContext) -> Result<u32, i64> {
    let task: u64 = ctx.arg(0);
    let _ = enqueue_raw(task, &settings());
    Ok(0)
}

/// Raw `sched_switch` (the `tp_btf` arguments as numbers): the same as [`try_switch`] with the
/// enqueue times in `RUNQ_START_TID`. The switch-in is filtered by the process first (an array
/// lookup), so unobserved threads cost one read and no hash lookup.
pub fn try_switch_raw(ctx: &RawTracePointContext) -> Result<u32, i64> {
    let s = settings();
    let preempt: u64 = ctx.arg(0);
    let prev_state: u64 = ctx.arg(3);
    if preempt & 0xff != 0 || prev_state as u32 == 0 {
        let _ = enqueue_raw(ctx.arg(1), &s);
    }
    let next: u64 = ctx.arg(2);
    let Some(tgid) = task_u32(next, s.task_tgid) else {
        return Ok(0);
    };
    if tgid == 0 || service_of(tgid).is_none() {
        return Ok(0);
    }
    let Some(tid) = task_u32(next, s.task_pid) else {
        return Ok(0);
    };
    if let Some(start) = RUNQ_START_TID.get_ptr_mut(&tid) {
        switched_in(start);
    }
    Ok(0)
}
