//! The scheduler probe, userspace half: attaches the run-queue `tp_btf` programs, reads the
//! run-queue histograms and the start/exit counters into a [`SchedSnapshot`], and turns crash
//! events into log lines. The lifecycle counters are kept by the targeting hooks, which run
//! whatever collectors are on; this collector only reads them.

use std::collections::{BTreeMap, BTreeSet};

use aya::{
    Ebpf,
    maps::{HashMap, IterableMap, MapData, PerCpuHashMap, RingBuf},
};
use ws1_probe_common::{
    hist::LatencyHist,
    sched::{CrashEvent, ProcEvent, ProcKey, SchedSettings},
};

use super::{MapUsage, take_map, typed};
use crate::{
    ebpf::{LoadError, attach_btf_tracepoints, attach_raw_tracepoint},
    histogram::Histogram,
};

/// The default run-queue program: `sched_switch` reading the kernel's `sched_info`.
pub const SCHED_INFO_PROGRAMS: [(&str, &str); 1] = [("sched_switch_info_btf", "sched_switch")];

/// Run-queue programs that time each wait themselves, as runqlat does (kernels whose BTF has
/// no `sched_info`, i.e. without `CONFIG_SCHED_INFO`).
pub const SCHED_BTF_PROGRAMS: [(&str, &str); 3] = [
    ("sched_wakeup_btf", "sched_wakeup"),
    ("sched_wakeup_new_btf", "sched_wakeup_new"),
    ("sched_switch_btf", "sched_switch"),
];

/// The raw tracepoint fallback on the same hooks.
pub const SCHED_RAW_PROGRAMS: [(&str, &str); 3] = [
    ("sched_wakeup_raw", "sched_wakeup"),
    ("sched_wakeup_new_raw", "sched_wakeup_new"),
    ("sched_switch_raw", "sched_switch"),
];

/// Environment variable that chooses the run-queue hooks: `auto` (the default: the first of
/// the kinds below that the kernel allows), `timestamps` or `raw_tracepoint` (start there).
pub const SCHED_HOOKS_ENV: &str = "WS1_PROBE_SCHED_HOOKS";

/// Which programs measure run-queue latency, in the order they are tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RunqueueHooks {
    /// `tp_btf` `sched_switch` only, reading the kernel's `sched_info` run-queue accounting.
    SchedInfo,
    /// `tp_btf` on the wakeups and `sched_switch`, enqueue times in task-local storage.
    Timestamps,
    /// Raw tracepoints on the same three, enqueue times in `RUNQ_START_TID`.
    Raw,
}

fn parse_hooks(value: Option<&str>) -> Result<RunqueueHooks, LoadError> {
    match value {
        None | Some("") | Some("auto") => Ok(RunqueueHooks::SchedInfo),
        Some("timestamps") => Ok(RunqueueHooks::Timestamps),
        Some("raw_tracepoint") => Ok(RunqueueHooks::Raw),
        Some(other) => Err(LoadError::Setting {
            name: SCHED_HOOKS_ENV,
            value: other.to_owned(),
            expected: "auto (tp_btf where the kernel allows), timestamps or raw_tracepoint",
        }),
    }
}

/// Everything the scheduler probe has counted since it was attached.
#[derive(Clone, Debug, Default)]
pub struct SchedSnapshot {
    /// Service id → run-queue latency.
    pub runqueue: BTreeMap<u32, Histogram>,
    /// (service id, event) → count.
    pub events: BTreeMap<(u32, ProcEvent), u64>,
}

impl SchedSnapshot {
    /// Run-queue waits per service id (activity for host mode's ranking).
    pub fn waits_by_service(&self) -> BTreeMap<u32, u64> {
        self.runqueue.iter().map(|(s, h)| (*s, h.count)).collect()
    }
}

/// A process of a service killed by a signal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crash {
    pub pid: u32,
    pub service: u32,
    pub comm: String,
    pub signal: u32,
    pub core_dumped: bool,
}

impl Crash {
    pub fn from_event(e: &CrashEvent) -> Self {
        let end = e.comm.iter().position(|b| *b == 0).unwrap_or(e.comm.len());
        Self {
            pid: e.tgid,
            service: e.service,
            comm: String::from_utf8_lossy(&e.comm[..end]).into_owned(),
            signal: e.code & 0x7f,
            core_dumped: e.code & 0x80 != 0,
        }
    }

    /// The log line: `service NAME: process PID (COMM) killed by SIGSEGV`.
    pub fn line(&self, service: &str) -> String {
        format!(
            "service {service}: process {} ({}) killed by {}{}",
            self.pid,
            self.comm,
            signal_name(self.signal),
            if self.core_dumped {
                " (core dumped)"
            } else {
                ""
            }
        )
    }
}

