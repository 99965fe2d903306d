//! The profiler's userspace half: attaches the cpu-clock sampler (and, for off-CPU profiles,
//! `sched:sched_switch`), chooses frame-pointer or DWARF unwinding per process, unwinds the
//! streamed DWARF samples, and reads the kernel's counts as raw stacks that
//! [`symbolize`] turns into a [`Profile`].

use std::{collections::HashMap, path::Path};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, IterableMap, MapData, RingBuf, StackTraceMap},
    programs::perf_event::{SamplePolicy, SoftwareEvent},
};
use ws1_probe_common::{
    profile::{
        LeafText, OffCpuValue, ProfileKey, ProfileSettings, SAMPLE_OFFCPU, STACK_COPY_BYTES,
        StackSampleEvent,
    },
    python::{PyProc, PyStack},
};

use super::{MapUsage, take_map, typed};
pub use crate::profile::raw::{RawProfile, RawStack, reaches_root, symbolize};
use crate::{
    ebpf::{LoadError, attach_raw_tracepoint, attach_tracepoint},
    profile::{
        binary::{CacheBudgets, CacheStat},
        fpcheck::FpCache,
        leaf::LeafResolver,
        python::PyTargets,
        runtime::{self, Runtime},
        unwind::{DwarfUnwinder, MAX_FRAMES, Unwound, UserRegs},
    },
};

pub use crate::targeting::config::{
    AGENT_FREQUENCY_HZ, CLI_FREQUENCY_HZ, DEFAULT_OFFCPU_MIN_NS, ProfileOptions, UnwindMode,
};

/// Stack samples per second per CPU the DWARF ring buffer must absorb: the sampling rate, or
/// for off-CPU profiles one block per millisecond threshold at most (capped at 1000/s).
pub fn sample_rate_hz(options: &ProfileOptions) -> u64 {
    let blocks = if options.off_cpu {
        (1_000_000_000 / options.offcpu_min_ns.max(1)).min(1_000)
    } else {
        0
    };
    options.frequency_hz.max(blocks)
}

/// Load-time settings of the kernel part: the threshold and the `sched_switch` field offsets.
pub fn kernel_settings(tracefs: &Path, offcpu_min_ns: u64) -> ProfileSettings {
    let mut s = ProfileSettings::FALLBACK;
    s.offcpu_min_ns = offcpu_min_ns;
    s.task_pid = crate::ebpf::kernel_offsets().task_struct_pid;
    if let Ok(format) = std::fs::read_to_string(tracefs.join("events/sched/sched_switch/format")) {
        let field = |name| crate::ebpf::parse_format_offset(&format, name);
        if let (Some(p), Some(st), Some(n)) =
            (field("prev_pid"), field("prev_state"), field("next_pid"))
        {
            s.switch_prev_pid = p;
            s.switch_prev_state = st;
            s.switch_next_pid = n;
        }
    }
    s
}

/// Key of the DWARF aggregates kept in userspace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DwarfKey {
    tgid: u32,
    service: u32,
    kernel_stack: i32,
    user: Vec<u64>,
    complete: bool,
    python_stack: u32,
}

/// Converts a kernel stack trace into lookup addresses.
fn lookup_addrs(ips: impl Iterator<Item = u64>) -> Vec<u64> {
    ips.enumerate()
        .map(|(i, ip)| if i == 0 { ip } else { ip.saturating_sub(1) })
        .collect()
}

pub struct ProfileCollector {
    counts: BpfHashMap<MapData, ProfileKey, u64>,
    offcpu: BpfHashMap<MapData, ProfileKey, OffCpuValue>,
    stacks: StackTraceMap<MapData>,
    dwarf_pids: BpfHashMap<MapData, u32, u32>,
    /// Frame-pointer-mode processes with frameless code: their main executable's text.
    leaf_pids: BpfHashMap<MapData, u32, LeafText>,
    /// Callers of frameless leaves (`profile/leaf.rs`).
    leaf: LeafResolver,
    ring: RingBuf<MapData>,
    py_procs: BpfHashMap<MapData, u32, PyProc>,
    py_stacks: BpfHashMap<MapData, u32, PyStack>,
    /// CPython processes whose frame chains the kernel walks.
    pub python: PyTargets,
    /// Python stacks read so far.
    py_cache: HashMap<u32, Vec<u64>>,
    pub options: ProfileOptions,
    unwinder: DwarfUnwinder,
    /// Reused unwinding buffer.
    unwound: Unwound,
    fp: FpCache,
    /// Processes seen, and whether they are unwound with DWARF.
    modes: HashMap<u32, bool>,
    /// The runtime of each process seen, decided while it runs (see [`runtime::detect`]).
    runtimes: HashMap<u32, Runtime>,
    /// Kernel values already reported, so each drain reports what is new.
    seen_cpu: HashMap<ProfileKey, u64>,
    seen_off: HashMap<ProfileKey, OffCpuValue>,
    /// Stack traces read so far (ids stay valid until a reset).
    stack_cache: HashMap<i32, Vec<u64>>,
    dwarf_cpu: HashMap<DwarfKey, u64>,
    dwarf_off: HashMap<DwarfKey, (u64, u64)>,
    /// Samples unwound from copies.
    pub dwarf_samples: u64,
}

