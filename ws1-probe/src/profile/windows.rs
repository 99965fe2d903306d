//! Symbolized profile windows: each drain of the kernel counts becomes one window, symbolized
//! right away (while its processes still exist), kept so that a profile request can merge the
//! windows of its span, and counted into the per-service totals the metrics export.
//!
//! The CLI (`profile`, `top`) keeps windows for [`HISTORY`]. The agent keeps none
//! ([`Windows::keep_only_for_readers`]): a `/debug/pprof/profile?seconds=N` request registers as
//! a reader ([`Windows::open`]) and windows are kept only while a reader waits for them, so an
//! agent nobody asks for profiles holds no stacks at all. Either way the windows' estimated
//! bytes are capped ([`MAX_WINDOW_BYTES`]); past it the oldest go, and a profile that lost its
//! start says so through its shorter duration.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::{Duration, Instant, SystemTime},
};

use super::{
    Profile, ProfileKind,
    binary::{CacheBudgets, CacheStat},
    raw::{RawProfile, symbolize},
    runtime::{Runtime, Shares},
    symbols::ProfileSymbolizer,
};

/// How long windows are kept (CLI), and how long a reader may wait before it is forgotten.
pub const HISTORY: Duration = Duration::from_secs(600);
/// Estimated bytes of the windows kept, at most.
pub const MAX_WINDOW_BYTES: usize = 4 << 20;
/// Processes whose runtime is remembered for [`Windows::runtime_shares`], at most; past it only
/// those of the latest drain are kept.
const MAX_RUNTIME_PIDS: usize = 4096;

/// One drain's profiles.
pub struct Window {
    pub start: Instant,
    pub end: Instant,
    pub start_unix_ns: u64,
    pub cpu: Profile,
    pub off_cpu: Profile,
    /// Estimated heap bytes of both profiles.
    bytes: usize,
}

/// A registered wait for the windows from now on; see [`Windows::open`].
#[derive(Debug, PartialEq, Eq)]
pub struct Reader {
    id: u64,
    pub since: Instant,
}

/// Estimated heap bytes of a profile's stacks.
fn profile_bytes(p: &Profile) -> usize {
    p.stacks
        .iter()
        .map(|s| {
            std::mem::size_of::<super::StackSample>()
                + s.service.len()
                + s.frames
                    .iter()
                    .map(|f| {
                        std::mem::size_of::<super::ProfFrame>()
                            + f.function.len()
                            + f.module.as_ref().map_or(0, String::len)
                            + f.location.as_ref().map_or(0, String::len)
                    })
                    .sum::<usize>()
        })
        .sum()
}

/// The symbolizer, movable between threads with the probe that owns it.
pub struct SendSymbolizer(pub ProfileSymbolizer);

// SAFETY: blazesym's symbolizer is !Send only because it holds `Rc`s to its cached files. Every
// one of those `Rc`s is owned by the symbolizer itself (symbolization results are copied into
// owned strings before they leave `ProfileSymbolizer`), so moving the whole symbolizer to
// another thread moves every clone with it; it is never used from two threads at once (the
// probe that owns it sits behind a mutex).
unsafe impl Send for SendSymbolizer {}

impl std::ops::Deref for SendSymbolizer {
    type Target = ProfileSymbolizer;
    fn deref(&self) -> &ProfileSymbolizer {
        &self.0
    }
}

impl std::ops::DerefMut for SendSymbolizer {
    fn deref_mut(&mut self) -> &mut ProfileSymbolizer {
        &mut self.0
    }
}

/// Samples of one service since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub samples: u64,
    /// Samples whose user stack did not reach an outermost frame.
    pub truncated: u64,
}

