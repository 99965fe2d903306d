//! Shared types of the syscall-latency probe.

/// Key of the latency histogram map `SYSCALL_HIST`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SyscallKey {
    /// Service id assigned by the agent (see [`crate::targets`]).
    pub service: u32,
    /// Syscall number (x86_64 numbering on x86_64).
    pub nr: u32,
}

/// Key of the per-CPU error counter map `SYSCALL_ERRORS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SyscallErrorKey {
    pub service: u32,
    pub nr: u32,
    /// Positive errno (the syscall returned `-errno`).
    pub errno: u32,
    pub _pad: u32,
}

/// A targeted thread's syscall in flight, keyed by thread id in `SYSCALL_START`; `ts_ns == 0`
/// when the thread is not inside a syscall the probe saw start.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SyscallStart {
    /// `bpf_ktime_get_ns` at `sys_enter`.
    pub ts_ns: u64,
    pub nr: u32,
    pub service: u32,
}

/// Largest errno the kernel returns as `-errno` (`MAX_ERRNO` in include/linux/err.h).
pub const MAX_ERRNO: u64 = 4095;

/// Capacity of the in-flight map: one entry per live targeted thread.
pub const START_ENTRIES: u32 = 16_384;
/// Capacity of the histogram map: services × syscalls seen (preallocated: 4.6 KB each).
pub const HIST_ENTRIES: u32 = 4_096;
/// Capacity of the error map: services × syscalls × errnos seen.
pub const ERROR_ENTRIES: u32 = 4_096;

#[cfg(feature = "user")]
crate::impl_pod!(SyscallKey, SyscallErrorKey, SyscallStart);
