//! Symbolized profile windows: each drain of the kernel counts becomes one window, symbolized
//! right away (while its processes still exist), kept for [`HISTORY`] so
//! `/debug/pprof/profile?seconds=N` can merge the windows of its request, and counted into the
//! per-service totals the metrics export.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant, SystemTime},
};

use super::{Profile, ProfileKind, symbols::ProfileSymbolizer};
use crate::collectors::profile::{RawProfile, symbolize};

/// How long windows are kept.
pub const HISTORY: Duration = Duration::from_secs(600);

/// One drain's profiles.
pub struct Window {
    pub start: Instant,
    pub end: Instant,
    pub start_unix_ns: u64,
    pub cpu: Profile,
    pub off_cpu: Profile,
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
    /// On-CPU totals by service id, since start (monotonic).
    pub totals: BTreeMap<u32, Totals>,
    last_end: Instant,
}

impl Default for Windows {
    fn default() -> Self {
        Self::new(true)
    }
}

impl Windows {
    /// Windows symbolized with DWARF (`debug_info`) or with ELF symbol tables only.
    pub fn new(debug_info: bool) -> Self {
        Self {
            sym: SendSymbolizer(ProfileSymbolizer::with_debug_info(debug_info)),
            history: VecDeque::new(),
            totals: BTreeMap::new(),
            last_end: Instant::now(),
        }
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
        for (r, s) in raw.cpu.iter().zip(&cpu_stacks) {
            let t = self.totals.entry(r.service).or_default();
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
        self.history.push_back(Window {
            start,
            end,
            start_unix_ns,
            cpu,
            off_cpu,
        });
        while self
            .history
            .front()
            .is_some_and(|w| end.duration_since(w.end) > HISTORY)
        {
            self.history.pop_front();
        }
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