pub struct Windows {
    pub sym: SendSymbolizer,
    history: VecDeque<Window>,
    /// Estimated bytes of `history`.
    bytes: usize,
    /// Windows ending within this long are kept without a reader.
    keep: Duration,
    /// Open readers by id, with the instant they wait from.
    readers: BTreeMap<u64, Instant>,
    next_reader: u64,
    /// On-CPU totals by service id and runtime, since start (monotonic).
    pub totals: BTreeMap<(u32, Runtime), Totals>,
    /// The runtime of the processes in recent windows, by pid.
    runtimes: HashMap<u32, Runtime>,
    last_end: Instant,
}

impl Default for Windows {
    fn default() -> Self {
        Self::new(true, CacheBudgets::default())
    }
}

impl Windows {
    /// Windows symbolized with DWARF (`debug_info`) or with ELF symbol tables only, by a
    /// symbolizer whose caches keep within `budgets`.
    pub fn new(debug_info: bool, budgets: CacheBudgets) -> Self {
        Self {
            sym: SendSymbolizer(ProfileSymbolizer::with_budgets(debug_info, budgets)),
            history: VecDeque::new(),
            bytes: 0,
            keep: HISTORY,
            readers: BTreeMap::new(),
            next_reader: 0,
            totals: BTreeMap::new(),
            runtimes: HashMap::new(),
            last_end: Instant::now(),
        }
    }

    /// Keeps windows only while a reader waits for them (the agent).
    pub fn keep_only_for_readers(&mut self) {
        self.keep = Duration::ZERO;
        self.prune(Instant::now());
    }

    /// Registers a wait for the windows from now on; hand it back to [`take`](Self::take).
    /// A reader not taken within [`HISTORY`] is forgotten.
    pub fn open(&mut self) -> Reader {
        let since = Instant::now();
        self.next_reader += 1;
        self.readers.insert(self.next_reader, since);
        Reader {
            id: self.next_reader,
            since,
        }
    }

    /// The windows since `reader` opened, merged (see [`since`](Self::since)); the reader is
    /// closed.
    pub fn take(&mut self, reader: Reader) -> (Profile, Profile) {
        let profiles = self.since(reader.since);
        self.readers.remove(&reader.id);
        self.prune(Instant::now());
        profiles
    }

    /// Windows kept and their estimated bytes, for `ws1_probe_agent_cache_*`.
    pub fn stat(&self) -> CacheStat {
        CacheStat {
            name: "profile_windows",
            bytes: self.bytes as u64,
            entries: self.history.len() as u64,
            budget: MAX_WINDOW_BYTES as u64,
            evictions: 0,
        }
    }

    /// Drops windows no reader waits for and older than `keep`, then the oldest past the byte
    /// cap.
    fn prune(&mut self, now: Instant) {
        self.readers
            .retain(|_, since| now.duration_since(*since) <= HISTORY);
        let oldest_reader = self.readers.values().min().copied();
        while let Some(w) = self.history.front() {
            let wanted = now.duration_since(w.end) < self.keep
                || oldest_reader.is_some_and(|since| w.end >= since);
            if wanted && self.bytes <= MAX_WINDOW_BYTES {
                break;
            }
            self.bytes -= w.bytes;
            self.history.pop_front();
        }
    }
}

