//! Process targeting shared by every collector.
//!
//! The kernel holds `TARGETS: tgid → service id`. Every collector looks the current tgid up first
//! and returns at once when it is absent, so untargeted processes cost one hash lookup. The agent
//! fills the map from a /proc scan at start; the kernel follows forks itself (a child inherits its
//! parent's service), removes entries on exit, and on exec either applies a cached per-comm
//! decision from `COMM_SERVICES` or asks the agent through the `EXEC_EVENTS` ring buffer.

/// Service id meaning "not attributed to a named service" (`service="other"`).
pub const SERVICE_OTHER: u32 = 0;
/// Value in `COMM_SERVICES` meaning "this comm is known not to be targeted".
pub const SERVICE_NONE: u32 = u32::MAX;

/// Capacity of `TARGETS` (processes, not threads).
pub const TARGET_ENTRIES: u32 = 32_768;
/// Capacity of `COMM_SERVICES` (distinct command names with a cached decision).
pub const COMM_ENTRIES: u32 = 4_096;
/// Size of the exec event ring buffer in bytes.
pub const EXEC_RINGBUF_BYTES: u32 = 256 * 1024;

/// `CLONE_THREAD` from include/uapi/linux/sched.h: new threads share their process's entry.
pub const CLONE_THREAD: u64 = 0x0001_0000;

/// Command name as the kernel stores it (`TASK_COMM_LEN`).
pub type Comm = [u8; 16];

/// Sent to the agent when a process execs a command it has no cached decision for.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecEvent {
    pub tgid: u32,
    /// Service the process held before the exec (inherited), or `SERVICE_NONE`.
    pub prev_service: u32,
    pub comm: Comm,
}

/// Tracepoint field offsets read by the agent from tracefs format files at start-up, so no kernel
/// layout is compiled in. Passed to the kernel as the global `TP_OFFSETS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracepointOffsets {
    /// `task:task_newtask` → `pid`.
    pub newtask_pid: u32,
    /// `task:task_newtask` → `clone_flags`.
    pub newtask_clone_flags: u32,
    /// `sched:sched_process_exit` → `group_dead`; `u32::MAX` when the field is absent (old
    /// kernels), in which case the entry is removed when the thread with pid == tgid exits.
    pub exit_group_dead: u32,
    pub _pad: u32,
}

impl TracepointOffsets {
    /// Offsets on Linux 6.x, used only when tracefs cannot be read.
    pub const FALLBACK: Self = Self {
        newtask_pid: 8,
        newtask_clone_flags: 32,
        exit_group_dead: 32,
        _pad: 0,
    };
}

/// Why an event was dropped; index into the per-CPU `DROPS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// `TARGETS` was full when a fork or exec tried to add a process.
    TargetsFull = 0,
    /// The exec ring buffer was full.
    ExecRingFull = 1,
    /// `SYSCALL_START` was full (too many threads in a syscall at once).
    SyscallStartFull = 2,
    /// `SYSCALL_HIST` was full.
    SyscallHistFull = 3,
    /// `SYSCALL_ERRORS` was full.
    SyscallErrorsFull = 4,
    /// `NET_SOCKS` was full, or the kernel could not allocate a socket's local storage
    /// (`NET_SK`): a new TCP connection is not observed.
    NetSocksFull = 5,
    /// `NET_SLOTS` (no slot left for a new endpoint) or `NET_HIST` was full.
    NetStatsFull = 6,
    /// `NET_LISTEN` was full: a listening port is not observed.
    NetListenFull = 7,
    /// `ALLOC_PENDING` was full: an allocation call in progress is not observed.
    AllocPendingFull = 8,
    /// An allocation's user stack could not be stored (`ALLOC_STACKS` full or a hash collision).
    AllocStackLost = 9,
    /// `PROFILE_COUNTS` or `OFFCPU_TIME` was full: a sample or a block is not counted.
    ProfileCountsFull = 10,
    /// The sample ring buffer was full: a DWARF-mode sample is lost.
    ProfileRingFull = 11,
    /// `OFFCPU_START` was full: a thread's block is not measured.
    OffCpuStartFull = 12,
    /// A remote address did not fit the `NET_REMOTES` budget (or its id was taken by another
    /// address): the connection is counted under `remote="other"`.
    NetRemoteOther = 13,
    /// `RUNQ_HIST` or `PROC_EVENTS` was full, or the crash ring buffer: a run-queue wait, a
    /// start or exit, or a crash line is lost.
    SchedMapFull = 14,
    /// `BLOCK_START` was full: a block I/O request is not timed.
    BlockStartFull = 15,
    /// `BLOCK_HIST` or `BLOCK_BYTES` was full: block I/O of a new (service, device, op) is
    /// not counted.
    BlockHistFull = 16,
}

impl DropReason {
    pub const COUNT: u32 = 17;
    pub const ALL: [DropReason; Self::COUNT as usize] = [
        Self::TargetsFull,
        Self::ExecRingFull,
        Self::SyscallStartFull,
        Self::SyscallHistFull,
        Self::SyscallErrorsFull,
        Self::NetSocksFull,
        Self::NetStatsFull,
        Self::NetListenFull,
        Self::AllocPendingFull,
        Self::AllocStackLost,
        Self::ProfileCountsFull,
        Self::ProfileRingFull,
        Self::OffCpuStartFull,
        Self::NetRemoteOther,
        Self::SchedMapFull,
        Self::BlockStartFull,
        Self::BlockHistFull,
    ];

    /// Label value used in `ws1_probe_events_dropped_total{reason}`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::TargetsFull => "targets_map_full",
            Self::ExecRingFull => "exec_ringbuf_full",
            Self::SyscallStartFull => "syscall_start_map_full",
            Self::SyscallHistFull => "syscall_hist_map_full",
            Self::SyscallErrorsFull => "syscall_errors_map_full",
            Self::NetSocksFull => "net_socks_map_full",
            Self::NetStatsFull => "net_stats_map_full",
            Self::NetListenFull => "net_listen_map_full",
            Self::AllocPendingFull => "alloc_pending_map_full",
            Self::AllocStackLost => "alloc_stack_lost",
            Self::ProfileCountsFull => "profile_counts_map_full",
            Self::ProfileRingFull => "profile_ringbuf_full",
            Self::OffCpuStartFull => "offcpu_start_map_full",
            Self::NetRemoteOther => "net_remote_address_budget",
            Self::SchedMapFull => "sched_map_full",
            Self::BlockStartFull => "block_start_map_full",
            Self::BlockHistFull => "block_hist_map_full",
        }
    }
}

#[cfg(feature = "user")]
crate::impl_pod!(ExecEvent, TracepointOffsets);
