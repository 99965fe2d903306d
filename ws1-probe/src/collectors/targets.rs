//! Process targeting, userspace half: fills `TARGETS` from a /proc scan, answers exec events the
//! kernel could not decide, and caches per-comm decisions in `COMM_SERVICES`.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap, MapData, PerCpuArray, RingBuf},
};
use ws1_probe_common::targets::{Comm, DropReason, ExecEvent, SERVICE_NONE};

use super::{MapUsage, take_map, typed};
use crate::{
    ebpf::{LoadError, attach_tracepoint},
    targeting::{Matcher, ProcessInfo, TargetSpec, process::list_pids},
};

/// Result of the start-up scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanSummary {
    pub seen: usize,
    pub targeted: usize,
}

pub struct Targets {
    matcher: Matcher,
    proc_root: PathBuf,
    targets: HashMap<MapData, u32, u32>,
    filter: Array<MapData, u16>,
    comm_services: HashMap<MapData, Comm, u32>,
    drops: PerCpuArray<MapData, u64>,
    /// Starts decided here (service id → execs that moved a process into it) since the last
    /// [`Targets::take_exec_starts`]; the kernel counts forks and the execs it decides.
    exec_starts: std::collections::BTreeMap<u32, u64>,
    /// Processes an exec event moved into a service since the last
    /// [`Targets::take_exec_targeted`]: a `listen()` they made before the decision reached the
    /// kernel was not seen there, so their listening ports are read from /proc.
    exec_targeted: Vec<u32>,
    /// Processes the agent could not add to `TARGETS` (full, or refused otherwise), counted with
    /// the kernel's `TargetsFull` drops so the drop warning (one per interval, naming
    /// `--map-entries TARGETS=N`) covers them: a scan of 10,000 processes into a full map logs
    /// one line, not 10,000.
    refused: u64,
}

impl Targets {
    /// Attaches the fork/exec/exit programs. Do this before [`Targets::scan`] so that no process
    /// forked during the scan is missed.
    pub fn attach(
        ebpf: &mut Ebpf,
        matcher: Matcher,
    ) -> Result<(Self, RingBuf<MapData>), LoadError> {
        attach_tracepoint(ebpf, "task_newtask", "task", "task_newtask")?;
        attach_tracepoint(ebpf, "sched_process_exec", "sched", "sched_process_exec")?;
        attach_tracepoint(ebpf, "sched_process_exit", "sched", "sched_process_exit")?;
        let targets = typed("TARGETS", take_map(ebpf, "TARGETS")?)?;
        let filter = typed("TARGET_FILTER", take_map(ebpf, "TARGET_FILTER")?)?;
        let comm_services = typed("COMM_SERVICES", take_map(ebpf, "COMM_SERVICES")?)?;
        let drops = typed("DROPS", take_map(ebpf, "DROPS")?)?;
        let ring = typed("EXEC_EVENTS", take_map(ebpf, "EXEC_EVENTS")?)?;
        Ok((
            Self {
                matcher,
                proc_root: PathBuf::from("/proc"),
                targets,
                filter,
                comm_services,
                drops,
                exec_starts: std::collections::BTreeMap::new(),
                exec_targeted: Vec::new(),
                refused: 0,
            },
            ring,
        ))
    }

    pub fn matcher(&self) -> &Matcher {
        &self.matcher
    }

    /// Decides every existing process. Processes that vanish mid-scan are skipped.
    pub fn scan(&mut self) -> std::io::Result<ScanSummary> {
        self.decide_running()
    }

    /// Applies new rules (a configuration reload) without detaching anything: forgets the
    /// kernel's per-command-name decisions and re-decides every running process. Service ids
    /// are kept (see [`Matcher::respec`]), so no count moves to another label.
    pub fn reload(&mut self, spec: TargetSpec) -> std::io::Result<ScanSummary> {
        self.matcher.respec(spec);
        let cached: Vec<Comm> = self.comm_services.keys().flatten().collect();
        for comm in cached {
            let _ = self.comm_services.remove(&comm);
        }
        self.decide_running()
    }

    /// Decides every running process and records the decisions that differ from the kernel's.
    fn decide_running(&mut self) -> std::io::Result<ScanSummary> {
        let needs = self.matcher.needs();
        let mut summary = ScanSummary::default();
        for pid in list_pids(&self.proc_root)? {
            let Ok(info) = ProcessInfo::read(&self.proc_root, pid, needs) else {
                continue;
            };
            summary.seen += 1;
            let decision = self.matcher.decide(&info);
            summary.targeted += usize::from(decision.is_some());
            if decision != self.targets.get(&pid, 0).ok() {
                self.set(pid, decision);
            }
        }
        Ok(summary)
    }

