//! Names of the empty programs `ws1-probe check` loads and attaches to learn which hooks this
//! kernel allows. They live in the same object as the collectors, so a passing check means the
//! collectors' program types load too.

/// Program names in the eBPF object, one per hook kind.
pub const PROBE_TRACEPOINT: &str = "check_tracepoint";
pub const PROBE_RAW_TP: &str = "check_raw_tp";
pub const PROBE_TP_BTF: &str = "check_tp_btf";
pub const PROBE_KPROBE: &str = "check_kprobe";
pub const PROBE_FENTRY: &str = "check_fentry";
pub const PROBE_UPROBE: &str = "check_uprobe";
pub const PROBE_PERF_EVENT: &str = "check_perf_event";
/// An empty raw tracepoint pair on sys_enter/sys_exit: the floor of any syscall collector,
/// measured by `cargo xtask bench syscalls`.
pub const FLOOR_SYS_ENTER: &str = "floor_sys_enter";
pub const FLOOR_SYS_EXIT: &str = "floor_sys_exit";
/// The same pair calling `bpf_get_current_pid_tgid` once each: the floor of any per-process
/// filter.
pub const FLOOR_PID_SYS_ENTER: &str = "floor_pid_sys_enter";
pub const FLOOR_PID_SYS_EXIT: &str = "floor_pid_sys_exit";
/// An empty uprobe and uretprobe: attached to malloc (both) and free (uprobe) of one process,
/// the trap floor of precise allocation tracing, measured by `cargo xtask bench alloc`.
pub const FLOOR_UPROBE: &str = "floor_uprobe";
pub const FLOOR_URETPROBE: &str = "floor_uretprobe";

/// An empty `tp_btf` program on the run-queue hook (`sched_switch`): the floor of
/// `cargo xtask bench health-sched`.
pub const FLOOR_SCHED: [(&str, &str); 1] = [("floor_sched_switch", "sched_switch")];
/// Empty `tp_btf` programs on the block hooks (`block_io_start`, `block_rq_complete`): the
/// floor the block collector's cost per I/O is measured against.
pub const FLOOR_BLOCK_IO_START: &str = "floor_block_io_start";
pub const FLOOR_BLOCK_RQ_COMPLETE: &str = "floor_block_rq_complete";
