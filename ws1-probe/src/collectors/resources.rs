//! Resources per service from procfs: CPU time, threads, processes, open file descriptors and
//! their limit, context switches, storage I/O bytes and the cgroup memory limit. No kernel part:
//! the processes come from the targeting map, their figures from /proc/PID.
//!
//! Counters stay monotonic while processes come and go: the collector keeps the last reading of
//! every live process, and when a process is gone (or its pid now names a newer process) its last
//! reading is added to its service's total of exited processes. A process that moves to another
//! service (an exec in host mode) leaves its reading so far with the old service; the new one
//! counts from there. What a process does between its last sample and its exit is not counted
//! (at most [`SAMPLE_EVERY`] of it).
//!
//! Nothing here grows with the processes ever seen: per-process state is dropped when the
//! process is gone, per-service state is bounded by the service table, and in host mode a
//! service with no process left is forgotten once its final totals were read (host mode's
//! accumulator keeps exported counters monotonic across that, see `hostlabels.rs`).

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    time::{Duration, Instant},
};

use crate::targeting::container::{self, ContainerRef};

/// Minimum time between two samples in the agent (scrapes and ticks in between reuse the last).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// The counters of a process (or of a service: the sum of its processes').
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// `utime` of /proc/PID/stat, in clock ticks: the whole thread group, exited threads included.
    pub user_ticks: u64,
    /// `stime` of /proc/PID/stat, in clock ticks.
    pub system_ticks: u64,
    /// `voluntary_ctxt_switches` summed over the process's threads (exited threads included).
    pub voluntary: u64,
    /// `nonvoluntary_ctxt_switches` summed over the threads.
    pub involuntary: u64,
    /// `read_bytes` of /proc/PID/io: bytes the process caused to be fetched from storage.
    pub read_bytes: u64,
    /// `write_bytes` of /proc/PID/io: bytes the process caused to be sent to storage.
    pub write_bytes: u64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.user_ticks += o.user_ticks;
        self.system_ticks += o.system_ticks;
        self.voluntary += o.voluntary;
        self.involuntary += o.involuntary;
        self.read_bytes += o.read_bytes;
        self.write_bytes += o.write_bytes;
    }

    /// `self - base`, field by field, never below zero.
    fn since(&self, base: &Counters) -> Counters {
        Counters {
            user_ticks: self.user_ticks.saturating_sub(base.user_ticks),
            system_ticks: self.system_ticks.saturating_sub(base.system_ticks),
            voluntary: self.voluntary.saturating_sub(base.voluntary),
            involuntary: self.involuntary.saturating_sub(base.involuntary),
            read_bytes: self.read_bytes.saturating_sub(base.read_bytes),
            write_bytes: self.write_bytes.saturating_sub(base.write_bytes),
        }
    }
}

/// One reading of a process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    /// `starttime` of /proc/PID/stat: tells a reused pid from the process that had it.
    pub start_ticks: u64,
    pub counters: Counters,
    pub threads: u64,
    pub fds: u64,
    /// Soft `RLIMIT_NOFILE`.
    pub fd_limit: Option<u64>,
    /// The tightest memory limit on the process's cgroup path (its own or an ancestor's):
    /// `memory.max` of cgroup v2, or v1's `memory.limit_in_bytes` where the v1 memory
    /// controller is mounted.
    pub memory_limit: Option<u64>,
    /// The container (and pod) its cgroup path names.
    pub container: Option<ContainerRef>,
}

/// Containers listed per service (processes of further containers still count in the other
/// figures): bounds `ws1_probe_service_container_processes`.
pub const MAX_CONTAINERS_PER_SERVICE: usize = 32;

/// Per-service figures at the last sample.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceResources {
    /// Live processes' counters plus those of processes that exited.
    pub counters: Counters,
    pub processes: u64,
    pub threads: u64,
    pub fds: u64,
    /// The smallest soft `RLIMIT_NOFILE` among the service's processes.
    pub fd_limit: Option<u64>,
    /// The largest cgroup memory limit among the service's processes, only when every process
    /// has one (a process without a limit makes the service unlimited).
    pub memory_limit: Option<u64>,
    /// Live processes per container, at most [`MAX_CONTAINERS_PER_SERVICE`] containers.
    pub containers: BTreeMap<ContainerRef, u64>,
}