/// The name of a signal number (Linux x86-64/arm64 numbering), or `signal N`.
pub fn signal_name(sig: u32) -> String {
    const NAMES: [&str; 32] = [
        "",
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    match NAMES.get(sig as usize) {
        Some(name) if !name.is_empty() => (*name).to_owned(),
        _ if (34..=64).contains(&sig) => format!("SIGRTMIN+{}", sig - 34),
        _ => format!("signal {sig}"),
    }
}

/// The `task_struct` offsets the scheduler programs read, from the kernel's BTF.
pub fn kernel_settings() -> SchedSettings {
    static SETTINGS: std::sync::OnceLock<SchedSettings> = std::sync::OnceLock::new();
    *SETTINGS.get_or_init(read_kernel_settings)
}

fn read_kernel_settings() -> SchedSettings {
    let wanted = [
        ("task_struct", "tgid"),
        ("task_struct", "exit_code"),
        ("task_struct", "bpf_storage"),
        ("task_struct", "pid"),
        ("task_struct", "sched_info"),
        ("sched_info", "run_delay"),
        ("sched_info", "pcount"),
    ];
    match crate::btf::kernel_member_offsets(&wanted) {
        Ok(found) => {
            let get = |i: usize| found.get(i).copied().flatten().unwrap_or(u32::MAX);
            let sum = |a: u32, b: u32| {
                if a == u32::MAX || b == u32::MAX {
                    u32::MAX
                } else {
                    a + b
                }
            };
            SchedSettings {
                task_tgid: get(0),
                task_exit_code: get(1),
                task_bpf_storage: get(2),
                task_pid: get(3),
                task_run_delay: sum(get(4), get(5)),
                task_pcount: sum(get(4), get(6)),
            }
        }
        Err(err) => {
            tracing::warn!(
                "process exits and run-queue latency are not measured (no task_struct offsets): {err}; make /sys/kernel/btf/vmlinux readable (a kernel built with CONFIG_DEBUG_INFO_BTF=y), or leave sched out of --collectors to silence this"
            );
            SchedSettings::UNKNOWN
        }
    }
}

/// Attaches the first run-queue programs, from `first` on, that the kernel allows: the
/// `sched_info` reader, the timestamping `tp_btf` programs, the raw tracepoints. A kernel that
/// refuses all of them loses run-queue latency only, with one warning.
fn attach_runqueue(ebpf: &mut Ebpf, first: RunqueueHooks) -> Option<RunqueueHooks> {
    let settings = kernel_settings();
    if settings.task_tgid == u32::MAX || settings.task_pid == u32::MAX {
        tracing::warn!(
            "run-queue latency is not measured: kernel BTF has no task_struct.tgid or .pid (leave sched out of --collectors to silence this)"
        );
        return None;
    }
    if first <= RunqueueHooks::Timestamps {
        // Parsed here, once per agent.
        match aya::Btf::from_sys_fs() {
            Ok(btf) => {
                if first == RunqueueHooks::SchedInfo {
                    let attached = if settings.task_run_delay == u32::MAX
                        || settings.task_pcount == u32::MAX
                    {
                        Err(
                            "kernel BTF has no task_struct.sched_info (CONFIG_SCHED_INFO)"
                                .to_owned(),
                        )
                    } else {
                        attach_btf_tracepoints(ebpf, &SCHED_INFO_PROGRAMS, &btf)
                    };
                    match attached {
                        Ok(()) => return Some(RunqueueHooks::SchedInfo),
                        Err(reason) => {
                            tracing::info!("run-queue latency times each wait itself: {reason}")
                        }
                    }
                }
                match attach_btf_tracepoints(ebpf, &SCHED_BTF_PROGRAMS, &btf) {
                    Ok(()) => return Some(RunqueueHooks::Timestamps),
                    Err(reason) => {
                        tracing::info!("run-queue latency uses the raw tracepoints: {reason}")
                    }
                }
            }
            Err(err) => tracing::info!(
                "run-queue latency uses the raw tracepoints: cannot read kernel BTF: {err}"
            ),
        }
    }
    for (program, tp) in SCHED_RAW_PROGRAMS {
        if let Err(err) = attach_raw_tracepoint(ebpf, program, tp) {
            tracing::warn!(
                "run-queue latency is not measured: {err} (leave it out with --collectors to silence this)"
            );
            return None;
        }
    }
    Some(RunqueueHooks::Raw)
}

pub struct SchedCollector {
    runq: HashMap<MapData, u32, LatencyHist>,
    events: PerCpuHashMap<MapData, ProcKey, u64>,
    crashes: RingBuf<MapData>,
    /// Starts decided by the agent (an exec the kernel could not decide moved a process into a
    /// service), added to the kernel's counts.
    exec_starts: BTreeMap<u32, u64>,
    /// The run-queue programs attached, if any.
    pub runqueue: Option<RunqueueHooks>,
}

impl SchedCollector {
    /// Takes the maps and, when `enabled`, attaches the run-queue programs. A kernel that
    /// refuses them loses run-queue latency only (one warning); lifecycle counters come from
    /// the targeting hooks either way.
    pub fn attach(ebpf: &mut Ebpf, enabled: bool) -> Result<Self, LoadError> {
        let first = parse_hooks(std::env::var(SCHED_HOOKS_ENV).ok().as_deref())?;
        let runqueue = if enabled {
            attach_runqueue(ebpf, first)
        } else {
            None
        };
        Ok(Self {
            runq: typed("RUNQ_HIST", take_map(ebpf, "RUNQ_HIST")?)?,
            events: typed("PROC_EVENTS", take_map(ebpf, "PROC_EVENTS")?)?,
            crashes: typed("CRASH_EVENTS", take_map(ebpf, "CRASH_EVENTS")?)?,
            exec_starts: BTreeMap::new(),
            runqueue,
        })
    }

    /// Counts a start the agent decided (see [`crate::collectors::targets::Targets`]).
    pub fn add_exec_starts(&mut self, starts: &BTreeMap<u32, u64>) {
        for (service, n) in starts {
            *self.exec_starts.entry(*service).or_insert(0) += n;
        }
    }

    /// Reads both maps. Entries that disappear mid-walk are skipped.
    pub fn snapshot(&self) -> SchedSnapshot {
        let mut snap = SchedSnapshot::default();
        for (service, hist) in self.runq.iter().flatten() {
            snap.runqueue.entry(service).or_default().add_kernel(&hist);
        }
        for (key, per_cpu) in self.events.iter().flatten() {
            if let Some(event) = ProcEvent::from_u32(key.event) {
                *snap.events.entry((key.service, event)).or_insert(0) +=
                    per_cpu.iter().sum::<u64>();
            }
        }
        for (service, n) in &self.exec_starts {
            *snap.events.entry((*service, ProcEvent::Start)).or_insert(0) += n;
        }
        snap
    }

    /// Crashes streamed since the last call.
    pub fn crashes(&mut self) -> Vec<Crash> {
        let mut out = Vec::new();
        while let Some(item) = self.crashes.next() {
            if item.len() >= std::mem::size_of::<CrashEvent>() {
                // SAFETY: the kernel wrote a CrashEvent (repr(C), any bit pattern valid); the
                // read is unaligned-safe.
                let e = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<CrashEvent>()) };
                out.push(Crash::from_event(&e));
            }
        }
        out
    }

    /// Deletes the entries of `services` (gone, already read), as the syscall collector does.
    pub fn reclaim(&mut self, services: &BTreeSet<u32>) -> usize {
        if services.is_empty() {
            return 0;
        }
        let hist: Vec<u32> = self
            .runq
            .keys()
            .flatten()
            .filter(|s| services.contains(s))
            .collect();
        let events: Vec<ProcKey> = self
            .events
            .keys()
            .flatten()
            .filter(|k| services.contains(&k.service))
            .collect();
        let mut n = 0;
        for key in &hist {
            n += usize::from(self.runq.remove(key).is_ok());
        }
        for key in &events {
            n += usize::from(self.events.remove(key).is_ok());
        }
        for s in services {
            n += usize::from(self.exec_starts.remove(s).is_some());
        }
        n
    }

    pub fn usage(&self) -> Vec<MapUsage> {
        vec![
            MapUsage::of("RUNQ_HIST", self.runq.keys().count(), self.runq.map()),
            MapUsage::of("PROC_EVENTS", self.events.keys().count(), self.events.map()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_line_names_service_pid_comm_and_signal() {
        let mut comm = [0u8; 16];
        comm[..6].copy_from_slice(b"engine");
        let c = Crash::from_event(&CrashEvent {
            tgid: 1234,
            service: 3,
            code: 11,
            _pad: 0,
            comm,
        });
        assert_eq!(
            c.line("trading-engine"),
            "service trading-engine: process 1234 (engine) killed by SIGSEGV"
        );
        let dumped = Crash::from_event(&CrashEvent {
            code: 6 | 0x80,
            ..CrashEvent {
                tgid: 1,
                service: 0,
                code: 0,
                _pad: 0,
                comm,
            }
        });
        assert!(
            dumped
                .line("x")
                .ends_with("killed by SIGABRT (core dumped)")
        );
    }

    #[test]
    fn hooks_setting() {
        assert_eq!(parse_hooks(None).ok(), Some(RunqueueHooks::SchedInfo));
        assert_eq!(
            parse_hooks(Some("auto")).ok(),
            Some(RunqueueHooks::SchedInfo)
        );
        assert_eq!(
            parse_hooks(Some("timestamps")).ok(),
            Some(RunqueueHooks::Timestamps)
        );
        assert_eq!(
            parse_hooks(Some("raw_tracepoint")).ok(),
            Some(RunqueueHooks::Raw)
        );
        let err = parse_hooks(Some("kprobe")).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "WS1_PROBE_SCHED_HOOKS=\"kprobe\" is not a known setting: use auto (tp_btf where the kernel allows), timestamps or raw_tracepoint"
            )
        );
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(31), "SIGSYS");
        assert_eq!(signal_name(34), "SIGRTMIN+0");
        assert_eq!(signal_name(0), "signal 0");
        assert_eq!(signal_name(99), "signal 99");
    }
}
