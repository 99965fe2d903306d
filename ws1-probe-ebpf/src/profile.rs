//! The profiler's kernel part: on-CPU samples from a perf software cpu-clock event and off-CPU
//! time from `sched:sched_switch`, counted in the kernel by (process, user stack, kernel stack).
//!
//! Processes whose binaries lack frame pointers ("DWARF mode", chosen by the agent per process
//! in `PROFILE_DWARF`) cannot have their user stacks walked here; for those each sample carries
//! the user registers and a copy of the top of the user stack through `PROFILE_SAMPLES`, and the
//! agent unwinds it from `.eh_frame`. That stream is ~100 samples per second per CPU at most.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST, pt_regs},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, generated},
    macros::map,
    maps::{HashMap, LruHashMap, RingBuf, StackTrace},
    programs::{
        PerfEventContext, RawTracePointContext, TracePointContext, tracing::StackIdContext,
    },
};
use ws1_probe_common::{
    profile::{
        DWARF_PIDS, LEAF_PIDS, LEAF_RANGES, LEAF_SLOTS, LeafText, OFFCPU_THREADS, OffCpuPending,
        OffCpuStart, OffCpuValue, PROFILE_ENTRIES, PROFILE_STACK_ENTRIES, ProfileKey,
        ProfileSettings, SAMPLE_CPU, SAMPLE_OFFCPU, SAMPLE_RINGBUF_BYTES, STACK_COPY_BYTES,
        StackSampleEvent, leaf_ret_of,
    },
    targets::DropReason,
};

use crate::{
    hist::atomic_add,
    targets::{count_drop, service_of},
};

/// (process, user stack, kernel stack) → on-CPU samples.
#[map]
static PROFILE_COUNTS: HashMap<ProfileKey, u64> = HashMap::with_max_entries(PROFILE_ENTRIES, 0);

/// (process, user stack, kernel stack) → blocked time.
#[map]
static OFFCPU_TIME: HashMap<ProfileKey, OffCpuValue> =
    HashMap::with_max_entries(PROFILE_ENTRIES, 0);

/// User and kernel stacks of samples and blocks.
#[map]
static PROFILE_STACKS: StackTrace = StackTrace::with_max_entries(PROFILE_STACK_ENTRIES, 0);

/// Processes (tgid → 1) whose user stacks are copied for DWARF unwinding.
#[map]
static PROFILE_DWARF: HashMap<u32, u32> = HashMap::with_max_entries(DWARF_PIDS, 0);

/// Frame-pointer-mode processes (tgid → text ranges) whose samples record the first of the
/// words at the user stack pointer that is an address in those ranges: the return address of a
/// leaf function that set up no frame (it may have pushed registers), which the frame-pointer
/// walk skips. Userspace decides from the call frame information at the sampled ip whether it
/// is one (`ws1-probe/src/profile/leaf.rs`).
#[map]
static PROFILE_LEAF: HashMap<u32, LeafText> = HashMap::with_max_entries(LEAF_PIDS, 0);

/// Samples of DWARF-mode processes: registers and the top of the user stack.
#[map]
static PROFILE_SAMPLES: RingBuf = RingBuf::with_byte_size(SAMPLE_RINGBUF_BYTES, 0);

/// Thread id → when and where it left the CPU. LRU, so threads that exit while off the CPU do
/// not leak entries.
#[map]
static OFFCPU_START: LruHashMap<u32, OffCpuStart> = LruHashMap::with_max_entries(OFFCPU_THREADS, 0);

/// Thread id → a long block of a DWARF-mode thread waiting for its user stack (copied at the
/// thread's next syscall exit).
#[map]
static OFFCPU_PENDING: LruHashMap<u32, OffCpuPending> =
    LruHashMap::with_max_entries(OFFCPU_THREADS, 0);

/// Threshold and `sched_switch` field offsets; rewritten by the loader.
#[unsafe(no_mangle)]
static PROFILE_SETTINGS: ProfileSettings = ProfileSettings::FALLBACK;

#[inline(always)]
fn settings() -> ProfileSettings {
    // SAFETY: a plain read of a global the loader may have rewritten; volatile so the compiler
    // does not fold in the compile-time value.
    unsafe { core::ptr::read_volatile(&PROFILE_SETTINGS) }
}

#[inline(always)]
fn dwarf_mode(tgid: u32) -> bool {
    // SAFETY: a read-only lookup; the value is not used.
    unsafe { PROFILE_DWARF.get(&tgid).is_some() }
}

/// User registers the unwinder starts from.
struct UserRegs {
    ip: u64,
    sp: u64,
    bp: u64,
}

/// `pt_regs.cs` privilege level of user mode.
const USER_RPL: u64 = 3;

