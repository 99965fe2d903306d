//! Kernel programs of ws1-probe. This file holds entry points only: each is a thin wrapper that
//! calls a `try_*` function of its probe module and turns errors into a return value, so kernel
//! code never panics. Maps and logic live in the probe modules.
#![no_std]
#![no_main]
// Histograms are shared by all CPUs and need an atomic add (see hist.rs).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod alloc;
mod block;
mod hist;
mod memory;
mod net;
mod profile;
mod python;
mod sched;
mod syscalls;
mod targets;

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{
        btf_tracepoint, fentry, kprobe, perf_event, raw_tracepoint, tracepoint, uprobe, uretprobe,
    },
    programs::{
        BtfTracePointContext, FEntryContext, PerfEventContext, ProbeContext, RawTracePointContext,
        RetProbeContext, TracePointContext,
    },
};

// --- process targeting ---

#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    targets::try_task_newtask(&ctx).unwrap_or(0)
}

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    targets::try_sched_process_exec(&ctx).unwrap_or(0)
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    // Every exiting thread's in-flight syscall entry goes: exit never returns to sys_exit.
    syscalls::forget_thread(bpf_get_current_pid_tgid() as u32);
    targets::try_sched_process_exit(&ctx).unwrap_or(0)
}

// --- syscall latency ---

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(ctx: RawTracePointContext) -> i32 {
    // Raw tracepoint arguments of sys_enter: (struct pt_regs *regs, long id).
    syscalls::try_sys_enter(ctx.arg::<u64>(1))
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(ctx: RawTracePointContext) -> i32 {
    // Raw tracepoint arguments of sys_exit: (struct pt_regs *regs, long ret).
    syscalls::try_sys_exit(ctx.arg::<i64>(1))
}

// --- network ---

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    net::try_inet_sock_set_state(&ctx).unwrap_or(0)
}

