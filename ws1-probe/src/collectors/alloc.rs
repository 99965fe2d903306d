//! Allocations, precise mode, userspace half: finds each target's C allocator and attaches the
//! malloc-family uprobes to it, scoped to that process, then reads outstanding allocations,
//! their stacks and the per-service counters.

use std::{
    collections::BTreeMap,
    num::NonZeroU32,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuHashMap, StackTraceMap},
    programs::{
        ProgramError, UProbe,
        uprobe::{UProbeLinkId, UProbeScope},
    },
};
use ws1_probe_common::alloc::{
    AllocInfo, AllocKey, AllocSite, AllocSiteKey, AllocStats, top_stack_index,
};

use super::{take_map, typed};
use crate::{
    allocator::{self, Inspection, Plan},
    ebpf::{LoadError, attach_reason, load_error},
};

#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("cannot read /proc/{pid}/maps: {source}")]
    Maps {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pid {pid} maps no C allocator (libc.so): is it statically linked or using a custom allocator?"
    )]
    NoAllocator { pid: u32 },
}

/// Which allocator to trace: found by itself ([`crate::allocator::inspect`]) unless a binary
/// (`--alloc-lib`: a statically linked program, or a library such as jemalloc) or a prefix of
/// its function names (`--alloc-prefix je_`) is named.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllocatorSpec {
    /// Path of the binary holding the allocator, as the process sees it; `exe` means the
    /// process's own executable.
    pub lib: Option<String>,
    /// Prefix of the allocator's symbol names.
    pub prefix: String,
}

impl AllocatorSpec {
    fn to_override(&self) -> allocator::Override {
        allocator::Override {
            lib: self.lib.clone(),
            prefix: self.prefix.clone(),
        }
    }
}

/// Where a process's C library lives, as seen from this mount namespace.
pub fn allocator_path(pid: u32) -> Result<PathBuf, AllocError> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|source| AllocError::Maps { pid, source })?;
    let lib = find_libc(&maps).ok_or(AllocError::NoAllocator { pid })?;
    // Through the process's root, so a containerised process's own libc is used.
    Ok(Path::new(&format!("/proc/{pid}/root")).join(lib.trim_start_matches('/')))
}

/// The path of the mapped libc in the text of /proc/PID/maps.
pub fn find_libc(maps: &str) -> Option<&str> {
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| allocator::lib_kind(path) == Some(allocator::Kind::Glibc))
}

/// What precise mode does with one process: the allocators hooked, or why its allocations are
/// not observed.
pub type ProcessAllocators = Inspection;

pub struct AllocCollector {
    allocs: HashMap<MapData, AllocKey, AllocInfo>,
    stacks: StackTraceMap<MapData>,
    /// Calling functions only, where `stacks` had no room (`top_stack_id`).
    top_stacks: StackTraceMap<MapData>,
    stats: PerCpuHashMap<MapData, u32, AllocStats>,
    sites: HashMap<MapData, AllocSiteKey, AllocSite>,
    precise_pids: HashMap<MapData, u32, u32>,
    mmaps: HashMap<MapData, AllocKey, u64>,
    /// Processes whose allocators are hooked.
    pub pids: Vec<u32>,
    /// What was found in each process handled (hooked or not), until it exits.
    pub processes: BTreeMap<u32, ProcessAllocators>,
    /// Every attachment, to detach those of exited processes.
    links: Vec<(u32, &'static str, UProbeLinkId)>,
}

impl AllocCollector {
    /// Loads the programs and attaches them to the allocator of each pid.
    pub fn attach(
        ebpf: &mut Ebpf,
        pids: &[u32],
        spec: &dyn Fn(u32) -> AllocatorSpec,
    ) -> Result<Self, AllocError> {
        let mut collector = Self {
            allocs: typed("ALLOCS", take_map(ebpf, "ALLOCS")?)?,
            stacks: typed("ALLOC_STACKS", take_map(ebpf, "ALLOC_STACKS")?)?,
            top_stacks: typed("ALLOC_TOP_STACKS", take_map(ebpf, "ALLOC_TOP_STACKS")?)?,
            stats: typed("ALLOC_STATS", take_map(ebpf, "ALLOC_STATS")?)?,
            sites: typed("ALLOC_SITES", take_map(ebpf, "ALLOC_SITES")?)?,
            precise_pids: typed("PRECISE_PIDS", take_map(ebpf, "PRECISE_PIDS")?)?,
            mmaps: typed("ALLOC_MMAPS", take_map(ebpf, "ALLOC_MMAPS")?)?,
            pids: Vec::new(),
            processes: BTreeMap::new(),
            links: Vec::new(),
        };
        // The syscall side: anonymous mmap/munmap and brk outside the allocator. Kernels built
        // without syscall tracepoints lose only these counters.
        for (program, event) in [
            ("alloc_mmap_enter", "sys_enter_mmap"),
            ("alloc_mmap_exit", "sys_exit_mmap"),
            ("alloc_munmap_enter", "sys_enter_munmap"),
            ("alloc_brk_exit", "sys_exit_brk"),
        ] {
            if let Err(err) = crate::ebpf::attach_tracepoint(ebpf, program, "syscalls", event) {
                tracing::warn!(
                    "mmap/munmap/brk are not counted: {err}; malloc-family tracing goes on (`ws1-probe check` lists what this kernel allows)"
                );
                break;
            }
        }
        collector.add_pids(ebpf, pids, spec)?;
        Ok(collector)
    }