impl ProfileCollector {
    /// Attaches the sampler on every online CPU (and the off-CPU hooks when asked).
    pub fn attach(ebpf: &mut Ebpf, options: &ProfileOptions) -> Result<Self, LoadError> {
        if options.frequency_hz > 0 {
            attach_sampler(ebpf, options.frequency_hz)?;
        }
        if options.off_cpu {
            // Every context switch of the machine runs it: prefer the raw tracepoint (no
            // record to fill; needs `task_struct.pid` from BTF and Linux 5.18's 4 arguments).
            let raw = crate::ebpf::kernel_offsets().task_struct_pid != u32::MAX
                && attach_raw_tracepoint(ebpf, "profile_sched_switch_raw", "sched_switch").is_ok();
            if !raw {
                attach_tracepoint(ebpf, "profile_sched_switch", "sched", "sched_switch")?;
            }
            // Only DWARF-mode processes need it; a kernel without it loses their user stacks
            // for blocks (they fall back to frame pointers), so it is not fatal.
            if options.unwind != UnwindMode::Fp
                && let Err(err) = attach_raw_tracepoint(ebpf, "profile_sys_exit", "sys_exit")
            {
                tracing::warn!(
                    "off-CPU: cannot attach raw_tp sys_exit ({err}); blocks of binaries without frame pointers use frame-pointer stacks (`ws1-probe check` lists what this kernel allows)"
                );
            }
        }
        Ok(Self {
            counts: typed("PROFILE_COUNTS", take_map(ebpf, "PROFILE_COUNTS")?)?,
            offcpu: typed("OFFCPU_TIME", take_map(ebpf, "OFFCPU_TIME")?)?,
            stacks: typed("PROFILE_STACKS", take_map(ebpf, "PROFILE_STACKS")?)?,
            dwarf_pids: typed("PROFILE_DWARF", take_map(ebpf, "PROFILE_DWARF")?)?,
            leaf_pids: typed("PROFILE_LEAF", take_map(ebpf, "PROFILE_LEAF")?)?,
            // Frameless ranges are 16 bytes per function at most: an eighth of the unwind
            // share holds those of hundreds of large binaries (the unwinder keeps the rest).
            leaf: LeafResolver::new(CacheBudgets::split(options.cache_bytes).unwind_binaries / 8),
            ring: typed("PROFILE_SAMPLES", take_map(ebpf, "PROFILE_SAMPLES")?)?,
            py_procs: typed("PY_PROCS", take_map(ebpf, "PY_PROCS")?)?,
            py_stacks: typed("PY_STACKS", take_map(ebpf, "PY_STACKS")?)?,
            python: PyTargets::default(),
            py_cache: HashMap::new(),
            options: options.clone(),
            unwinder: DwarfUnwinder::with_budget(
                MAX_FRAMES,
                CacheBudgets::split(options.cache_bytes).unwind_binaries / 8 * 7,
            ),
            unwound: Unwound::default(),
            fp: FpCache::default(),
            modes: HashMap::new(),
            runtimes: HashMap::new(),
            seen_cpu: HashMap::new(),
            seen_off: HashMap::new(),
            stack_cache: HashMap::new(),
            dwarf_cpu: HashMap::new(),
            dwarf_off: HashMap::new(),
            dwarf_samples: 0,
        })
    }

