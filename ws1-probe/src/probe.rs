//! A running probe: the loaded object, process targeting and the collectors, shared by the
//! agent and the one-shot CLI commands.

use std::{os::fd::OwnedFd, time::Instant};

use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use prometheus::proto::MetricFamily;

use crate::{
    collectors::{
        alloc::{self as alloccollector, AllocCollector, AllocError, AllocatorSpec, Suspect},
        block::BlockCollector,
        memory::MemoryCollector,
        net::{self as netcollector, NetCollector, NetSnapshot},
        profile::{self as profilecollector, ProfileCollector, RawProfile},
        resources::{self as resourcecollector, ResourceCollector},
        sched::SchedCollector,
        syscalls::{SyscallCollector, SyscallSnapshot},
        targets::{ScanSummary, Targets},
    },
    drops::{self, DropWatch},
    ebpf::{self, LoadError, LoadOptions, TRACEFS},
    hostlabels::HostLabels,
    metrics::{self, HOST_LABEL_LIMIT, LabelCap, agent::AgentStats, syscalls::SyscallBudget},
    preflight::{self, PreflightError},
    targeting::{
        Matcher,
        config::{PreciseAlloc, Settings},
    },
};

/// How often host mode updates its labels and reclaims map entries when nobody scrapes.
pub const HOST_UPDATE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("cannot scan /proc: {0}")]
    Scan(#[source] std::io::Error),
    #[error(
        "cannot enable BPF run-time statistics: {0} (needs Linux 5.8+ and CAP_SYS_ADMIN; drop --bpf-stats)"
    )]
    Stats(#[source] aya::sys::SyscallError),
}

/// Why a configuration reload was refused (the running configuration stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(
        "switching between host mode and selected services needs a restart (the kernel programs are loaded for one or the other)"
    )]
    ModeChange,
    #[error("cannot scan /proc: {0}")]
    Scan(#[source] std::io::Error),
}

/// What a reload did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reloaded {
    pub scan: ScanSummary,
    /// Settings that differ from the running ones but apply only at the next start.
    pub needs_restart: Vec<&'static str>,
}

pub struct Probe {
    ebpf: Ebpf,
    pub targets: Targets,
    pub syscalls: SyscallCollector,
    pub net: NetCollector,
    pub memory: MemoryCollector,
    /// Process starts, exits and crashes (always), run-queue latency (`sched`).
    pub sched: SchedCollector,
    pub block: BlockCollector,
    /// Resources per service from procfs (see `collectors/resources.rs`).
    pub resources: ResourceCollector,
    /// The profiler, when on (agent default: 19 Hz on-CPU).
    pub profile: Option<ProfileCollector>,
    /// Symbolized profile windows and per-service sample totals.
    pub profiles: crate::profile::windows::Windows,
    profile_drained: Option<Instant>,
    streams_at: Option<Instant>,
    /// Precise allocation tracing, when opted in (see [`Probe::attach_precise_alloc`]).
    pub alloc: Option<AllocCollector>,
    precise: PreciseAlloc,
    settings: Settings,
    suspects: Vec<Suspect>,
    suspects_at: Option<Instant>,
    exec_ring: Option<RingBuf<MapData>>,
    pub bounds_ns: Vec<u64>,
    pub scan: ScanSummary,
    label_cap: LabelCap,
    syscall_budget: SyscallBudget,
    /// Host mode's label policy and exported totals (see [`crate::hostlabels`]).
    host: Option<HostLabels>,
    drop_watch: DropWatch,
    stats_fd: Option<OwnedFd>,
    pub started: Instant,
}

