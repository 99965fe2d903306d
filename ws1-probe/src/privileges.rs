//! Least privilege: once its programs are loaded and attached, the agent keeps only the
//! capabilities it still uses, in every thread, and drops the rest from the bounding set too, so
//! nothing it executes or becomes can get them back.
//!
//! What stays, and why (see [`KEPT`]):
//! - `CAP_BPF`, `CAP_PERFMON`: precise allocation tracing attaches uprobes (perf events with BPF
//!   programs) to processes that start later.
//! - `CAP_SYS_PTRACE`: `/proc/PID/{maps,exe,root,fd,io,net}` of processes of other users (or of
//!   root processes with more capabilities than the agent keeps): targeting by executable, the
//!   profiler's mappings and binaries, resources, listening ports of new processes.
//! - `CAP_DAC_READ_SEARCH`: binaries reached through `/proc/PID/root` that only their owner can
//!   read, and mount points of other users (host collector's `statvfs`).
//! - `CAP_CHECKPOINT_RESTORE`: `/proc/PID/map_files`, through which the profiler opens the very
//!   binary a process mapped (deleted, or in a container).
//! - `CAP_SYSLOG`: addresses in `/proc/kallsyms`, re-read when kernel frames name modules or BPF
//!   programs loaded since.
//!
//! - `CAP_SYS_ADMIN`, only with precise allocation tracing (and on kernels without `CAP_BPF`,
//!   before 5.8, where loading needs it): opening a uprobe perf event was refused with `EACCES`
//!   on this project's 6.18 kernel with `CAP_BPF` and `CAP_PERFMON` but without it (measured
//!   with `capsh --drop=cap_sys_admin -- -c 'ws1-probe check'`: `missing: uprobe`). Precise
//!   mode cannot be turned on by a reload, so without it at start-up it goes.
//!
//! Everything else goes: `CAP_NET_BIND_SERVICE` (the listener is bound), `CAP_SYS_RESOURCE` (the
//! memlock limit is lifted), `CAP_SETPCAP` and the rest.
//!
//! Capabilities are per thread, and the agent has runtime and blocking-pool threads by then. The
//! `caps` crate, like libcap without its `psx` helper, changes only the calling thread, and its
//! calls allocate, so they cannot run in a signal handler. Hence raw `capset`/`prctl` here: every
//! other thread is sent a signal whose handler makes the same two async-signal-safe system
//! calls, and the caller waits for each before moving on.

use std::{
    ffi::c_int,
    sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

/// A capability number and the name `/proc` and man pages use.
pub type Cap = (u32, &'static str);

pub const CAP_SYS_ADMIN: Cap = (21, "CAP_SYS_ADMIN");

/// Kept after start-up, with why (the module documentation says more).
pub const KEPT: [(Cap, &str); 6] = [
    (
        (39, "CAP_BPF"),
        "uprobes for new processes (precise allocation tracing)",
    ),
    (
        (38, "CAP_PERFMON"),
        "uprobes for new processes (precise allocation tracing)",
    ),
    (
        (19, "CAP_SYS_PTRACE"),
        "/proc/PID/{maps,exe,root,fd,io} of other users' processes",
    ),
    (
        (2, "CAP_DAC_READ_SEARCH"),
        "binaries and mount points only their owners can read",
    ),
    (
        (40, "CAP_CHECKPOINT_RESTORE"),
        "/proc/PID/map_files (the profiler's binaries)",
    ),
    ((34, "CAP_SYSLOG"), "addresses in /proc/kallsyms"),
];

/// The capabilities to keep on this kernel as a bit mask: [`KEPT`] that the kernel knows, plus
/// `CAP_SYS_ADMIN` when uprobes are attached later (`uprobes`: precise allocation tracing) or the
/// kernel does not know `CAP_BPF` (before 5.8, where that is what loading and attaching need).
pub fn kept_mask(last_cap: u32, uprobes: bool) -> u64 {
    let mut mask = 0u64;
    for ((cap, _), _) in KEPT {
        if cap <= last_cap {
            mask |= 1 << cap;
        }
    }
    if last_cap < 39 || uprobes {
        mask |= 1 << CAP_SYS_ADMIN.0;
    }
    mask
}

/// Names of the capabilities in `mask`, for the log.
pub fn names(mask: u64) -> Vec<&'static str> {
    KEPT.iter()
        .map(|(cap, _)| *cap)
        .chain([CAP_SYS_ADMIN])
        .filter(|(cap, _)| mask & (1 << cap) != 0)
        .map(|(_, name)| name)
        .collect()
}

/// The highest capability number this kernel knows.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Why dropping failed.
#[derive(Debug, thiserror::Error)]
pub enum DropError {
    #[error("cannot install the signal handler that drops capabilities in other threads: {source}")]
    Handler {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot drop capabilities in this thread: {source}")]
    Own {
        #[source]
        source: std::io::Error,
    },
    #[error("{failed} of the agent's threads could not drop their capabilities")]
    Threads { failed: usize },
}

/// The mask being applied, read by the signal handler.
static TARGET: AtomicU64 = AtomicU64::new(0);
static LAST_CAP: AtomicU32 = AtomicU32::new(0);
/// Threads that applied it, and those that failed to, since the last reset.
static APPLIED: AtomicUsize = AtomicUsize::new(0);
static FAILED: AtomicUsize = AtomicUsize::new(0);

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops, in the calling thread, the bounding set outside `mask`, the ambient set, and sets
/// effective and permitted to `mask` (within what the thread has), inheritable to none. Only
/// raw system calls on the stack: safe in a signal handler.
fn apply(mask: u64, last_cap: u32) -> bool {
    // The bounding set only limits what an exec could gain back; reducing it needs
    // CAP_SETPCAP, which a unit's own CapabilityBoundingSet may already have taken. So it is
    // best effort, and success is the capset below.
    for cap in 0..=last_cap.min(63) {
        if mask & (1 << cap) == 0 {
            // SAFETY: prctl with integer arguments only; EINVAL or EPERM leave things as they
            // were.
            unsafe {
                libc::prctl(
                    libc::PR_CAPBSET_DROP,
                    libc::c_ulong::from(cap),
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                )
            };
        }
    }
    // SAFETY: as above.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget writes two CapData records for version 3, which `data` holds.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return false;
    }
    for (i, d) in data.iter_mut().enumerate() {
        let part = (mask >> (32 * i)) as u32;
        d.permitted &= part;
        d.effective = d.permitted;
        d.inheritable = 0;
    }
    header.pid = 0;
    // SAFETY: capset reads the header and two CapData records.
    unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) == 0 }
}