    /// Attaches to the allocator of each pid not traced yet (new processes of a precise-mode
    /// service). Processes that exited meanwhile are skipped.
    pub fn add_pids(
        &mut self,
        ebpf: &mut Ebpf,
        pids: &[u32],
        spec: &dyn Fn(u32) -> AllocatorSpec,
    ) -> Result<usize, AllocError> {
        let mut added = 0;
        for &pid in pids {
            if self.processes.contains_key(&pid) {
                continue;
            }
            let found = match allocator::inspect(pid, &spec(pid).to_override()) {
                Ok(found) => found,
                // Exited meanwhile.
                Err(_) => continue,
            };
            let outcome = match found {
                Inspection::Observed { allocators } => self.hook(ebpf, pid, allocators)?,
                not => not,
            };
            match &outcome {
                Inspection::Observed { allocators } => {
                    let what: Vec<String> = allocators.iter().map(Plan::describe).collect();
                    tracing::debug!("pid {pid}: allocations hooked in {}", what.join(", "));
                    let _ = self.precise_pids.insert(pid, 1, 0);
                    self.pids.push(pid);
                    added += 1;
                }
                Inspection::NotObserved { reason } => {
                    tracing::warn!("pid {pid}: allocations not observed: {reason}");
                }
            }
            self.processes.insert(pid, outcome);
        }
        Ok(added)
    }

    /// Attaches every planned hook of `pid`; keeps the allocators with at least one allocating
    /// and one freeing hook attached.
    fn hook(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
        allocators: Vec<Plan>,
    ) -> Result<Inspection, AllocError> {
        let mut hooked = Vec::new();
        let mut failures = Vec::new();
        for mut plan in allocators {
            let path = plan.binary.open_path(pid);
            let mut attached = Vec::new();
            for hook in std::mem::take(&mut plan.hooks) {
                let link = match attach_one(ebpf, hook.program, hook.offset, &path, pid)? {
                    Ok(link) => link,
                    Err(reason) => {
                        failures.push(format!("{}: {reason}", hook.symbol));
                        continue;
                    }
                };
                if let Some(ret) = allocator::return_program(hook.program) {
                    match attach_one(ebpf, ret, hook.offset, &path, pid)? {
                        Ok(ret_link) => self.links.push((pid, ret, ret_link)),
                        Err(reason) => {
                            detach(ebpf, hook.program, link);
                            failures.push(format!("{}: {reason}", hook.symbol));
                            continue;
                        }
                    }
                }
                self.links.push((pid, hook.program, link));
                attached.push(hook);
            }
            plan.hooks = attached;
            if plan.usable() {
                hooked.push(plan);
            }
        }
        for failure in &failures {
            tracing::debug!("pid {pid}: not hooked: {failure}");
        }
        Ok(if hooked.is_empty() {
            Inspection::NotObserved {
                reason: format!(
                    "its allocator's entry points could not be attached ({})",
                    failures.first().map_or("none found", String::as_str)
                ),
            }
        } else {
            Inspection::Observed { allocators: hooked }
        })
    }