    /// Chooses the unwinding of new processes and forgets exited ones. `targets` are the
    /// targeted (pid, service) pairs. Returns the processes forgotten.
    pub fn update_targets(&mut self, targets: &[(u32, u32)]) -> Vec<u32> {
        let live: std::collections::HashSet<u32> = targets.iter().map(|(p, _)| *p).collect();
        let gone: Vec<u32> = self
            .modes
            .keys()
            .filter(|p| !live.contains(p))
            .copied()
            .collect();
        for pid in &gone {
            match self.modes.remove(pid) {
                Some(true) => {
                    let _ = self.dwarf_pids.remove(pid);
                }
                Some(false) => {
                    let _ = self.leaf_pids.remove(pid);
                }
                None => {}
            }
            self.unwinder.forget(*pid);
            self.leaf.forget(*pid);
        }
        self.runtimes.retain(|pid, _| live.contains(pid));
        let py = if self.options.python {
            self.python.update(targets)
        } else {
            Default::default()
        };
        for pid in py.remove {
            let _ = self.py_procs.remove(&pid);
        }
        for (pid, proc_) in py.add {
            // CPython's `-X perf` trampolines keep frame pointers.
            self.unwinder.frame_pointers_in_jit(pid);
            if let Err(err) = self.py_procs.insert(pid, proc_, 0) {
                tracing::warn!("pid {pid}: cannot follow its Python frames: {err}");
                self.python.drop_target(pid);
            }
        }
        for (pid, _) in targets {
            if self.modes.contains_key(pid) {
                continue;
            }
            let runtime = runtime::detect(*pid);
            self.runtimes.insert(*pid, runtime);
            let dwarf = match self.options.unwind {
                UnwindMode::Fp => false,
                UnwindMode::Dwarf => true,
                // The `java` launcher is built without frame pointers, but the JVM's own code
                // keeps them, and JIT-compiled Java code has no CFI at all: DWARF unwinding
                // would stop at the first Java frame, frame pointers (with
                // -XX:+PreserveFramePointer) walk through it.
                UnwindMode::Auto if runtime == Runtime::Jvm => false,
                UnwindMode::Auto => match self.fp.process_main_binary_has_frame_pointers(*pid) {
                    Ok(fp) => !fp,
                    Err(err) => {
                        tracing::debug!("pid {pid}: cannot check for frame pointers: {err}");
                        false
                    }
                },
            };
            if dwarf && let Err(err) = self.dwarf_pids.insert(pid, 1, 0) {
                tracing::warn!(
                    "pid {pid}: cannot switch to DWARF unwinding: {err}; its stacks use frame pointers and may be cut short (rebuild it with -fno-omit-frame-pointer for full stacks)"
                );
                self.modes.insert(*pid, false);
                continue;
            }
            if !dwarf
                && let Some(text) = self.leaf.text_ranges(*pid)
                && let Err(err) = self.leaf_pids.insert(pid, text, 0)
            {
                tracing::debug!("pid {pid}: callers of frameless leaves not recovered: {err}");
            }
            self.modes.insert(*pid, dwarf);
        }
        gone
    }

    /// On-CPU samples so far (kernel counts plus unwound copies), for progress lines.
    pub fn samples_so_far(&self) -> u64 {
        let kernel: u64 = self.counts.iter().flatten().map(|(_, n)| n).sum();
        kernel + self.dwarf_samples
    }

    /// Processes unwound from stack copies, of those seen.
    pub fn dwarf_processes(&self) -> (usize, usize) {
        (
            self.modes.values().filter(|d| **d).count(),
            self.modes.len(),
        )
    }

    /// Unwinds the streamed samples into the userspace aggregates. Returns how many.
    pub fn poll(&mut self) -> usize {
        let mut n = 0;
        let stack_at = std::mem::offset_of!(StackSampleEvent, stack);
        while let Some(item) = self.ring.next() {
            if item.len() < stack_at {
                continue;
            }
            // SAFETY: the kernel wrote a StackSampleEvent; the header fields are plain integers
            // (any bit pattern valid), read unaligned.
            let read_u32 = |off: usize| unsafe {
                std::ptr::read_unaligned(item.as_ptr().add(off).cast::<u32>())
            };
            // SAFETY: as above.
            let read_u64 = |off: usize| unsafe {
                std::ptr::read_unaligned(item.as_ptr().add(off).cast::<u64>())
            };
            let tgid = read_u32(std::mem::offset_of!(StackSampleEvent, tgid));
            let service = read_u32(std::mem::offset_of!(StackSampleEvent, service));
            let kernel_stack =
                read_u32(std::mem::offset_of!(StackSampleEvent, kernel_stack)) as i32;
            let kind = read_u32(std::mem::offset_of!(StackSampleEvent, kind));
            let python_stack = read_u32(std::mem::offset_of!(StackSampleEvent, python_stack));
            let value_ns = read_u64(std::mem::offset_of!(StackSampleEvent, value_ns));
            let regs = UserRegs {
                ip: read_u64(std::mem::offset_of!(StackSampleEvent, ip)),
                sp: read_u64(std::mem::offset_of!(StackSampleEvent, sp)),
                bp: read_u64(std::mem::offset_of!(StackSampleEvent, bp)),
            };
            let len = (read_u32(std::mem::offset_of!(StackSampleEvent, len)) as usize)
                .min(STACK_COPY_BYTES)
                .min(item.len() - stack_at);
            let stack = &item[stack_at..stack_at + len];
            self.unwinder
                .unwind_into(tgid, regs, stack, &mut self.unwound);
            drop(item);
            // The frame buffer is lent to the key for the lookup and taken back when the stack
            // is already known, so a repeated stack allocates nothing.
            let key = DwarfKey {
                tgid,
                service,
                kernel_stack,
                user: std::mem::take(&mut self.unwound.frames),
                complete: self.unwound.complete,
                python_stack,
            };
            let known = if kind == SAMPLE_OFFCPU {
                self.dwarf_off.get_mut(&key).map(|e| {
                    e.0 += 1;
                    e.1 += value_ns;
                })
            } else {
                self.dwarf_cpu.get_mut(&key).map(|e| *e += 1)
            };
            if known.is_some() {
                self.unwound.frames = key.user;
            } else if kind == SAMPLE_OFFCPU {
                self.dwarf_off.insert(key, (1, value_ns));
            } else {
                self.dwarf_cpu.insert(key, 1);
            }
            self.dwarf_samples += 1;
            n += 1;
        }
        n
    }