/// What the resources collector knows at a scrape, per service id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResourcesSnapshot {
    pub services: BTreeMap<u32, ServiceResources>,
    /// Clock ticks per second (`USER_HZ`), to turn ticks into seconds.
    pub ticks_per_second: u64,
}

#[derive(Clone, Debug)]
struct PidState {
    service: u32,
    start_ticks: u64,
    /// The reading when the process joined its current service (zero when it was first seen).
    base: Counters,
    last: Counters,
}

#[derive(Clone, Debug, Default)]
struct ServiceState {
    /// Counters of processes that exited or left the service.
    gone: Counters,
    now: ServiceResources,
}

/// Per-thread context switches of one process (threads come and go within a process), and
/// its cgroup path, read again at most every [`CGROUP_EVERY`].
#[derive(Clone, Debug, Default)]
struct ThreadSwitches {
    /// tid → (voluntary, involuntary) at the last read.
    live: HashMap<u32, (u64, u64)>,
    /// Switches of threads that exited.
    dead: (u64, u64),
    cgroup: Option<(Instant, Option<String>)>,
    /// Single-threaded processes: /proc/PID/schedstat (run time in ns, times switched in) at
    /// the last full read, and that reading.
    idle: Option<((u64, u64), Reading)>,
}

/// How long a process's cgroup path is reused before /proc/PID/cgroup is read again (processes
/// rarely move; the read costs as much as the rest of a process's sample).
const CGROUP_EVERY: Duration = Duration::from_secs(60);
/// `PF_KTHREAD` from include/linux/sched.h.
const PF_KTHREAD: u32 = 0x0020_0000;

/// The pure part: folds readings into monotonic per-service figures. Unit-tested without /proc.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    pids: HashMap<u32, PidState>,
    services: BTreeMap<u32, ServiceState>,
}