    /// Detaches the probes of processes that have exited (each holds a perf event open).
    pub fn prune(&mut self, ebpf: &mut Ebpf) {
        let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
        for pid in self.pids.iter().filter(|pid| !alive(**pid)) {
            let _ = self.precise_pids.remove(pid);
        }
        self.pids.retain(|pid| alive(*pid));
        self.processes.retain(|pid, _| alive(*pid));
        let (keep, gone): (Vec<_>, Vec<_>) =
            self.links.drain(..).partition(|(pid, _, _)| alive(*pid));
        self.links = keep;
        for (_, program, link) in gone {
            detach(ebpf, program, link);
        }
    }

    /// Anonymous regions mapped outside the allocator and not unmapped: (regions, bytes).
    pub fn mapped(&self) -> (u64, u64) {
        self.mmaps
            .iter()
            .flatten()
            .fold((0, 0), |(n, b), (_, len)| (n + 1, b + len))
    }

    /// Outstanding allocations.
    pub fn outstanding(&self) -> Vec<(AllocKey, AllocInfo)> {
        self.allocs.iter().flatten().collect()
    }

    /// Return addresses of a stack, innermost first; empty when unknown.
    pub fn stack(&self, stack_id: i32) -> Vec<u64> {
        let (map, id) = match (u32::try_from(stack_id), top_stack_index(stack_id)) {
            (Ok(id), _) => (&self.stacks, id),
            (_, Some(id)) => (&self.top_stacks, id),
            _ => return Vec::new(),
        };
        map.get(&id, 0)
            .map(|trace| trace.frames().iter().map(|f| f.ip).collect())
            .unwrap_or_default()
    }

    /// Everything allocated per (service, stack) since attaching, freed or not.
    pub fn sites(&self) -> Vec<(AllocSiteKey, AllocSite)> {
        self.sites.iter().flatten().collect()
    }

    /// Per-service counters summed over CPUs.
    pub fn stats(&self) -> BTreeMap<u32, AllocStats> {
        let mut out = BTreeMap::new();
        for (service, per_cpu) in self.stats.iter().flatten() {
            let total = out.entry(service).or_insert(AllocStats::ZERO);
            for s in per_cpu.iter() {
                total.add(s);
            }
        }
        out
    }

    /// Removes the outstanding allocations of processes that have exited, so their entries do
    /// not outlive them. Returns how many were removed.
    pub fn sweep_exited(&mut self) -> usize {
        let gone = |k: &AllocKey| !Path::new(&format!("/proc/{}", k.tgid)).exists();
        let dead_maps: Vec<AllocKey> = self.mmaps.keys().flatten().filter(gone).collect();
        for k in &dead_maps {
            let _ = self.mmaps.remove(k);
        }
        let dead: Vec<AllocKey> = self.allocs.keys().flatten().filter(gone).collect();
        dead.iter()
            .filter(|k| self.allocs.remove(k).is_ok())
            .count()
    }
}

fn detach(ebpf: &mut Ebpf, program: &str, link: UProbeLinkId) {
    let prog: Option<&mut UProbe> = ebpf.program_mut(program).and_then(|p| p.try_into().ok());
    if let Some(prog) = prog {
        let _ = prog.detach(link);
    }
}

/// Attaches `program` at `offset` of `lib`, scoped to `pid`. The outer error is a broken
/// object; the inner one why this function could not be hooked.
fn attach_one(
    ebpf: &mut Ebpf,
    program: &str,
    offset: u64,
    lib: &Path,
    pid: u32,
) -> Result<Result<UProbeLinkId, String>, AllocError> {
    let prog: &mut UProbe = ebpf
        .program_mut(program)
        .ok_or_else(|| LoadError::MissingProgram {
            program: program.to_owned(),
        })?
        .try_into()
        .map_err(|e: ProgramError| load_error(program, e))?;
    if prog.fd().is_err() {
        prog.load().map_err(|e| load_error(program, e))?;
    }
    let scope = NonZeroU32::new(pid).map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess);
    Ok(prog
        .attach(offset, lib, scope)
        .map_err(|err| attach_reason(&err)))
}