impl Probe {
    /// Pre-flight checks, load, attach targeting, scan /proc, attach collectors.
    pub fn start(settings: &Settings) -> Result<Self, ProbeError> {
        let started = Instant::now();
        preflight::check_capabilities()?;
        preflight::ensure_tracefs()?;
        preflight::raise_memlock();
        let stats_fd = if settings.bpf_stats {
            Some(aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(ProbeError::Stats)?)
        } else {
            None
        };
        let opts = LoadOptions {
            host_mode: settings.targets.is_host(),
            offsets: ebpf::read_offsets(std::path::Path::new(TRACEFS)),
            bounds_ns: settings.bounds_ns.clone(),
            profile: profilecollector::kernel_settings(
                std::path::Path::new(TRACEFS),
                settings.profile.offcpu_min_ns,
            ),
            sample_rate_hz: profilecollector::sample_rate_hz(&settings.profile),
            map_entries: settings.map_entries.clone(),
        };
        let mut ebpf = ebpf::load(&opts)?;
        let matcher = Matcher::new(settings.targets.clone());
        let pinned = matcher.configured_ids();
        let (mut targets, exec_ring) = Targets::attach(&mut ebpf, matcher)?;
        let scan = targets.scan().map_err(ProbeError::Scan)?;
        let on = settings.collectors;
        let syscalls = SyscallCollector::attach(&mut ebpf, on.syscalls)?;
        let remote = netcollector::remote_service_ids(
            &settings.remote_addresses,
            targets.matcher().services(),
        );
        let handshakes = netcollector::dependency_handshakes(
            &settings.dependencies,
            targets.matcher().services(),
        );
        let mut net = NetCollector::attach(&mut ebpf, on.net, &remote, &handshakes)?;
        // After attaching, so a listen() during the scan is seen by one or the other.
        net.seed_listeners(
            std::path::Path::new("/proc"),
            &targets.targeted_pids(),
            targets.matcher().clone(),
        );
        let memory = MemoryCollector::attach(&mut ebpf, on.memory)?;
        let sched = SchedCollector::attach(&mut ebpf, on.sched)?;
        let block = BlockCollector::attach(&mut ebpf, on.block)?;
        let resources = ResourceCollector::new(
            on.resources,
            settings.targets.is_host(),
            resourcecollector::SAMPLE_EVERY,
        );
        let profile = if on.profile
            && (settings.profile.frequency_hz > 0 || settings.profile.off_cpu)
        {
            match ProfileCollector::attach(&mut ebpf, &settings.profile) {
                Ok(mut p) => {
                    let _ = p.update_targets(&targets.targeted_pairs());
                    Some(p)
                }
                // Beside other collectors (the agent) a kernel that refuses the profiler
                // loses only profiles; alone (`profile`, `top`) it is the error.
                Err(err) if on.syscalls || on.net || on.memory || on.block || on.resources => {
                    tracing::warn!(
                        "profiler is off: {err}; the other collectors run (leave it out with --collectors to silence this)"
                    );
                    None
                }
                Err(err) => return Err(err.into()),
            }
        } else {
            None
        };
        Ok(Self {
            profile,
            profiles: crate::profile::windows::Windows::new(
                settings.profile.debug_info,
                crate::profile::binary::CacheBudgets::split(settings.profile.cache_bytes),
            ),
            profile_drained: None,
            streams_at: None,
            ebpf,
            targets,
            syscalls,
            net,
            memory,
            sched,
            block,
            resources,
            alloc: None,
            precise: PreciseAlloc::Off,
            settings: settings.clone(),
            suspects: Vec::new(),
            suspects_at: None,
            exec_ring: Some(exec_ring),
            bounds_ns: settings.bounds_ns.clone(),
            scan,
            host: settings
                .targets
                .is_host()
                .then(|| HostLabels::new(settings.labels, pinned.iter().copied())),
            label_cap: LabelCap::new(HOST_LABEL_LIMIT, pinned),
            syscall_budget: SyscallBudget::new(settings.syscalls_per_service),
            drop_watch: DropWatch::new(started, drops::WARN_EVERY),
            stats_fd,
            started,
        })
    }