impl Ledger {
    /// Applies one sample: `readings` holds every targeted process that could be read, with its
    /// service. Processes missing from it are gone.
    pub fn apply(&mut self, readings: &[(u32, u32, Reading)]) {
        for s in self.services.values_mut() {
            s.now = ServiceResources::default();
        }
        let mut seen: HashMap<u32, PidState> = HashMap::with_capacity(readings.len());
        for (pid, service, r) in readings {
            let mut state = match self.pids.remove(pid) {
                Some(old) if old.start_ticks == r.start_ticks => old,
                Some(old) => {
                    // The pid now names another process: the old one exited.
                    self.retire(&old);
                    PidState::new(*service, r)
                }
                None => PidState::new(*service, r),
            };
            if state.service != *service {
                // Up to this reading the process counted for its old service.
                state.last = r.counters;
                self.retire(&state);
                state.service = *service;
                state.base = r.counters;
            }
            state.last = r.counters;
            let s = &mut self.services.entry(*service).or_default().now;
            s.counters.add(&r.counters.since(&state.base));
            s.processes += 1;
            s.threads += r.threads;
            s.fds += r.fds;
            s.fd_limit = match (s.fd_limit, r.fd_limit) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            s.memory_limit = match (s.processes, s.memory_limit, r.memory_limit) {
                (1, _, limit) => limit,
                (_, Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
            if let Some(c) = r.container {
                add_container(&mut s.containers, c, 1);
            }
            seen.insert(*pid, state);
        }
        // What is left exited since the previous sample.
        let gone: Vec<PidState> = self.pids.drain().map(|(_, s)| s).collect();
        for old in &gone {
            self.retire(old);
        }
        self.pids = seen;
        for s in self.services.values_mut() {
            let gone = s.gone;
            s.now.counters.add(&gone);
        }
    }

    /// Moves a process's counters in its service into that service's exited total.
    fn retire(&mut self, old: &PidState) {
        let s = self.services.entry(old.service).or_default();
        s.gone.add(&old.last.since(&old.base));
    }

    /// The figures of every service known.
    pub fn services(&self) -> BTreeMap<u32, ServiceResources> {
        self.services
            .iter()
            .map(|(id, s)| (*id, s.now.clone()))
            .collect()
    }

    /// Forgets services without a live process (host mode, after their totals were read).
    pub fn forget_idle(&mut self) {
        self.services.retain(|_, s| s.now.processes > 0);
    }

    /// Processes tracked (for tests and the bench).
    pub fn tracked(&self) -> (usize, usize) {
        (self.pids.len(), self.services.len())
    }
}

impl PidState {
    fn new(service: u32, r: &Reading) -> Self {
        Self {
            service,
            start_ticks: r.start_ticks,
            base: Counters::default(),
            last: r.counters,
        }
    }
}

pub struct ResourceCollector {
    enabled: bool,
    every: Duration,
    last_sample: Option<Instant>,
    ledger: Ledger,
    threads: HashMap<u32, ThreadSwitches>,
    /// Host mode: services with no process left are forgotten after a snapshot.
    forget_idle: bool,
    ticks_per_second: u64,
}

impl ResourceCollector {
    /// `forget_idle` in host mode (see the module documentation); `every` is the minimum time
    /// between samples.
    pub fn new(enabled: bool, forget_idle: bool, every: Duration) -> Self {
        Self {
            enabled,
            every,
            last_sample: None,
            ledger: Ledger::default(),
            threads: HashMap::new(),
            forget_idle,
            ticks_per_second: procfs::ticks_per_second().max(1),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether [`ResourceCollector::sample`] would read /proc now.
    pub fn due(&self) -> bool {
        self.enabled && self.last_sample.is_none_or(|at| at.elapsed() >= self.every)
    }

    /// Reads every process of `targets` (pid → service) if a sample is due.
    pub fn sample(&mut self, targets: &[(u32, u32)]) {
        if !self.due() {
            return;
        }
        self.sample_now(targets);
    }

    /// Reads every process of `targets` now.
    pub fn sample_now(&mut self, targets: &[(u32, u32)]) {
        self.last_sample = Some(Instant::now());
        let mut limits = CgroupLimits::default();
        let mut readings = Vec::with_capacity(targets.len());
        let mut threads = HashMap::with_capacity(targets.len());
        for (pid, service) in targets {
            let mut switches = self.threads.remove(pid).unwrap_or_default();
            // A single-threaded process that has not run since the last sample (same run
            // time and switch-in count in /proc/PID/schedstat) has the same figures: it cannot
            // have used CPU, switched, done I/O or opened files. One small read instead of
            // five files; a full read at least every CGROUP_EVERY (limits, cgroup moves).
            let sched = read_schedstat(*pid);
            let fresh = switches
                .cgroup
                .as_ref()
                .is_some_and(|(at, _)| at.elapsed() < CGROUP_EVERY);
            if let (true, Some(now), Some((before, last))) = (fresh, sched, switches.idle.as_ref())
                && now == *before
            {
                readings.push((*pid, *service, *last));
                threads.insert(*pid, switches);
                continue;
            }
            if let Some(r) = read_process(*pid, &mut switches, &mut limits) {
                // A reused pid starts its threads' history again.
                if self
                    .ledger
                    .pids
                    .get(pid)
                    .is_some_and(|p| p.start_ticks != r.start_ticks)
                {
                    switches = ThreadSwitches::default();
                    let _ = read_switches(*pid, &mut switches);
                }
                let mut r = r;
                r.counters.voluntary = switches.total().0;
                r.counters.involuntary = switches.total().1;
                switches.idle = match sched {
                    Some(sched) if r.threads == 1 && r.start_ticks != 0 => Some((sched, r)),
                    _ => None,
                };
                readings.push((*pid, *service, r));
                threads.insert(*pid, switches);
            }
        }
        self.threads = threads;
        self.ledger.apply(&readings);
    }

    /// The figures at the last sample. In host mode services with no process left are
    /// forgotten afterwards (their final totals are in this snapshot).
    pub fn snapshot(&mut self) -> ResourcesSnapshot {
        let snap = ResourcesSnapshot {
            services: self.ledger.services(),
            ticks_per_second: self.ticks_per_second,
        };
        if self.forget_idle {
            self.ledger.forget_idle();
        }
        snap
    }

    /// (processes, services) tracked.
    pub fn tracked(&self) -> (usize, usize) {
        self.ledger.tracked()
    }
}

impl ThreadSwitches {
    fn total(&self) -> (u64, u64) {
        self.live
            .values()
            .fold(self.dead, |(v, i), (dv, di)| (v + dv, i + di))
    }
}

/// Reads one process; `None` when it is gone (or unreadable). Kernel threads are read from
/// their stat file only: they have no files, limits or cgroup of their own, and their context
/// switches are not counted (in host mode they are half the processes).
fn read_process(
    pid: u32,
    switches: &mut ThreadSwitches,
    limits: &mut CgroupLimits,
) -> Option<Reading> {
    let p = procfs::process::Process::new(i32::try_from(pid).ok()?).ok()?;
    let stat = p.stat().ok()?;
    let mut reading = Reading {
        start_ticks: stat.starttime,
        counters: Counters {
            user_ticks: stat.utime,
            system_ticks: stat.stime,
            ..Counters::default()
        },
        threads: u64::try_from(stat.num_threads).unwrap_or(0),
        ..Reading::default()
    };
    if stat.flags & PF_KTHREAD != 0 {
        return Some(reading);
    }
    if let Ok(io) = p.io() {
        reading.counters.read_bytes = io.read_bytes;
        reading.counters.write_bytes = io.write_bytes;
    }
    reading.fds = p.fd_count().ok().unwrap_or(0) as u64;
    if stat.num_threads == 1 {
        // The process's own status file is its only thread's: no task directory to list.
        read_single_thread_switches(pid, switches);
    } else {
        read_switches(pid, switches);
    }
    let fresh = switches
        .cgroup
        .as_ref()
        .is_some_and(|(at, _)| at.elapsed() < CGROUP_EVERY);
    if !fresh {
        // cgroup v1's memory controller where it is mounted (hybrid hosts), else v2's.
        let path = p.cgroups().ok().and_then(|groups| {
            let v1 = groups
                .0
                .iter()
                .find(|g| g.controllers.iter().any(|c| c == "memory"))
                .map(|g| format!("v1:{}", g.pathname));
            v1.or_else(|| {
                groups
                    .0
                    .iter()
                    .find(|g| g.hierarchy == 0)
                    .map(|g| format!("v2:{}", g.pathname))
            })
        });
        switches.cgroup = Some((Instant::now(), path));
    }
    let path = switches
        .cgroup
        .as_ref()
        .and_then(|(_, path)| path.as_deref());
    reading.memory_limit = path.and_then(|path| limits.of(path));
    reading.container = path.and_then(container::from_cgroup_path);
    reading.fd_limit = soft_nofile(pid);
    Some(reading)
}

/// Counts `n` processes of container `c`, within the per-service bound.
pub fn add_container(into: &mut BTreeMap<ContainerRef, u64>, c: ContainerRef, n: u64) {
    if let Some(count) = into.get_mut(&c) {
        *count += n;
    } else if into.len() < MAX_CONTAINERS_PER_SERVICE {
        into.insert(c, n);
    }
}

/// Run time (ns) and times switched in of a process's main thread, from /proc/PID/schedstat
/// (`None` without `CONFIG_SCHED_INFO`).
fn read_schedstat(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    parse_schedstat(&text)
}

/// `run_ns wait_ns switched_in` → (run_ns, switched_in).
pub fn parse_schedstat(text: &str) -> Option<(u64, u64)> {
    let mut f = text.split_whitespace();
    let run = f.next()?.parse().ok()?;
    let _wait = f.next()?;
    Some((run, f.next()?.parse().ok()?))
}

/// Like [`read_switches`] for a process with one thread (its tid is its pid).
fn read_single_thread_switches(pid: u32, switches: &mut ThreadSwitches) {
    use std::io::Read;
    let mut buf = String::new();
    let Some(now) = std::fs::File::open(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|mut f| f.read_to_string(&mut buf).ok())
        .and_then(|_| parse_switches(&buf))
    else {
        return;
    };
    for (tid, (v, i)) in switches.live.drain() {
        // Other threads exited; the main thread's counts going down means a reused pid.
        if tid != pid || now.0 < v || now.1 < i {
            switches.dead.0 += v;
            switches.dead.1 += i;
        }
    }
    switches.live.insert(pid, now);
}

/// Updates the per-thread context switches of `pid` from /proc/PID/task/TID/status. The
/// process's own status file counts only its main thread, so every thread is read; threads
/// that exited keep their last counts in `dead`.
fn read_switches(pid: u32, switches: &mut ThreadSwitches) -> Option<()> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut live = HashMap::with_capacity(switches.live.len().max(1));
    let mut buf = String::new();
    for entry in dir.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(now) = read_thread_switches(pid, tid, &mut buf) else {
            continue;
        };
        if let Some(before) = switches.live.remove(&tid)
            && (now.0 < before.0 || now.1 < before.1)
        {
            // A reused tid: the thread that had it exited.
            switches.dead.0 += before.0;
            switches.dead.1 += before.1;
        }
        live.insert(tid, now);
    }
    for (v, i) in switches.live.values() {
        switches.dead.0 += v;
        switches.dead.1 += i;
    }
    switches.live = live;
    Some(())
}

/// (voluntary, involuntary) context switches of one thread. Parsed by hand from a reused
/// buffer: `procfs`'s `Status` parses and allocates all ~55 fields of the file per thread,
/// and this runs for every thread of every process in host mode (see `cargo xtask bench
/// health`).
fn read_thread_switches(pid: u32, tid: u32, buf: &mut String) -> Option<(u64, u64)> {
    use std::io::Read;
    buf.clear();
    std::fs::File::open(format!("/proc/{pid}/task/{tid}/status"))
        .ok()?
        .read_to_string(buf)
        .ok()?;
    parse_switches(buf)
}

/// The two context-switch lines of a status file.
pub fn parse_switches(status: &str) -> Option<(u64, u64)> {
    let mut voluntary = None;
    let mut involuntary = None;
    for line in status.lines().rev() {
        if let Some(v) = line.strip_prefix("voluntary_ctxt_switches:") {
            voluntary = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("nonvoluntary_ctxt_switches:") {
            involuntary = v.trim().parse().ok();
        }
        if voluntary.is_some() && involuntary.is_some() {
            break;
        }
    }
    Some((voluntary?, involuntary?))
}

/// The soft `RLIMIT_NOFILE` of a process (`prlimit`, one syscall instead of reading and
/// parsing /proc/PID/limits). `None` when unlimited or unreadable.
fn soft_nofile(pid: u32) -> Option<u64> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a null new limit only reads; `old` is a valid, writable rlimit.
    let rc = unsafe {
        libc::prlimit(
            libc::pid_t::try_from(pid).ok()?,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    (rc == 0 && old.rlim_cur != libc::RLIM_INFINITY).then_some(old.rlim_cur)
}

/// Effective cgroup v2 memory limits, cached per path for one sample.
#[derive(Default)]
struct CgroupLimits {
    cache: HashMap<String, Option<u64>>,
}

/// Where the cgroup hierarchies are mounted: v2 alone (`/sys/fs/cgroup`), or on a hybrid host
/// v2 at `unified/` and v1's memory controller at `memory/`.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

impl CgroupLimits {
    /// The tightest memory limit on `path` and its ancestors (`None`: no limit anywhere).
    /// `path` is `v1:/a/b` (v1 memory controller, `memory.limit_in_bytes`) or `v2:/a/b`
    /// (`memory.max`).
    fn of(&mut self, path: &str) -> Option<u64> {
        let path = path.trim_end_matches('/');
        let (version, rel) = path.split_once(':')?;
        if rel.is_empty() {
            return None;
        }
        if let Some(v) = self.cache.get(path) {
            return *v;
        }
        let root = Path::new(CGROUP_ROOT);
        let own = match version {
            "v1" => read_limit_in_bytes(&root.join("memory").join(rel.trim_start_matches('/'))),
            _ => {
                let base = if root.join("cgroup.controllers").exists() {
                    root.to_path_buf()
                } else {
                    root.join("unified")
                };
                read_memory_max(&base.join(rel.trim_start_matches('/')))
            }
        };
        let parent = path.rsplit_once('/').map(|(p, _)| p.to_owned());
        let up = parent.and_then(|p| self.of(&p));
        let v = match (own, up) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.cache.insert(path.to_owned(), v);
        v
    }
}

/// cgroup v1's `memory.limit_in_bytes`; `None` when unlimited (the page-rounded maximum).
pub fn read_limit_in_bytes(dir: &Path) -> Option<u64> {
    let v: u64 = std::fs::read_to_string(dir.join("memory.limit_in_bytes"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (v < 1 << 62).then_some(v)
}

/// `memory.max` of one cgroup directory; `None` for "max" or when absent.
pub fn read_memory_max(dir: &Path) -> Option<u64> {
    parse_memory_max(&std::fs::read_to_string(dir.join("memory.max")).ok()?)
}

/// Parses a `memory.max` file: a byte count, or `max`.
pub fn parse_memory_max(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(start: u64, user: u64, fds: u64) -> Reading {
        Reading {
            start_ticks: start,
            counters: Counters {
                user_ticks: user,
                system_ticks: user / 2,
                voluntary: user * 10,
                ..Counters::default()
            },
            threads: 2,
            fds,
            fd_limit: Some(1024 + fds),
            memory_limit: None,
            container: None,
        }
    }

    #[test]
    fn exited_processes_keep_counters_monotonic() {
        let mut l = Ledger::default();
        l.apply(&[(10, 1, reading(5, 100, 3)), (11, 1, reading(6, 50, 4))]);
        let s = &l.services()[&1];
        assert_eq!(s.counters.user_ticks, 150);
        assert_eq!((s.processes, s.threads, s.fds), (2, 4, 7));
        assert_eq!(s.fd_limit, Some(1027));
        // pid 11 exits; pid 10 goes on.
        l.apply(&[(10, 1, reading(5, 120, 3))]);
        let s = &l.services()[&1];
        assert_eq!(s.counters.user_ticks, 170);
        assert_eq!(s.counters.voluntary, 1700);
        assert_eq!((s.processes, s.fds), (1, 3));
        // pid 10 is reused by a new process: the old one's 120 stay.
        l.apply(&[(10, 1, reading(9, 7, 1))]);
        assert_eq!(l.services()[&1].counters.user_ticks, 177);
        // Everything exits.
        l.apply(&[]);
        let s = &l.services()[&1];
        assert_eq!(s.counters.user_ticks, 177);
        assert_eq!(s.processes, 0);
        assert_eq!(l.tracked(), (0, 1));
        l.forget_idle();
        assert_eq!(l.tracked(), (0, 0));
    }

    #[test]
    fn a_process_changing_service_leaves_its_past_behind() {
        let mut l = Ledger::default();
        l.apply(&[(10, 1, reading(5, 100, 0))]);
        l.apply(&[(10, 2, reading(5, 130, 0))]);
        let s = l.services();
        assert_eq!(s[&1].counters.user_ticks, 130);
        assert_eq!(s[&1].processes, 0);
        assert_eq!(s[&2].counters.user_ticks, 0);
        assert_eq!(s[&2].processes, 1);
        l.apply(&[(10, 2, reading(5, 140, 0))]);
        assert_eq!(l.services()[&2].counters.user_ticks, 10);
        assert_eq!(l.services()[&1].counters.user_ticks, 130);
    }

    #[test]
    fn memory_limit_only_when_every_process_has_one() {
        let mut l = Ledger::default();
        let limited = |mb: u64| Reading {
            memory_limit: Some(mb << 20),
            ..Reading::default()
        };
        l.apply(&[(1, 1, limited(100)), (2, 1, limited(200))]);
        assert_eq!(l.services()[&1].memory_limit, Some(200 << 20));
        l.apply(&[
            (1, 1, limited(100)),
            (2, 1, limited(200)),
            (3, 1, Reading::default()),
        ]);
        assert_eq!(l.services()[&1].memory_limit, None);
    }

    #[test]
    fn status_switch_lines() {
        let s = "Name:\tx\nvoluntary_ctxt_switches:\t12\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(parse_switches(s), Some((12, 3)));
        assert_eq!(parse_switches("Name:\tx\n"), None);
        assert_eq!(parse_schedstat("123 45 6\n"), Some((123, 6)));
        assert_eq!(parse_schedstat("123\n"), None);
        assert_eq!(parse_memory_max("max\n"), None);
        assert_eq!(parse_memory_max("1048576\n"), Some(1 << 20));
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        let mut c = ResourceCollector::new(true, false, Duration::ZERO);
        c.sample(&[(me, 4), (u32::MAX, 4)]);
        let snap = c.snapshot();
        let s = &snap.services[&4];
        assert_eq!(s.processes, 1);
        assert!(s.threads >= 1);
        assert!(s.fds >= 3, "{s:?}");
        assert!(s.counters.voluntary + s.counters.involuntary > 0);
        assert!(s.fd_limit.is_some());
        assert!(snap.ticks_per_second > 0);
    }
}