/// The user registers of the sampled thread: the interrupted registers when the sample hit
/// user mode, else those the kernel saved on entry (from `bpf_task_pt_regs`).
#[inline(always)]
fn perf_user_regs(ctx: &PerfEventContext) -> Option<UserRegs> {
    // SAFETY: `ctx.ctx` is the bpf_perf_event_data the kernel passed; its `regs` are readable.
    let regs = unsafe { &(*ctx.ctx).regs };
    if regs.cs & 3 == USER_RPL {
        return Some(UserRegs {
            ip: regs.rip,
            sp: regs.rsp,
            bp: regs.rbp,
        });
    }
    // SAFETY: helpers available to perf_event programs; the task pointer is the current task.
    let saved = unsafe {
        generated::bpf_task_pt_regs(generated::bpf_get_current_task_btf()) as *const pt_regs
    };
    read_regs(saved)
}

/// Reads ip, sp and bp from a kernel `pt_regs` pointer.
#[inline(always)]
fn read_regs(regs: *const pt_regs) -> Option<UserRegs> {
    if regs.is_null() {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address; a bad pointer gives an error.
    unsafe {
        Some(UserRegs {
            ip: bpf_probe_read_kernel(&(*regs).rip).ok()?,
            sp: bpf_probe_read_kernel(&(*regs).rsp).ok()?,
            bp: bpf_probe_read_kernel(&(*regs).rbp).ok()?,
        })
    }
}

#[inline(always)]
fn stack_id<C: StackIdContext>(ctx: &C, flags: u32) -> i32 {
    ctx.get_stackid(&PROFILE_STACKS, u64::from(flags))
        .map_or(-1, |id| id as i32)
}

/// Adds `n` to a shared counter, inserting it first.
#[inline(always)]
fn add_sample(key: &ProfileKey) {
    let count = match PROFILE_COUNTS.get_ptr_mut(key) {
        Some(count) => count,
        None => {
            let _ = PROFILE_COUNTS.insert(key, &0, u64::from(BPF_NOEXIST));
            match PROFILE_COUNTS.get_ptr_mut(key) {
                Some(count) => count,
                None => {
                    count_drop(DropReason::ProfileCountsFull);
                    return;
                }
            }
        }
    };
    // SAFETY: a map value shared by all CPUs, only updated with atomic adds.
    atomic_add(unsafe { &mut *count }, 1);
}

/// Adds a block of `ns` to `OFFCPU_TIME`.
#[inline(always)]
fn add_offcpu(key: &ProfileKey, ns: u64) {
    let value = match OFFCPU_TIME.get_ptr_mut(key) {
        Some(v) => v,
        None => {
            let _ = OFFCPU_TIME.insert(key, &OffCpuValue::default(), u64::from(BPF_NOEXIST));
            match OFFCPU_TIME.get_ptr_mut(key) {
                Some(v) => v,
                None => {
                    count_drop(DropReason::ProfileCountsFull);
                    return;
                }
            }
        }
    };
    // SAFETY: a map value shared by all CPUs, only updated with atomic adds.
    unsafe {
        atomic_add(&mut (*value).ns, ns);
        atomic_add(&mut (*value).count, 1);
    }
}

/// Copies the top of the user stack, as much of `STACK_COPY_BYTES` as the stack mapping holds
/// (a read that crosses its end fails as a whole, so shorter copies are tried). Returns the
/// bytes copied.
#[inline(always)]
fn copy_stack(buf: &mut [u8; STACK_COPY_BYTES], sp: u64) -> u32 {
    let mut size = STACK_COPY_BYTES as u32;
    // Bounded: 16 KiB, 8, 4, 2, 1 KiB, 512 bytes.
    for _ in 0..6 {
        // SAFETY: `buf` has room for `size` ≤ STACK_COPY_BYTES bytes; the helper checks `sp`.
        let ret = unsafe {
            generated::bpf_probe_read_user(
                buf.as_mut_ptr() as *mut c_void,
                size,
                sp as *const c_void,
            )
        };
        if ret == 0 {
            return size;
        }
        size /= 2;
    }
    0
}

/// Streams one DWARF-mode sample. Returns false when the ring buffer is full.
#[inline(always)]
fn emit_sample(key: &ProfileKey, kind: u32, value_ns: u64, regs: &UserRegs) -> bool {
    let Some(mut entry) = PROFILE_SAMPLES.reserve::<StackSampleEvent>(0) else {
        count_drop(DropReason::ProfileRingFull);
        return false;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved record of the right size; every field is written
    // before it is submitted (the stack bytes past `len` are not read by the agent).
    unsafe {
        (*ev).tgid = key.tgid;
        (*ev).service = key.service;
        (*ev).kernel_stack = key.kernel_stack;
        (*ev).kind = kind;
        (*ev).value_ns = value_ns;
        (*ev).ip = regs.ip;
        (*ev).sp = regs.sp;
        (*ev).bp = regs.bp;
        (*ev).python_stack = key.python_stack;
        (*ev).len = copy_stack(&mut (*ev).stack, regs.sp);
    }
    entry.submit(0);
    true
}

/// The text ranges of a `PROFILE_LEAF` process.
#[inline(always)]
fn leaf_text(tgid: u32) -> Option<LeafText> {
    // SAFETY: a read-only lookup; the value is copied out.
    unsafe { PROFILE_LEAF.get(&tgid) }.copied()
}

/// The first of the [`LEAF_SLOTS`] words at the user stack pointer `sp` that is an address in
/// one of `text`'s ranges, with its slot ([`leaf_ret_of`]), else 0. With the lookup in
/// [`leaf_text`], O(1): one 32-byte user read (one 8-byte read when the stack ends sooner),
/// sixteen range checks. Only addresses into code go into the key, so a sample in a function
/// with a frame (where the words are data) adds no key; what does get in is bounded by the call
/// sites in the text times the slots, and userspace keeps it only where the sampled ip's CFI
/// says the return address is at that slot. Measured over 4 s: 2 distinct words for each C
/// program with two hot frameless leaves (pushing or not), 4 for the Go one (see
/// ARCHITECTURE.md).
#[inline(always)]
fn word_in_text(text: &LeafText, sp: u64) -> u64 {
    // SAFETY: bpf_probe_read_user checks the address; a bad one gives an error.
    let words =
        match unsafe { aya_ebpf::helpers::bpf_probe_read_user(sp as *const [u64; LEAF_SLOTS]) } {
            Ok(words) => words,
            // SAFETY: as above.
            Err(_) => match unsafe { aya_ebpf::helpers::bpf_probe_read_user(sp as *const u64) } {
                Ok(word) => {
                    let mut words = [0u64; LEAF_SLOTS];
                    words[0] = word;
                    words
                }
                Err(_) => return 0,
            },
        };
    let mut slot = 0;
    while slot < LEAF_SLOTS {
        let word = words[slot];
        let mut i = 0;
        while i < LEAF_RANGES {
            let [start, end] = text.ranges[i];
            if start <= word && word < end {
                return leaf_ret_of(word, slot);
            }
            i += 1;
        }
        slot += 1;
    }
    0
}

/// [`word_in_text`] for a cpu-clock sample.
#[inline(always)]
fn leaf_return(ctx: &PerfEventContext, tgid: u32) -> u64 {
    let Some(text) = leaf_text(tgid) else {
        return 0;
    };
    perf_user_regs(ctx).map_or(0, |regs| word_in_text(&text, regs.sp))
}

/// [`word_in_text`] for the current task leaving the CPU: its user registers are those the
/// kernel saved on entry (a frameless leaf that made a system call, such as Go's
/// `runtime.futex`).
#[inline(always)]
fn current_leaf_return(tgid: u32) -> u64 {
    let Some(text) = leaf_text(tgid) else {
        return 0;
    };
    // SAFETY: helpers available to tracing programs; the task pointer is the current task.
    let saved = unsafe {
        generated::bpf_task_pt_regs(generated::bpf_get_current_task_btf()) as *const pt_regs
    };
    read_regs(saved).map_or(0, |regs| word_in_text(&text, regs.sp))
}

/// One cpu-clock sample.
pub fn try_cpu_sample(ctx: &PerfEventContext) -> Result<u32, i32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // tgid 0 is the idle task.
    if tgid == 0 {
        return Ok(0);
    }
    let Some(service) = service_of(tgid) else {
        return Ok(0);
    };
    let mut key = ProfileKey {
        tgid,
        service,
        user_stack: -1,
        kernel_stack: stack_id(ctx, 0),
        leaf_ret: 0,
        python_stack: crate::python::python_stack(tgid, pid_tgid as u32),
        _pad: 0,
    };
    if dwarf_mode(tgid) {
        if let Some(regs) = perf_user_regs(ctx) {
            emit_sample(&key, SAMPLE_CPU, 0, &regs);
            return Ok(0);
        }
    }
    key.user_stack = stack_id(ctx, BPF_F_USER_STACK);
    key.leaf_ret = leaf_return(ctx, tgid);
    add_sample(&key);
    Ok(0)
}

/// `sched:sched_switch`, run by the task leaving the CPU (`prev` is the current task).
pub fn try_sched_switch(ctx: &TracePointContext) -> Result<u32, i32> {
    let s = settings();
    // SAFETY: offsets from the tracepoint's format file, read with bounds checks.
    let next_pid: u32 = unsafe { ctx.read_at(s.switch_next_pid as usize)? };
    switch(ctx, &s, next_pid, || {
        // SAFETY: as above.
        unsafe { ctx.read_at::<i64>(s.switch_prev_state as usize) }
            .map(|st| st != 0)
            .map_err(i64::from)
    })
}

/// Raw `sched_switch` (arguments: `bool preempt, struct task_struct *prev, struct task_struct
/// *next, unsigned int prev_state`, Linux 5.18+): the same without the tracepoint's record,
/// which the kernel would otherwise fill (two command names among others) on every context
/// switch of the machine.
pub fn try_sched_switch_raw(ctx: &RawTracePointContext) -> Result<u32, i32> {
    let s = settings();
    let next: u64 = ctx.arg(2);
    let at = next.wrapping_add(u64::from(s.task_pid)) as *const i32;
    // SAFETY: bpf_probe_read_kernel checks the address; `task_pid` is the BTF offset of `pid`.
    let next_pid = unsafe { bpf_probe_read_kernel(at) }.map_err(|e| e as i32)? as u32;
    let preempt: u64 = ctx.arg(0);
    let prev_state: u64 = ctx.arg(3);
    switch(ctx, &s, next_pid, || {
        Ok(preempt & 0xff == 0 && prev_state as u32 != 0)
    })
}

/// Both ends of a context switch: the current task leaves (recorded when targeted) and the
/// task `next_pid` comes back (its block is counted). `voluntary` says whether the leaving
/// task blocked rather than being preempted.
#[inline(always)]
fn switch<C: StackIdContext>(
    ctx: &C,
    s: &ProfileSettings,
    next_pid: u32,
    voluntary: impl Fn() -> Result<bool, i64>,
) -> Result<u32, i32> {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid != 0 {
        if let Some(service) = service_of(tgid) {
            let prev_pid = pid_tgid as u32;
            let voluntary = voluntary().map_err(|e| e as i32)?;
            // A long block whose stack never got its syscall exit (it blocked outside a
            // syscall, e.g. on a page fault): count it with the frame-pointer stack.
            // SAFETY: the value is copied out before the entry is removed.
            if let Some(p) = unsafe { OFFCPU_PENDING.get(&prev_pid) }.copied() {
                let _ = OFFCPU_PENDING.remove(&prev_pid);
                add_offcpu(&p.key, p.ns);
            }
            let start = OffCpuStart {
                ts_ns: now,
                key: ProfileKey {
                    tgid,
                    service,
                    user_stack: stack_id(ctx, BPF_F_USER_STACK),
                    kernel_stack: stack_id(ctx, 0),
                    leaf_ret: current_leaf_return(tgid),
                    python_stack: crate::python::python_stack(tgid, prev_pid),
                    _pad: 0,
                },
                voluntary: u32::from(voluntary),
                _pad: 0,
            };
            if OFFCPU_START.insert(&prev_pid, &start, 0).is_err() {
                count_drop(DropReason::OffCpuStartFull);
            }
        }
    }
    // SAFETY: the value is copied out before the entry is removed.
    let Some(start) = (unsafe { OFFCPU_START.get(&next_pid) }).copied() else {
        return Ok(0);
    };
    let _ = OFFCPU_START.remove(&next_pid);
    let ns = now.saturating_sub(start.ts_ns);
    if ns < s.offcpu_min_ns {
        return Ok(0);
    }
    if start.voluntary != 0 && dwarf_mode(start.key.tgid) {
        let pending = OffCpuPending { ns, key: start.key };
        if OFFCPU_PENDING.insert(&next_pid, &pending, 0).is_ok() {
            return Ok(0);
        }
    }
    add_offcpu(&start.key, ns);
    Ok(0)
}

/// Syscall exit of a thread with a pending long block (DWARF mode): its user registers and
/// stack are those of the call that blocked, so this is where the stack is copied.
pub fn try_offcpu_sys_exit(ctx: &RawTracePointContext) -> Result<u32, i32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == 0 || service_of(tgid).is_none() {
        return Ok(0);
    }
    let tid = pid_tgid as u32;
    // SAFETY: the value is copied out before the entry is removed.
    let Some(p) = (unsafe { OFFCPU_PENDING.get(&tid) }).copied() else {
        return Ok(0);
    };
    let _ = OFFCPU_PENDING.remove(&tid);
    // Raw tracepoint arguments of sys_exit: (struct pt_regs *regs, long ret); `regs` are the
    // user registers saved at syscall entry.
    let regs = read_regs(ctx.arg::<*const pt_regs>(0));
    let sent = match regs {
        Some(regs) => emit_sample(&p.key, SAMPLE_OFFCPU, p.ns, &regs),
        None => false,
    };
    if !sent {
        add_offcpu(&p.key, p.ns);
    }
    Ok(0)
}