/// What a set of processes has done so far, from procfs: the yardstick of precise mode's cost,
/// read before attaching and while attached.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Activity {
    /// CPU time (user + system), seconds.
    pub cpu_seconds: f64,
    /// read/write-family system calls (`syscr` + `syscw` of /proc/PID/io): requests served, for
    /// a server.
    pub syscalls: u64,
}

/// The summed activity of `pids` (processes that cannot be read count nothing).
pub fn activity(pids: &[u32]) -> Activity {
    let ticks = procfs::ticks_per_second().max(1) as f64;
    let mut total = Activity::default();
    for &pid in pids {
        let Ok(process) = procfs::process::Process::new(pid as i32) else {
            continue;
        };
        if let Ok(stat) = process.stat() {
            total.cpu_seconds += (stat.utime + stat.stime) as f64 / ticks;
        }
        if let Ok(io) = process.io() {
            total.syscalls += io.syscr + io.syscw;
        }
    }
    total
}

/// A leak suspect exported as `ws1_probe_leak_suspect_bytes`.
#[derive(Clone, Debug, PartialEq)]
pub struct Suspect {
    pub service: u32,
    pub stack_id: i32,
    pub bytes: u64,
    /// Change of `bytes` per second since the previous refresh: a stack whose old blocks keep
    /// adding up is the typical leak; a large but flat one is more likely a cache.
    pub growth_bytes_per_second: f64,
    /// The allocating function (top frame), for the label.
    pub function: String,
}

/// How many suspects the agent exports (bounded cardinality).
pub const SUSPECTS: usize = 10;
/// Blocks younger than this are not suspects.
pub const SUSPECT_MIN_AGE: std::time::Duration = std::time::Duration::from_secs(30);

impl AllocCollector {
    /// The largest groups of blocks outstanding for [`SUSPECT_MIN_AGE`] or more, by stack. Walks
    /// the whole outstanding map: call it every few tens of seconds, not per scrape.
    /// Growing stacks rank first, then the largest; `previous` is the last result, `elapsed`
    /// the seconds since it.
    pub fn suspects(&mut self, previous: &[Suspect], elapsed: f64) -> Vec<Suspect> {
        self.sweep_exited();
        let now = crate::units::monotonic_ns();
        let groups = group(&self.outstanding(), now, SUSPECT_MIN_AGE.as_nanos() as u64);
        let ranked = rank_suspects(&groups, previous, elapsed);
        let symbolizer = crate::symbolize::Symbolizer::new();
        ranked
            .into_iter()
            .take(SUSPECTS)
            .map(|(growth, g)| {
                let top = self
                    .stack(g.stack_id)
                    .into_iter()
                    .take(1)
                    .collect::<Vec<_>>();
                let frame = symbolizer.user_frames(g.pid, &top).into_iter().next();
                Suspect {
                    service: g.service,
                    stack_id: g.stack_id,
                    bytes: g.bytes,
                    growth_bytes_per_second: growth,
                    function: frame
                        .and_then(|f| f.function.or(Some(format!("{:#x}", f.addr))))
                        .unwrap_or_else(|| "unknown".to_owned()),
                }
            })
            .collect()
    }
}