extern "C" fn on_signal(_: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot.
    let errno = unsafe { *libc::__errno_location() };
    if apply(
        TARGET.load(Ordering::SeqCst),
        LAST_CAP.load(Ordering::SeqCst),
    ) {
        APPLIED.fetch_add(1, Ordering::SeqCst);
    } else {
        FAILED.fetch_add(1, Ordering::SeqCst);
    }
    // The interrupted code may look at errno after the handler returns.
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

fn thread_ids() -> Vec<i32> {
    std::fs::read_dir("/proc/self/task")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Keeps only `mask` in every thread of this process (see [`apply`]). Threads started meanwhile
/// are found by reading `/proc/self/task` again until none is left; threads started afterwards
/// inherit the reduced sets from the thread that starts them.
pub fn drop_all_threads(mask: u64, last_cap: u32) -> Result<(), DropError> {
    TARGET.store(mask, Ordering::SeqCst);
    LAST_CAP.store(last_cap, Ordering::SeqCst);
    let signal = libc::SIGRTMIN() + 6;
    // SAFETY: a zeroed sigaction is valid; the handler only makes raw system calls and touches
    // atomics. SA_RESTART keeps interrupted system calls of the other threads going.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
            return Err(DropError::Handler {
                source: std::io::Error::last_os_error(),
            });
        }
    }
    let me = gettid();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let mut done = vec![me];
    let mut failed = 0;
    // Bounded: each pass handles every thread it finds; new threads come only from threads
    // already done, which pass on the reduced sets.
    for _ in 0..8 {
        let pending: Vec<i32> = thread_ids()
            .into_iter()
            .filter(|t| !done.contains(t))
            .collect();
        if pending.is_empty() {
            break;
        }
        for tid in pending {
            done.push(tid);
            let before = APPLIED.load(Ordering::SeqCst) + FAILED.load(Ordering::SeqCst);
            let before_failed = FAILED.load(Ordering::SeqCst);
            // SAFETY: tgkill to a thread of this process, with a signal whose handler is set.
            if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal) } != 0 {
                // Exited meanwhile.
                continue;
            }
            let started = Instant::now();
            while APPLIED.load(Ordering::SeqCst) + FAILED.load(Ordering::SeqCst) == before {
                if started.elapsed() > Duration::from_secs(2) {
                    failed += 1;
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            if FAILED.load(Ordering::SeqCst) > before_failed {
                failed += 1;
            }
        }
    }
    if !apply(mask, last_cap) {
        return Err(DropError::Own {
            source: std::io::Error::last_os_error(),
        });
    }
    if failed > 0 {
        return Err(DropError::Threads { failed });
    }
    Ok(())
}

/// `CapEff`, `CapPrm`, `CapInh`, `CapBnd` and `CapAmb` of a `/proc/PID/status` text.
pub fn status_caps(status: &str) -> Option<[u64; 5]> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    Some([
        field("CapEff:")?,
        field("CapPrm:")?,
        field("CapInh:")?,
        field("CapBnd:")?,
        field("CapAmb:")?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_the_collectors_use_on_this_kernel() {
        let mask = kept_mask(40, false);
        assert_eq!(
            mask,
            (1 << 39) | (1 << 38) | (1 << 19) | (1 << 2) | (1 << 40) | (1 << 34)
        );
        // Before CAP_BPF existed, loading needed CAP_SYS_ADMIN; it stays.
        assert_eq!(kept_mask(40, true), mask | (1 << 21));
        let old = kept_mask(37, false);
        assert_eq!(old, (1 << 19) | (1 << 2) | (1 << 34) | (1 << 21));
        assert_eq!(
            names(old),
            vec![
                "CAP_SYS_PTRACE",
                "CAP_DAC_READ_SEARCH",
                "CAP_SYSLOG",
                "CAP_SYS_ADMIN"
            ]
        );
    }

    #[test]
    fn parses_status_caps() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n";
        assert_eq!(
            status_caps(status),
            Some([0x1ff_ffff_ffff, 0x1ff_ffff_ffff, 0, 0x1ff_ffff_ffff, 0])
        );
        assert_eq!(status_caps("Name:\tx\n"), None);
    }
}