#[tracepoint]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    net::try_sock_length(&ctx, true).unwrap_or(0)
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    net::try_inet_sock_set_state_btf(&ctx, net::StateRun::First).map_or(0, |r| r as i32)
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf_nested(ctx: BtfTracePointContext) -> i32 {
    net::try_inet_sock_set_state_btf(&ctx, net::StateRun::Nested).map_or(0, |r| r as i32)
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length_btf(ctx: BtfTracePointContext) -> i32 {
    net::try_sock_length_btf(&ctx, true).map_or(0, |r| r as i32)
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length_btf(ctx: BtfTracePointContext) -> i32 {
    net::try_sock_length_btf(&ctx, false).map_or(0, |r| r as i32)
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb_btf(ctx: BtfTracePointContext) -> i32 {
    net::try_sock_event_btf(&ctx, net::SockEvent::Retransmit).map_or(0, |r| r as i32)
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset_btf(ctx: BtfTracePointContext) -> i32 {
    net::try_sock_event_btf(&ctx, net::SockEvent::ResetSent).map_or(0, |r| r as i32)
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset_btf(ctx: BtfTracePointContext) -> i32 {
    net::try_sock_event_btf(&ctx, net::SockEvent::ResetReceived).map_or(0, |r| r as i32)
}

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn sock_send_length_raw(ctx: RawTracePointContext) -> i32 {
    net::try_sock_length_raw(&ctx, true).map_or(0, |r| r as i32)
}

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn sock_recv_length_raw(ctx: RawTracePointContext) -> i32 {
    net::try_sock_length_raw(&ctx, false).map_or(0, |r| r as i32)
}

#[tracepoint]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    net::try_sock_length(&ctx, false).unwrap_or(0)
}

#[tracepoint]
pub fn tcp_probe(ctx: TracePointContext) -> u32 {
    net::try_tcp_probe(&ctx).unwrap_or(0)
}

#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    net::try_sock_event(&ctx, net::SockEvent::Retransmit).unwrap_or(0)
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    net::try_sock_event(&ctx, net::SockEvent::ResetSent).unwrap_or(0)
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    net::try_sock_event(&ctx, net::SockEvent::ResetReceived).unwrap_or(0)
}

// --- block I/O latency ---

#[btf_tracepoint(function = "block_io_start")]
pub fn block_io_start_btf(ctx: BtfTracePointContext) -> i32 {
    block::try_io_start_btf(&ctx).map_or(0, |r| r as i32)
}

#[btf_tracepoint(function = "block_rq_complete")]
pub fn block_rq_complete_btf(ctx: BtfTracePointContext) -> i32 {
    block::try_rq_complete_btf(&ctx).map_or(0, |r| r as i32)
}

#[btf_tracepoint(function = "block_rq_merge")]
pub fn block_rq_merge_btf(ctx: BtfTracePointContext) -> i32 {
    block::try_rq_merge_btf(&ctx).map_or(0, |r| r as i32)
}

#[tracepoint]
pub fn block_io_start(ctx: TracePointContext) -> u32 {
    block::try_io_start(&ctx).unwrap_or(0)
}

#[tracepoint]
pub fn block_rq_complete(ctx: TracePointContext) -> u32 {
    block::try_rq_complete(&ctx).unwrap_or(0)
}

#[tracepoint]
pub fn block_rq_merge(ctx: TracePointContext) -> u32 {
    block::try_rq_merge(&ctx).unwrap_or(0)
}

// --- memory (always on): sampled page faults ---

#[perf_event]
pub fn page_fault(ctx: PerfEventContext) -> u32 {
    memory::try_page_fault(&ctx).unwrap_or(0)
}

// --- profiler: on-CPU samples, off-CPU time ---

#[perf_event]
pub fn profile_cpu(ctx: PerfEventContext) -> u32 {
    profile::try_cpu_sample(&ctx).unwrap_or(0)
}

#[tracepoint]
pub fn profile_sched_switch(ctx: TracePointContext) -> u32 {
    profile::try_sched_switch(&ctx).unwrap_or(0)
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn profile_sched_switch_raw(ctx: RawTracePointContext) -> i32 {
    profile::try_sched_switch_raw(&ctx).unwrap_or(0) as i32
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn profile_sys_exit(ctx: RawTracePointContext) -> i32 {
    profile::try_offcpu_sys_exit(&ctx).map_or(0, |r| r as i32)
}

// --- scheduler: run-queue latency (lifecycle counters run in the targeting hooks) ---

#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup_btf(ctx: BtfTracePointContext) -> i32 {
    sched::try_wakeup(&ctx).map_or(0, |r| r as i32)
}

#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn sched_wakeup_new_btf(ctx: BtfTracePointContext) -> i32 {
    sched::try_wakeup(&ctx).map_or(0, |r| r as i32)
}

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_btf(ctx: BtfTracePointContext) -> i32 {
    sched::try_switch(&ctx).map_or(0, |r| r as i32)
}

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_info_btf(ctx: BtfTracePointContext) -> i32 {
    sched::try_switch_info(&ctx).map_or(0, |r| r as i32)
}

#[raw_tracepoint(tracepoint = "sched_wakeup")]
pub fn sched_wakeup_raw(ctx: RawTracePointContext) -> i32 {
    sched::try_wakeup_raw(&ctx).map_or(0, |r| r as i32)
}

#[raw_tracepoint(tracepoint = "sched_wakeup_new")]
pub fn sched_wakeup_new_raw(ctx: RawTracePointContext) -> i32 {
    sched::try_wakeup_raw(&ctx).map_or(0, |r| r as i32)
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch_raw(ctx: RawTracePointContext) -> i32 {
    sched::try_switch_raw(&ctx).map_or(0, |r| r as i32)
}

// --- allocations (precise mode) ---

#[uprobe]
pub fn alloc_malloc(ctx: ProbeContext) -> u32 {
    alloc::try_entry(&ctx, alloc::Entry::Size0).unwrap_or(0)
}

#[uprobe]
pub fn alloc_calloc(ctx: ProbeContext) -> u32 {
    alloc::try_entry(&ctx, alloc::Entry::Calloc).unwrap_or(0)
}

#[uprobe]
pub fn alloc_realloc(ctx: ProbeContext) -> u32 {
    alloc::try_entry(&ctx, alloc::Entry::Realloc).unwrap_or(0)
}

#[uprobe]
pub fn alloc_reallocarray(ctx: ProbeContext) -> u32 {
    alloc::try_entry(&ctx, alloc::Entry::ReallocArray).unwrap_or(0)
}

#[uprobe]
pub fn alloc_aligned(ctx: ProbeContext) -> u32 {
    alloc::try_entry(&ctx, alloc::Entry::Size1).unwrap_or(0)
}

#[uprobe]
pub fn alloc_posix_memalign(ctx: ProbeContext) -> u32 {
    alloc::try_entry(&ctx, alloc::Entry::PosixMemalign).unwrap_or(0)
}

#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    alloc::try_return(&ctx).unwrap_or(0)
}

#[uretprobe]
pub fn alloc_return_posix_memalign(ctx: RetProbeContext) -> u32 {
    alloc::try_return_posix_memalign(&ctx).unwrap_or(0)
}

/// jemalloc's `xallocx(ptr, size, extra, flags)`: resizes in place.
#[uprobe]
pub fn alloc_xallocx(ctx: ProbeContext) -> u32 {
    alloc::try_entry(&ctx, alloc::Entry::Realloc).unwrap_or(0)
}

#[uretprobe]
pub fn alloc_return_xallocx(ctx: RetProbeContext) -> u32 {
    alloc::try_return_xallocx(&ctx).unwrap_or(0)
}

#[uprobe]
pub fn alloc_free(ctx: ProbeContext) -> u32 {
    alloc::try_free(&ctx).unwrap_or(0)
}

#[tracepoint]
pub fn alloc_mmap_enter(ctx: TracePointContext) -> u32 {
    alloc::try_mmap_enter(&ctx).unwrap_or(0)
}

#[tracepoint]
pub fn alloc_mmap_exit(ctx: TracePointContext) -> u32 {
    alloc::try_mmap_exit(&ctx).unwrap_or(0)
}

#[tracepoint]
pub fn alloc_munmap_enter(ctx: TracePointContext) -> u32 {
    alloc::try_munmap_enter(&ctx).unwrap_or(0)
}

#[tracepoint]
pub fn alloc_brk_exit(ctx: TracePointContext) -> u32 {
    alloc::try_brk_exit(&ctx).unwrap_or(0)
}

// --- hook probes for `ws1-probe check` and the benchmark floor ---

#[tracepoint]
pub fn check_tracepoint(_ctx: TracePointContext) -> u32 {
    0
}

#[raw_tracepoint]
pub fn check_raw_tp(_ctx: RawTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn check_tp_btf(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[kprobe]
pub fn check_kprobe(_ctx: ProbeContext) -> u32 {
    0
}

#[fentry(function = "do_exit")]
pub fn check_fentry(_ctx: FEntryContext) -> u32 {
    0
}

#[uprobe]
pub fn check_uprobe(_ctx: ProbeContext) -> u32 {
    0
}

#[perf_event]
pub fn check_perf_event(_ctx: PerfEventContext) -> u32 {
    0
}

#[uprobe]
pub fn floor_uprobe(_ctx: ProbeContext) -> u32 {
    0
}

#[uretprobe]
pub fn floor_uretprobe(_ctx: RetProbeContext) -> u32 {
    0
}

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn floor_sys_enter(_ctx: RawTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn floor_sys_exit(_ctx: RawTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn floor_pid_sys_enter(_ctx: RawTracePointContext) -> i32 {
    // The one helper call any per-process filter needs; compared so it cannot be dropped.
    i32::from(aya_ebpf::helpers::bpf_get_current_pid_tgid() == 0)
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn floor_pid_sys_exit(_ctx: RawTracePointContext) -> i32 {
    i32::from(aya_ebpf::helpers::bpf_get_current_pid_tgid() == 0)
}

#[btf_tracepoint(function = "sched_switch")]
pub fn floor_sched_switch(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "block_io_start")]
pub fn floor_block_io_start(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "block_rq_complete")]
pub fn floor_block_rq_complete(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: the verifier rejects any program with a reachable loop like this one, so a
    // program that loads cannot panic.
    loop {}
}

/// GPL-compatible licence, required for bpf_probe_read_kernel and the ring buffer helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