    /// The frame words of Python stack `id` (empty for 0 or an unknown id).
    fn python_stack(&mut self, id: u32) -> Vec<u64> {
        if id == 0 {
            return Vec::new();
        }
        if let Some(s) = self.py_cache.get(&id) {
            return s.clone();
        }
        let words = match self.py_stacks.get(&id, 0) {
            Ok(s) => s.frames[..(s.len as usize).min(s.frames.len())].to_vec(),
            Err(_) => Vec::new(),
        };
        self.py_cache.insert(id, words.clone());
        words
    }

    fn stack(&mut self, id: i32) -> Vec<u64> {
        if id < 0 {
            return Vec::new();
        }
        if let Some(s) = self.stack_cache.get(&id) {
            return s.clone();
        }
        let addrs = match self.stacks.get(&(id as u32), 0) {
            Ok(trace) => lookup_addrs(trace.frames().iter().map(|f| f.ip)),
            Err(_) => Vec::new(),
        };
        self.stack_cache.insert(id, addrs.clone());
        addrs
    }

    /// Everything counted since the last drain, as raw stacks. `period_ns` converts on-CPU
    /// samples to time.
    pub fn drain(&mut self, period_ns: u64) -> RawProfile {
        self.poll();
        let mut out = RawProfile::default();
        let cpu: Vec<(ProfileKey, u64)> = self.counts.iter().flatten().collect::<Vec<_>>();
        for (key, n) in &cpu {
            let before = self.seen_cpu.insert(*key, *n).unwrap_or(0);
            let delta = n.saturating_sub(before);
            if delta == 0 {
                continue;
            }
            let mut user = self.stack(key.user_stack);
            self.leaf.fix(key.tgid, &mut user, key.leaf_ret);
            let stack = RawStack {
                tgid: key.tgid,
                service: key.service,
                user,
                dwarf_complete: None,
                kernel: self.stack(key.kernel_stack),
                python: self.python_stack(key.python_stack),
                samples: delta,
                value_ns: delta * period_ns,
            };
            out.cpu.push(stack);
        }
        let off: Vec<(ProfileKey, OffCpuValue)> = self.offcpu.iter().flatten().collect::<Vec<_>>();
        for (key, v) in &off {
            let before = self.seen_off.insert(*key, *v).unwrap_or_default();
            let count = v.count.saturating_sub(before.count);
            if count == 0 {
                continue;
            }
            let mut user = self.stack(key.user_stack);
            self.leaf.fix(key.tgid, &mut user, key.leaf_ret);
            let stack = RawStack {
                tgid: key.tgid,
                service: key.service,
                user,
                dwarf_complete: None,
                kernel: self.stack(key.kernel_stack),
                python: self.python_stack(key.python_stack),
                samples: count,
                value_ns: v.ns.saturating_sub(before.ns),
            };
            out.off_cpu.push(stack);
        }
        for (key, n) in std::mem::take(&mut self.dwarf_cpu) {
            let kernel = self.stack(key.kernel_stack);
            let python = self.python_stack(key.python_stack);
            out.cpu.push(RawStack {
                tgid: key.tgid,
                service: key.service,
                user: key.user,
                dwarf_complete: Some(key.complete),
                kernel,
                python,
                samples: n,
                value_ns: n * period_ns,
            });
        }
        for (key, (n, ns)) in std::mem::take(&mut self.dwarf_off) {
            let kernel = self.stack(key.kernel_stack);
            let python = self.python_stack(key.python_stack);
            out.off_cpu.push(RawStack {
                tgid: key.tgid,
                service: key.service,
                user: key.user,
                dwarf_complete: Some(key.complete),
                kernel,
                python,
                samples: n,
                value_ns: ns,
            });
        }
        // Counts are read as deltas, so the maps keep growing; past half their capacity they
        // are emptied (what was just read is reported, a sample landing in between is lost).
        let capacity = ws1_probe_common::profile::PROFILE_ENTRIES as usize;
        let py_capacity = ws1_probe_common::python::PY_STACK_ENTRIES as usize;
        if cpu.len() > capacity / 2
            || off.len() > capacity / 2
            || self.py_cache.len() > py_capacity / 2
        {
            self.reset();
        }
        // Processes sampled before the target list named them are classified now, while
        // (most likely) still running.
        for s in out.cpu.iter().chain(&out.off_cpu) {
            let runtime = *self
                .runtimes
                .entry(s.tgid)
                .or_insert_with(|| runtime::detect(s.tgid));
            out.runtimes.insert(s.tgid, runtime);
        }
        out
    }