    /// Applies a reloaded configuration without detaching or losing counts: new selectors and
    /// services take effect at once (every running process is re-decided; a name keeps its
    /// service id), as do per-service allocators. Settings that shape what is loaded into the
    /// kernel (listen address, collectors, buckets, profiler, opt-ins) are reported in
    /// [`Reloaded::needs_restart`] and keep their running values.
    pub fn reload(&mut self, new: &Settings) -> Result<Reloaded, ReloadError> {
        let old = &self.settings;
        if new.targets.is_host() != old.targets.is_host() {
            return Err(ReloadError::ModeChange);
        }
        let mut needs_restart = Vec::new();
        let mut differs = |changed: bool, name: &'static str| {
            if changed {
                needs_restart.push(name);
            }
        };
        differs(new.listen != old.listen, "listen");
        differs(new.bpf_stats != old.bpf_stats, "bpf_stats");
        differs(new.bounds_ns != old.bounds_ns, "histogram buckets");
        differs(new.collectors != old.collectors, "collectors");
        differs(
            new.syscalls_per_service != old.syscalls_per_service,
            "syscalls_per_service",
        );
        differs(new.profile != old.profile, "profile");
        differs(new.precise_alloc != old.precise_alloc, "precise_alloc");
        differs(
            new.remote_addresses != old.remote_addresses,
            "remote_addresses",
        );
        differs(new.map_entries != old.map_entries, "map_entries");
        // Handshake exchanges are loaded into the kernel at start; the names go with them.
        differs(new.dependencies != old.dependencies, "dependencies");
        let scan = self
            .targets
            .reload(new.targets.clone())
            .map_err(ReloadError::Scan)?;
        for id in self.targets.matcher().configured_ids() {
            self.label_cap.pin(id);
        }
        self.settings.targets = new.targets.clone();
        self.settings.allocators = new.allocators.clone();
        self.settings.config_path = new.config_path.clone();
        self.settings.labels = new.labels;
        if let Some(h) = self.host.as_mut() {
            h.policy.set_options(new.labels);
        }
        if let Some(p) = self.profile.as_mut() {
            let _ = p.update_targets(&self.targets.targeted_pairs());
        }
        Ok(Reloaded {
            scan,
            needs_restart,
        })
    }

    /// The exec event ring buffer, for the task that waits on it.
    pub fn take_exec_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.exec_ring.take()
    }

    /// The loaded object, for collectors attached on demand (e.g. allocation uprobes).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub fn bpf_stats_enabled(&self) -> bool {
        self.stats_fd.is_some()
    }

    /// Run time and run count of each attached program (zero unless BPF stats are enabled).
    pub fn program_stats(&self) -> Vec<(String, std::time::Duration, u64)> {
        self.ebpf
            .programs()
            .filter_map(|(name, prog)| {
                let info = prog.info().ok()?;
                Some((name.to_owned(), info.run_time(), info.run_count()))
            })
            .collect()
    }

    /// Attaches the allocation uprobes to the processes `mode` selects; returns how many.
    /// Processes of those services started later are attached by [`Probe::tick`].
    pub fn attach_precise_alloc(&mut self, mode: &PreciseAlloc) -> Result<usize, AllocError> {
        self.precise = mode.clone();
        if *mode == PreciseAlloc::Off {
            return Ok(0);
        }
        let pids = self.precise_pids();
        let spec = self.allocator_specs();
        let alloc = AllocCollector::attach(&mut self.ebpf, &pids, &spec)?;
        let n = alloc.pids.len();
        self.alloc = Some(alloc);
        Ok(n)
    }

    /// The allocator of each process, from the settings of its service.
    fn allocator_specs(&self) -> impl Fn(u32) -> AllocatorSpec + use<> {
        let services = self.targets.matcher().services();
        let by_pid: std::collections::HashMap<u32, AllocatorSpec> = self
            .targets
            .targeted_pairs()
            .into_iter()
            .map(|(pid, service)| {
                let a = self.settings.allocator(services.name(service));
                (
                    pid,
                    AllocatorSpec {
                        lib: a.lib,
                        prefix: a.prefix,
                    },
                )
            })
            .collect();
        move |pid| by_pid.get(&pid).cloned().unwrap_or_default()
    }

    /// The observed processes that precise mode covers.
    fn precise_pids(&self) -> Vec<u32> {
        let services = self.targets.matcher().services();
        self.targets
            .targeted_pairs()
            .into_iter()
            .filter(|(_, s)| match &self.precise {
                PreciseAlloc::Off => false,
                PreciseAlloc::All => true,
                PreciseAlloc::Services(names) => names.iter().any(|n| n == services.name(*s)),
            })
            .map(|(pid, _)| pid)
            .collect()
    }

    /// Periodic work of the agent: the memory signal and, in precise mode, the leak suspects
    /// (which walk the outstanding allocations, so at most every 30 s).
    pub fn tick(&mut self) {
        self.sample_memory();
        self.log_crashes();
        self.sample_resources();
        self.warn_drops();
        // Host mode: rank and reclaim between scrapes too (after the first, which ranks what
        // ran since start), so one-shot commands free their map entries even when nobody
        // scrapes for a while.
        if self
            .host
            .as_ref()
            .and_then(HostLabels::updated)
            .is_some_and(|at| at.elapsed() >= HOST_UPDATE_EVERY)
        {
            let _ = self.families();
        }
        // Symbolize while the sampled processes still exist (short-lived ones would be gone
        // by the next scrape or profile request).
        self.profile_drain_if_older(std::time::Duration::from_secs(10));
        if self.alloc.is_some() {
            let pids = self.precise_pids();
            let spec = self.allocator_specs();
            if let Some(alloc) = self.alloc.as_mut() {
                alloc.prune(&mut self.ebpf);
                match alloc.add_pids(&mut self.ebpf, &pids, &spec) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("precise allocation tracing on {n} new process(es)"),
                    Err(err) => tracing::warn!(
                        "cannot trace allocations of a new process: {err}; its allocations are not counted (`ws1-probe check` lists what this kernel allows)"
                    ),
                }
            }
        }
        let due = self
            .suspects_at
            .is_none_or(|at| at.elapsed() >= alloccollector::SUSPECT_MIN_AGE);
        if let (true, Some(alloc)) = (due, self.alloc.as_mut()) {
            let elapsed = self
                .suspects_at
                .map_or(0.0, |at| at.elapsed().as_secs_f64());
            self.suspects = alloc.suspects(&self.suspects, elapsed);
            self.suspects_at = Some(Instant::now());
        }
    }

    /// Logs one line per process of a service killed by a signal (crash detection).
    pub fn log_crashes(&mut self) {
        let services = self.targets.matcher().services();
        for crash in self.sched.crashes() {
            tracing::warn!(
                "{}; its own log or core dump tells why",
                crash.line(services.name(crash.service))
            );
        }
    }

    /// Logs one warning per full map per interval (see [`crate::drops`]).
    fn warn_drops(&mut self) {
        let usage: Vec<_> = self
            .targets
            .usage()
            .into_iter()
            .chain(self.syscalls.usage())
            .chain(self.net.usage())
            .chain(self.sched.usage())
            .chain(self.block.usage())
            .collect();
        let capacity = |map: &str| usage.iter().find(|u| u.map == map).map(|u| u.capacity);
        for line in self
            .drop_watch
            .check(Instant::now(), &self.targets.drops(), capacity)
        {
            tracing::warn!("{line}");
        }
        let services = self.targets.matcher().services();
        if let Some(line) =
            self.drop_watch
                .check_names(Instant::now(), services.refused(), services.capacity())
        {
            tracing::warn!("{line}");
        }
    }

    /// Samples resident memory per service (at most every few seconds) and logs services whose
    /// memory keeps growing, pointing to precise mode.
    pub fn sample_memory(&mut self) {
        if !self.memory.due() {
            return;
        }
        let pairs = self.targets.targeted_pairs();
        for (service, slope) in self.memory.sample(&pairs) {
            let name = self.targets.matcher().services().name(service);
            let pid = pairs
                .iter()
                .find(|(_, s)| *s == service)
                .map_or(0, |(p, _)| *p);
            tracing::warn!(
                "service {name}: resident memory grows {:.1} KiB/s over the last {:.0} s; find the allocating stacks with `ws1-probe leaks --pid {pid}`",
                slope / 1024.0,
                self.memory.growth.span(service)
            );
        }
    }

    /// Drains exec events, then registers the listening ports of the processes they moved into
    /// a service. The decision is in `TARGETS` before /proc is read, so a `listen()` that raced
    /// with the exec is seen by the kernel (after the decision) or found here (before it).
    pub fn drain_execs(&mut self, ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> usize {
        let n = self.targets.drain(ring);
        let pids = self.targets.take_exec_targeted();
        if !pids.is_empty() {
            self.net.seed_listeners(
                std::path::Path::new("/proc"),
                &pids,
                self.targets.matcher().clone(),
            );
        }
        n
    }

    /// Samples resources per service from procfs, when a sample is due.
    pub fn sample_resources(&mut self) {
        if self.resources.due() {
            let pairs = self.targets.targeted_pairs();
            self.resources.sample(&pairs);
        }
    }

    /// Work one-shot commands do every 100 ms: unwind streamed profile samples (their ring
    /// buffer holds only a few seconds of them) and, every second, choose the unwinding of new
    /// processes.
    pub fn poll_streams(&mut self) {
        if let Some(p) = self.profile.as_mut() {
            p.poll();
            if self.streams_at.is_none_or(|at| at.elapsed().as_secs() >= 1) {
                let gone = p.update_targets(&self.targets.targeted_pairs());
                for pid in gone {
                    self.profiles.sym.forget(pid);
                }
                self.streams_at = Some(Instant::now());
            }
        }
    }

    /// Drains the profiler's counts into a symbolized window (see [`crate::profile::windows`]).
    /// Returns false when the profiler is off.
    pub fn profile_drain(&mut self) -> bool {
        let Some(p) = self.profile.as_mut() else {
            return false;
        };
        let gone = p.update_targets(&self.targets.targeted_pairs());
        let frequency = p.options.frequency_hz;
        let raw: RawProfile = p.drain(1_000_000_000u64.checked_div(frequency).unwrap_or(0));
        let services = self.targets.matcher().services();
        self.profiles.add(&raw, frequency, |id| services.name(id));
        // After symbolizing: the last window may hold stacks of the processes that exited.
        for pid in gone {
            self.profiles.sym.forget(pid);
        }
        self.profile_drained = Some(Instant::now());
        true
    }

    /// Drains the profiler when the last drain is older than `max_age`.
    pub fn profile_drain_if_older(&mut self, max_age: std::time::Duration) {
        if self
            .profile_drained
            .is_none_or(|at| at.elapsed() >= max_age)
        {
            self.profile_drain();
        }
    }

    /// Builds every metric family, reading the maps once.
    pub fn families(&mut self) -> (Vec<MetricFamily>, SyscallSnapshot) {
        self.sample_memory();
        self.sample_resources();
        // Sample totals are counted as windows are symbolized; a scrape sees them at most a
        // second old.
        self.profile_drain_if_older(std::time::Duration::from_secs(1));
        // Live processes first: a service seen without any has exited before its counts were
        // read, so host mode may reclaim its kernel entries after reading them.
        let targeted = self.targets.targeted_by_service();
        let snap = self.syscalls.snapshot();
        let net: NetSnapshot = self.net.snapshot();
        self.log_crashes();
        let starts = self.targets.take_exec_starts();
        self.sched.add_exec_starts(&starts);
        let sched = self.sched.snapshot();
        let block = self.block.snapshot();
        // Rank by calls; a service with live processes but no calls yet is ranked too (with 0),
        // so its processes are not reported as `other` while it is idle.
        let mut activity = snap.calls_by_service();
        let net_activity = net.activity_by_service();
        for (id, n) in &net_activity {
            *activity.entry(*id).or_insert(0) += n;
        }
        for id in targeted.keys() {
            activity.entry(*id).or_insert(0);
        }
        let services = self.targets.matcher().services();
        // Host mode: collectors label series by id; `HostLabels::export` names them below.
        match self.host.as_mut() {
            Some(h) => h.grow_ids(services.len()),
            None => self.label_cap.update(&activity),
        }
        let ids: &[String] = self.host.as_ref().map_or(&[], HostLabels::ids);
        let host = self.host.is_some();
        let cap = &self.label_cap;
        let label = |id: u32| {
            if host {
                ids.get(id as usize).map_or("0", String::as_str)
            } else if cap.keeps(id) {
                services.name(id)
            } else {
                "other"
            }
        };
        let mut families = metrics::syscalls::families(&snap, label, &self.bounds_ns);
        let deps = &self.settings.dependencies;
        // By the service's own name (not its label, which may be `other`).
        let peer = |id: u32, port: u16| {
            if deps.is_empty() {
                return None;
            }
            crate::targeting::config::peer_name(deps, services.name(id), port)
        };
        families.extend(metrics::net::families(&net, label, peer, &self.bounds_ns));
        families.extend(metrics::memory::families(&self.memory.snapshot(), label));
        families.extend(metrics::sched::families(&sched, label, &self.bounds_ns));
        families.extend(metrics::block::families(&block, label, &self.bounds_ns));
        if self.resources.enabled() {
            families.extend(metrics::resources::families(
                &self.resources.snapshot(),
                label,
            ));
        }
        if self.profile.is_some() {
            families.extend(metrics::profile::families(
                &self.profiles.totals,
                self.profiles.sym.errors(),
                label,
            ));
        }
        if let Some(alloc) = &self.alloc {
            families.extend(metrics::alloc::families(
                &alloc.stats(),
                &self.suspects,
                label,
            ));
        }
        families.extend(metrics::agent::families(
            &self.agent_stats(),
            &targeted,
            &label,
        ));
        if let Some(h) = self.host.as_mut() {
            let live = targeted.keys().copied().collect();
            let services = self.targets.matcher().services();
            let gone;
            (families, gone) = h.export(Instant::now(), families, &activity, &live, |id| {
                services.name(id)
            });
            // Their counts were read above; the kernel entries of gone, idle ids are deleted
            // so the maps hold what runs now (see ARCHITECTURE.md, Map sizes).
            self.memory.reclaim(&gone);
            self.sched.reclaim(&gone);
            self.block.reclaim(&gone);
            if self.syscalls.reclaim(&gone) > 0 {
                for id in &gone {
                    h.policy
                        .rebase(*id, net_activity.get(id).copied().unwrap_or(0));
                }
            }
        }
        families.extend(metrics::cache::families(&self.cache_stats()));
        if self.settings.collectors.host {
            families.extend(metrics::host::families(&crate::collectors::host::read()));
        }
        // On the labels Prometheus sees (in host mode, after the ids were named above).
        metrics::syscalls::apply_budget(&mut families, &mut self.syscall_budget);
        (families, snap)
    }

    /// What the agent exports about itself: program cost, map fill, drops.
    pub fn agent_stats(&self) -> AgentStats {
        AgentStats {
            bpf_stats_enabled: self.bpf_stats_enabled(),
            programs: self.program_stats(),
            maps: self
                .targets
                .usage()
                .into_iter()
                .chain(self.syscalls.usage())
                .chain(self.net.usage())
                .chain(self.sched.usage())
                .chain(self.block.usage())
                .chain(self.profile.iter().flat_map(|p| p.map_usage()))
                .collect(),
            drops: self
                .targets
                .drops()
                .iter()
                .map(|(reason, n)| (reason.label(), *n))
                .collect(),
        }
    }

    /// Sizes of the profiler's caches (empty when it is off).
    pub fn cache_stats(&self) -> Vec<crate::profile::binary::CacheStat> {
        let Some(p) = &self.profile else {
            return Vec::new();
        };
        let mut stats = p.cache_stats();
        stats.extend(self.profiles.sym.cache_stats());
        stats.push(self.profiles.stat());
        stats
    }

    /// The `/metrics` body.
    pub fn render(&mut self) -> String {
        metrics::encode(&self.families().0)
    }
}