/// Gives the heap freed by a drain (raw stacks, symbolization scratch) back to the system: glibc
/// keeps freed memory at the top of its heap otherwise, and RSS would show the peak of any drain.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn unix_ns(at: Instant) -> u64 {
    let ago = at.elapsed();
    SystemTime::now()
        .checked_sub(ago)
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Windows {
    /// Symbolizes one drain into a window ending now, and counts its samples.
    pub fn add<'a>(
        &mut self,
        raw: &RawProfile,
        frequency_hz: u64,
        service_name: impl Fn(u32) -> &'a str + Copy,
    ) {
        let end = Instant::now();
        let start = self.last_end;
        self.last_end = end;
        let cpu_stacks = symbolize(&raw.cpu, &mut self.sym, service_name);
        if self.runtimes.len() + raw.runtimes.len() > MAX_RUNTIME_PIDS {
            self.runtimes.clear();
        }
        self.runtimes
            .extend(raw.runtimes.iter().map(|(pid, r)| (*pid, *r)));
        for (r, s) in raw.cpu.iter().zip(&cpu_stacks) {
            let runtime = raw
                .runtimes
                .get(&r.tgid)
                .copied()
                .unwrap_or(Runtime::Unknown);
            let t = self.totals.entry((r.service, runtime)).or_default();
            t.samples += s.samples;
            if s.truncated {
                t.truncated += s.samples;
            }
        }
        let start_unix_ns = unix_ns(start);
        let mut cpu = Profile::new(ProfileKind::Cpu, frequency_hz, start_unix_ns);
        cpu.duration = end - start;
        cpu.stacks = cpu_stacks;
        cpu.merge();
        let mut off_cpu = Profile::new(ProfileKind::OffCpu, 0, start_unix_ns);
        off_cpu.duration = end - start;
        off_cpu.stacks = symbolize(&raw.off_cpu, &mut self.sym, service_name);
        off_cpu.merge();
        let bytes = profile_bytes(&cpu) + profile_bytes(&off_cpu);
        self.bytes += bytes;
        self.history.push_back(Window {
            start,
            end,
            start_unix_ns,
            cpu,
            off_cpu,
            bytes,
        });
        self.prune(end);
        release_free_memory();
    }

    /// Samples and truncated samples of `profile`'s stacks by the runtime of their process, as
    /// the processes were classified while they ran.
    pub fn runtime_shares(&self, profile: &Profile) -> Shares {
        let mut shares = Shares::default();
        for s in &profile.stacks {
            let runtime = self
                .runtimes
                .get(&s.pid)
                .copied()
                .unwrap_or(Runtime::Unknown);
            shares.add(runtime, s.samples, s.truncated);
        }
        shares
    }

    /// The windows that ended after `since`, merged into one on-CPU and one off-CPU profile.
    /// (Callers that need an exact window drain first and take `since` after that drain.)
    pub fn since(&self, since: Instant) -> (Profile, Profile) {
        let mut windows = self.history.iter().filter(|w| w.end > since).peekable();
        let (start, start_unix_ns) = windows
            .peek()
            .map_or((since, unix_ns(since)), |w| (w.start, w.start_unix_ns));
        let frequency = windows.peek().map_or(0, |w| w.cpu.frequency_hz);
        let mut cpu = Profile::new(ProfileKind::Cpu, frequency, start_unix_ns);
        let mut off_cpu = Profile::new(ProfileKind::OffCpu, 0, start_unix_ns);
        let mut end = start;
        for w in windows {
            cpu.stacks.extend(w.cpu.stacks.iter().cloned());
            off_cpu.stacks.extend(w.off_cpu.stacks.iter().cloned());
            end = w.end;
        }
        cpu.duration = end - start;
        off_cpu.duration = end - start;
        cpu.merge();
        off_cpu.merge();
        (cpu, off_cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(w: &mut Windows) {
        w.add(&RawProfile::default(), 19, |_| "svc");
    }

    #[test]
    fn the_agent_keeps_windows_only_for_readers() {
        let mut w = Windows::default();
        w.keep_only_for_readers();
        drain(&mut w);
        drain(&mut w);
        assert_eq!(w.stat().entries, 0);

        let first = w.open();
        drain(&mut w);
        let second = w.open();
        drain(&mut w);
        assert_eq!(w.stat().entries, 2);
        // The first reader needs both windows; once it is done, only the second one's stays.
        drop(w.take(first));
        assert_eq!(w.stat().entries, 1);
        drop(w.take(second));
        assert_eq!(w.stat().entries, 0);
        assert_eq!(w.stat().bytes, 0);
    }

    #[test]
    fn the_cli_keeps_windows_without_readers() {
        let mut w = Windows::default();
        drain(&mut w);
        drain(&mut w);
        assert_eq!(w.stat().entries, 2);
        assert_eq!(w.stat().budget, MAX_WINDOW_BYTES as u64);
    }
}
