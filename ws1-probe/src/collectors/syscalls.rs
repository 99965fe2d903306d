//! Syscall latency, userspace half: attaches sys_enter/sys_exit and reads the histograms and
//! the per-CPU error counters into a [`SyscallSnapshot`].

use std::collections::BTreeMap;

use aya::{
    Ebpf,
    maps::{HashMap, IterableMap, MapData, PerCpuHashMap},
};
use ws1_probe_common::{
    hist::LatencyHist,
    syscalls::{SyscallErrorKey, SyscallKey, SyscallStart},
};

use super::{MapUsage, take_map, typed};
use crate::{
    ebpf::{LoadError, attach_raw_tracepoint},
    histogram::Histogram,
};

/// Everything the syscall probe has counted since it was attached.
#[derive(Clone, Debug, Default)]
pub struct SyscallSnapshot {
    /// (service id, syscall nr) → latency histogram summed over CPUs.
    pub hists: BTreeMap<(u32, u32), Histogram>,
    /// (service id, syscall nr, errno) → failed calls.
    pub errors: BTreeMap<(u32, u32, u32), u64>,
}

impl SyscallSnapshot {
    /// Total calls per service id (the activity that ranks services in host mode).
    pub fn calls_by_service(&self) -> BTreeMap<u32, u64> {
        let mut out = BTreeMap::new();
        for ((service, _), h) in &self.hists {
            *out.entry(*service).or_insert(0) += h.count;
        }
        out
    }

    /// Histograms and error counts per syscall, summed over services.
    pub fn by_syscall(&self) -> BTreeMap<u32, (Histogram, u64)> {
        let mut out: BTreeMap<u32, (Histogram, u64)> = BTreeMap::new();
        for ((_, nr), h) in &self.hists {
            out.entry(*nr).or_default().0.add(h);
        }
        for ((_, nr, _), n) in &self.errors {
            out.entry(*nr).or_default().1 += n;
        }
        out
    }

    /// Total observations.
    pub fn total_calls(&self) -> u64 {
        self.hists.values().map(|h| h.count).sum()
    }
}

pub struct SyscallCollector {
    hist: HashMap<MapData, SyscallKey, LatencyHist>,
    errors: PerCpuHashMap<MapData, SyscallErrorKey, u64>,
    start: HashMap<MapData, u32, SyscallStart>,
}

impl SyscallCollector {
    /// Attaches the raw tracepoints. Raw tracepoints are the cheapest syscall hook every kernel
    /// since 4.17 offers (no fentry equivalent exists for the generic syscall path).
    /// When `enabled` is false the maps are taken but nothing is attached: they stay empty.
    pub fn attach(ebpf: &mut Ebpf, enabled: bool) -> Result<Self, LoadError> {
        if enabled {
            attach_raw_tracepoint(ebpf, "sys_enter", "sys_enter")?;
            attach_raw_tracepoint(ebpf, "sys_exit", "sys_exit")?;
        }
        Ok(Self {
            hist: typed("SYSCALL_HIST", take_map(ebpf, "SYSCALL_HIST")?)?,
            errors: typed("SYSCALL_ERRORS", take_map(ebpf, "SYSCALL_ERRORS")?)?,
            start: typed("SYSCALL_START", take_map(ebpf, "SYSCALL_START")?)?,
        })
    }

    /// Reads both maps. Entries that disappear mid-walk are skipped.
    pub fn snapshot(&self) -> SyscallSnapshot {
        let mut snap = SyscallSnapshot::default();
        for (key, hist) in self.hist.iter().flatten() {
            snap.hists
                .entry((key.service, key.nr))
                .or_default()
                .add_kernel(&hist);
        }
        for (key, per_cpu) in self.errors.iter().flatten() {
            *snap
                .errors
                .entry((key.service, key.nr, key.errno))
                .or_insert(0) += per_cpu.iter().sum::<u64>();
        }
        snap
    }

    /// Deletes the histogram and error entries of `services` (whose processes are gone and
    /// whose counts the caller has already read), so the maps hold live services only. Returns
    /// how many entries were deleted.
    pub fn reclaim(&mut self, services: &std::collections::BTreeSet<u32>) -> usize {
        if services.is_empty() {
            return 0;
        }
        let hist: Vec<SyscallKey> = self
            .hist
            .keys()
            .flatten()
            .filter(|k| services.contains(&k.service))
            .collect();
        let errors: Vec<SyscallErrorKey> = self
            .errors
            .keys()
            .flatten()
            .filter(|k| services.contains(&k.service))
            .collect();
        let mut n = 0;
        for key in &hist {
            n += usize::from(self.hist.remove(key).is_ok());
        }
        for key in &errors {
            n += usize::from(self.errors.remove(key).is_ok());
        }
        n
    }

    pub fn usage(&self) -> Vec<MapUsage> {
        vec![
            MapUsage::of("SYSCALL_START", self.start.keys().count(), self.start.map()),
            MapUsage::of("SYSCALL_HIST", self.hist.keys().count(), self.hist.map()),
            MapUsage::of(
                "SYSCALL_ERRORS",
                self.errors.keys().count(),
                self.errors.map(),
            ),
        ]
    }
}