    /// Re-decides a process after an exec the kernel could not decide alone.
    pub fn handle_exec(&mut self, event: &ExecEvent) {
        let comm = ProcessInfo::comm_from_kernel(&event.comm);
        let needs = self.matcher.needs();
        let info = if needs.exe || needs.cgroup {
            match ProcessInfo::read(&self.proc_root, event.tgid, needs) {
                Ok(mut info) => {
                    info.comm = comm;
                    info
                }
                // Gone already: its exit removed the entry.
                Err(_) => return,
            }
        } else {
            ProcessInfo {
                pid: event.tgid,
                comm,
                exe: None,
                cgroup: None,
                // Kernel threads do not exec.
                kthread: false,
            }
        };
        let decision = self.matcher.decide(&info);
        if let Some(service) = decision.filter(|s| *s != event.prev_service) {
            // The exec moved the process into a service: one of its starts.
            *self.exec_starts.entry(service).or_insert(0) += 1;
        }
        if decision != Some(event.prev_service) || event.prev_service == SERVICE_NONE {
            self.set(event.tgid, decision);
            // Only a process nobody observed before: one that inherited a service had its
            // `listen()` recorded in the kernel already (and host mode, where every process
            // has one, reads no /proc per exec).
            if decision.is_some() && event.prev_service == SERVICE_NONE {
                self.exec_targeted.push(event.tgid);
            }
        }
        if self.matcher.comm_only() {
            // Later execs of this name are decided in the kernel.
            let _ = self
                .comm_services
                .insert(event.comm, decision.unwrap_or(SERVICE_NONE), 0);
        }
    }

    /// Processes targeted by exec decisions since the last call (see `exec_targeted`).
    pub fn take_exec_targeted(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.exec_targeted)
    }

    /// Starts decided by the agent since the last call (see `collectors/sched.rs`).
    pub fn take_exec_starts(&mut self) -> std::collections::BTreeMap<u32, u64> {
        std::mem::take(&mut self.exec_starts)
    }

    /// Drains pending exec events without blocking.
    pub fn drain(&mut self, ring: &mut RingBuf<MapData>) -> usize {
        let mut n = 0;
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<ExecEvent>() {
                // SAFETY: the kernel wrote an ExecEvent (repr(C), any bit pattern valid); the
                // read is unaligned-safe.
                let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ExecEvent>()) };
                drop(item);
                self.handle_exec(&event);
                n += 1;
            }
        }
        n
    }

    /// Records a decision in both kernel maps (see ws1-probe-ebpf/src/targets.rs).
    fn set(&mut self, tgid: u32, service: Option<u32>) {
        match service {
            Some(service) => {
                if let Err(err) = self.targets.insert(tgid, service, 0) {
                    self.refused += 1;
                    tracing::debug!("cannot target pid {tgid}: {err}; it is not observed");
                    return;
                }
                // Service ids are capped at COMM_ENTRIES, far below u16::MAX.
                let slot = u16::try_from(service + 1).unwrap_or(u16::MAX);
                if let Err(err) = self.filter.set(tgid, slot, 0) {
                    tracing::warn!(
                        "cannot target pid {tgid}: {err}; it is not observed (a pid above kernel.pid_max as it was at start-up: restart the agent after raising pid_max)"
                    );
                }
            }
            None => {
                let _ = self.targets.remove(&tgid);
                let _ = self.filter.set(tgid, 0, 0);
            }
        }
    }

    /// Targeted processes per service id (walks the map; called per scrape).
    pub fn targeted_by_service(&self) -> std::collections::BTreeMap<u32, u64> {
        let mut out = std::collections::BTreeMap::new();
        for (_, service) in self.targets.iter().flatten() {
            *out.entry(service).or_insert(0) += 1;
        }
        out
    }

    /// (pid, service id) of every targeted process.
    pub fn targeted_pairs(&self) -> Vec<(u32, u32)> {
        self.targets.iter().flatten().collect()
    }

    /// Pids of the targeted processes.
    pub fn targeted_pids(&self) -> Vec<u32> {
        self.targets.keys().flatten().collect()
    }

    /// Whether `pid` has an entry in `TARGETS`.
    pub fn is_targeted(&self, pid: u32) -> bool {
        self.targets.get(&pid, 0).is_ok()
    }

    /// Dropped events per reason, summed over CPUs.
    pub fn drops(&self) -> Vec<(DropReason, u64)> {
        DropReason::ALL
            .iter()
            .map(|reason| {
                let total = self
                    .drops
                    .get(&(*reason as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                let refused = match reason {
                    DropReason::TargetsFull => self.refused,
                    _ => 0,
                };
                (*reason, total + refused)
            })
            .collect()
    }

    pub fn usage(&self) -> Vec<MapUsage> {
        vec![
            MapUsage::of("TARGETS", self.targets.keys().count(), self.targets.map()),
            MapUsage::of(
                "COMM_SERVICES",
                self.comm_services.keys().count(),
                self.comm_services.map(),
            ),
        ]
    }

    /// For tests: scan a different /proc.
    pub fn set_proc_root(&mut self, root: &Path) {
        self.proc_root = root.to_owned();
    }
}
