//! Shared types of the scheduler probe: process lifecycle counters (starts, exits by reason),
//! the crash event, and run-queue latency (runnable until running, like BCC's runqlat).

/// Capacity of `RUNQ_HIST` (one ~4.6 KB histogram per service id; host mode deletes the
/// entries of ids whose processes are gone, as it does for the syscall histograms).
pub const RUNQ_HIST_ENTRIES: u32 = 1_024;
/// Capacity of `PROC_EVENTS`: (service id, event) pairs, four events per service.
pub const PROC_EVENT_ENTRIES: u32 = 4 * crate::targets::COMM_ENTRIES;
/// Size of the crash event ring buffer in bytes (crashes are rare; 64 KiB holds ~1500).
pub const CRASH_RINGBUF_BYTES: u32 = 64 * 1024;
/// Capacity of `RUNQ_START_TID`, the raw tracepoints' enqueue times by thread id (an LRU:
/// threads that exit while runnable are evicted, not leaked).
pub const RUNQ_TID_ENTRIES: u32 = 16_384;

/// What happened to a process of a service; the `event` of a `ProcKey`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProcEvent {
    /// A new thread group in the service: a fork of one of its processes, or an exec that
    /// moved a process into it.
    Start = 0,
    /// The thread group ended with exit status 0.
    ExitOk = 1,
    /// The thread group ended with a non-zero exit status.
    ExitError = 2,
    /// The thread group was killed by a signal.
    ExitSignal = 3,
}

impl ProcEvent {
    pub const ALL: [ProcEvent; 4] = [Self::Start, Self::ExitOk, Self::ExitError, Self::ExitSignal];

    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Start),
            1 => Some(Self::ExitOk),
            2 => Some(Self::ExitError),
            3 => Some(Self::ExitSignal),
            _ => None,
        }
    }

    /// The `reason` label of an exit (`None` for a start).
    pub const fn reason(self) -> Option<&'static str> {
        match self {
            Self::Start => None,
            Self::ExitOk => Some("ok"),
            Self::ExitError => Some("error"),
            Self::ExitSignal => Some("signal"),
        }
    }
}

/// The exit of a thread group from its wait status (`task_struct.exit_code` as `wait(2)`
/// would report it): killed by a signal when the low 7 bits hold one, an error when the exit
/// status (bits 8..16) is not 0, else ok.
#[inline(always)]
pub const fn exit_event(code: u32) -> ProcEvent {
    if code & 0x7f != 0 {
        ProcEvent::ExitSignal
    } else if (code >> 8) & 0xff != 0 {
        ProcEvent::ExitError
    } else {
        ProcEvent::ExitOk
    }
}

/// Key of `PROC_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProcKey {
    pub service: u32,
    /// A `ProcEvent`.
    pub event: u32,
}

/// Streamed when a process of a service is killed by a signal.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CrashEvent {
    pub tgid: u32,
    pub service: u32,
    /// The wait status: the signal is `code & 0x7f`, a core dump sets 0x80.
    pub code: u32,
    pub _pad: u32,
    pub comm: [u8; 16],
}

/// When a thread became runnable, in its task-local storage (`RUNQ_START`); `ts_ns == 0`: not
/// waiting.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RunqStart {
    pub ts_ns: u64,
    pub service: u32,
    pub _pad: u32,
}

/// What the `sched_info` program last saw of a thread, in its task-local storage
/// (`RUNQ_SEEN`): the kernel's cumulative run-queue delay and arrival count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RunqSeen {
    pub run_delay: u64,
    pub pcount: u64,
}

/// `struct task_struct` member offsets from BTF, set by the loader (`SCHED_SETTINGS`);
/// `u32::MAX` where BTF lacks the member.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedSettings {
    /// `task_struct.tgid`: the process of a woken or switched-in task.
    pub task_tgid: u32,
    /// `task_struct.exit_code`: the wait status, set before `sched_process_exit` fires.
    pub task_exit_code: u32,
    /// `task_struct.bpf_storage`: lets the switch-in skip tasks without local storage before
    /// the helper call.
    pub task_bpf_storage: u32,
    /// `task_struct.pid` (the thread id): the raw tracepoints' key in `RUNQ_START_TID`.
    pub task_pid: u32,
    /// `task_struct.sched_info` + `sched_info.run_delay` and `.pcount` (`CONFIG_SCHED_INFO`):
    /// the kernel's own run-queue accounting.
    pub task_run_delay: u32,
    pub task_pcount: u32,
}

impl SchedSettings {
    pub const UNKNOWN: Self = Self {
        task_tgid: u32::MAX,
        task_exit_code: u32::MAX,
        task_bpf_storage: u32::MAX,
        task_pid: u32::MAX,
        task_run_delay: u32::MAX,
        task_pcount: u32::MAX,
    };
}

#[cfg(feature = "user")]
crate::impl_pod!(ProcKey, CrashEvent, RunqStart, RunqSeen, SchedSettings);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reasons_follow_wait_status() {
        assert_eq!(exit_event(0), ProcEvent::ExitOk);
        assert_eq!(exit_event(3 << 8), ProcEvent::ExitError);
        assert_eq!(exit_event(255 << 8), ProcEvent::ExitError);
        assert_eq!(exit_event(11), ProcEvent::ExitSignal, "SIGSEGV");
        assert_eq!(exit_event(11 | 0x80), ProcEvent::ExitSignal, "core dumped");
        assert_eq!(exit_event(9), ProcEvent::ExitSignal, "SIGKILL");
    }
}