/// Groups with their growth in bytes per second since `previous`, growing ones first, then by
/// size.
pub fn rank_suspects<'g>(
    groups: &'g [LeakGroup],
    previous: &[Suspect],
    elapsed: f64,
) -> Vec<(f64, &'g LeakGroup)> {
    let growth = |g: &LeakGroup| {
        previous
            .iter()
            .find(|p| p.service == g.service && p.stack_id == g.stack_id)
            .map_or(0.0, |p| {
                (g.bytes as f64 - p.bytes as f64) / elapsed.max(1.0)
            })
    };
    let mut ranked: Vec<(f64, &LeakGroup)> = groups.iter().map(|g| (growth(g), g)).collect();
    ranked.sort_by(|(ga, a), (gb, b)| (*gb > 0.0).cmp(&(*ga > 0.0)).then(b.bytes.cmp(&a.bytes)));
    ranked
}

/// Outstanding allocations sharing a service and an allocation stack.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LeakGroup {
    pub service: u32,
    pub stack_id: i32,
    pub bytes: u64,
    pub count: u64,
    pub oldest_age_ns: u64,
    /// A process holding these blocks (for symbolization).
    pub pid: u32,
}

/// Groups allocations at least `min_age_ns` old (at `now_ns`, same clock as the kernel's
/// `bpf_ktime_get_ns`), largest total first.
pub fn group(allocs: &[(AllocKey, AllocInfo)], now_ns: u64, min_age_ns: u64) -> Vec<LeakGroup> {
    let mut groups: BTreeMap<(u32, i32), LeakGroup> = BTreeMap::new();
    for (key, info) in allocs {
        let age = now_ns.saturating_sub(info.ts_ns);
        if age < min_age_ns {
            continue;
        }
        let g = groups
            .entry((info.service, info.stack_id))
            .or_insert(LeakGroup {
                service: info.service,
                stack_id: info.stack_id,
                bytes: 0,
                count: 0,
                oldest_age_ns: 0,
                pid: key.tgid,
            });
        g.bytes += info.size;
        g.count += 1;
        g.oldest_age_ns = g.oldest_age_ns.max(age);
    }
    let mut out: Vec<LeakGroup> = groups.into_values().collect();
    out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.stack_id.cmp(&b.stack_id)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_libc_in_maps() {
        let maps = "7f00-7f10 r--p 00000000 fe:01 123 /usr/lib/x86_64-linux-gnu/libm.so.6
7f10-7f20 r-xp 00028000 fe:01 456 /usr/lib/x86_64-linux-gnu/libc.so.6
7f20-7f30 rw-p 00000000 00:00 0 [heap]";
        assert_eq!(find_libc(maps), Some("/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert_eq!(
            find_libc("7f-8f r-xp 0 0:0 0 /lib/libc-2.31.so"),
            Some("/lib/libc-2.31.so")
        );
        assert_eq!(
            find_libc("7f-8f r-xp 0 0:0 0 /usr/lib/libcrypto.so.3"),
            None
        );
    }

    #[test]
    fn growing_stacks_rank_first() {
        use LeakGroup;
        let group = |stack_id, bytes| LeakGroup {
            service: 1,
            stack_id,
            bytes,
            count: 1,
            oldest_age_ns: 0,
            pid: 1,
        };
        let suspect = |stack_id, bytes| Suspect {
            service: 1,
            stack_id,
            bytes,
            growth_bytes_per_second: 0.0,
            function: String::new(),
        };
        // Stack 1 is large and flat, stack 2 small and growing by 300 B over 30 s.
        let groups = vec![group(1, 1_000_000), group(2, 600), group(3, 500)];
        let previous = vec![suspect(1, 1_000_000), suspect(2, 300)];
        let ranked = rank_suspects(&groups, &previous, 30.0);
        let order: Vec<i32> = ranked.iter().map(|(_, g)| g.stack_id).collect();
        assert_eq!(order, vec![2, 1, 3]);
        assert_eq!(ranked[0].0, 10.0);
        assert_eq!(ranked[1].0, 0.0);
    }

    #[test]
    fn own_allocator_is_found() {
        let lib = allocator_path(std::process::id()).unwrap();
        assert!(lib.to_string_lossy().contains("libc"), "{}", lib.display());
        assert!(lib.exists());
    }
}