    /// Empties the kernel counts and stacks.
    fn reset(&mut self) {
        for key in self.seen_cpu.keys() {
            let _ = self.counts.remove(key);
        }
        for key in self.seen_off.keys() {
            let _ = self.offcpu.remove(key);
        }
        for id in self.stack_cache.keys() {
            let _ = self.stacks.remove(&(*id as u32));
        }
        // All of them, not only those read: blocks too short to count still stored theirs.
        let py_ids: Vec<u32> = self.py_stacks.keys().flatten().collect();
        for id in &py_ids {
            let _ = self.py_stacks.remove(id);
        }
        self.py_cache.clear();
        self.seen_cpu.clear();
        self.seen_off.clear();
        self.stack_cache.clear();
    }

    /// Sizes of the unwinder's and the frame-pointer check's caches.
    pub fn cache_stats(&self) -> Vec<CacheStat> {
        let mut stats = self.unwinder.cache_stats();
        stats.push(self.fp.stat());
        stats.push(self.leaf.stat());
        stats
    }

    pub fn map_usage(&self) -> Vec<MapUsage> {
        vec![
            MapUsage::of("PROFILE_COUNTS", self.seen_cpu.len(), self.counts.map()),
            MapUsage::of("OFFCPU_TIME", self.seen_off.len(), self.offcpu.map()),
            MapUsage::of("PY_STACKS", self.py_cache.len(), self.py_stacks.map()),
            MapUsage::of(
                "PY_PROCS",
                self.python.processes().len(),
                self.py_procs.map(),
            ),
        ]
    }
}

/// Opens a sampling cpu-clock perf event on every online CPU with the `profile_cpu` program.
fn attach_sampler(ebpf: &mut Ebpf, frequency_hz: u64) -> Result<(), LoadError> {
    crate::ebpf::attach_perf_all_cpus(
        ebpf,
        "profile_cpu",
        SoftwareEvent::CpuClock,
        SamplePolicy::Frequency(frequency_hz),
        "cpu-clock",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_addresses_step_back_into_the_call() {
        assert_eq!(
            lookup_addrs([100, 200, 300].into_iter()),
            vec![100, 199, 299]
        );
    }

    #[test]
    fn kernel_settings_from_format() {
        let dir = std::env::temp_dir().join(format!("ws1-switch-{}", std::process::id()));
        let ev = dir.join("events/sched/sched_switch");
        std::fs::create_dir_all(&ev).unwrap();
        std::fs::write(
            ev.join("format"),
            "\tfield:pid_t prev_pid;\toffset:20;\tsize:4;\tsigned:1;\n\tfield:long prev_state;\toffset:40;\tsize:8;\tsigned:1;\n\tfield:pid_t next_pid;\toffset:64;\tsize:4;\tsigned:1;\n",
        )
        .unwrap();
        let s = kernel_settings(&dir, 5);
        assert_eq!(
            (
                s.offcpu_min_ns,
                s.switch_prev_pid,
                s.switch_prev_state,
                s.switch_next_pid
            ),
            (5, 20, 40, 64)
        );
        let missing = kernel_settings(&dir.join("nope"), 7);
        assert_eq!(
            missing.switch_next_pid,
            ProfileSettings::FALLBACK.switch_next_pid
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
