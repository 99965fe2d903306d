//! The always-on memory signal: resident memory per service from procfs, and its growth slope,
//! so the agent flags a growing service without paying for allocation uprobes. No kernel part:
//! the processes come from the targeting map, their memory from /proc/PID/statm.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{MapData, StackTraceMap},
    programs::perf_event::{SamplePolicy, SoftwareEvent},
};
use ws1_probe_common::memory::{FAULT_SAMPLE_PERIOD, FaultKey};

use super::{take_map, typed};
use crate::{ebpf::LoadError, symbolize::Symbolizer};

/// How far back the growth slope looks.
pub const WINDOW: Duration = Duration::from_secs(300);
/// Minimum time between two samples of the same service.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Growth at or above this rate, sustained over at least [`MIN_SPAN`], is flagged.
pub const FLAG_BYTES_PER_SECOND: f64 = 64.0 * 1024.0;
/// A slope over less time than this is not trusted for flagging.
pub const MIN_SPAN: Duration = Duration::from_secs(120);

/// Least-squares slope of resident bytes over time, per service.
#[derive(Debug, Default)]
pub struct Growth {
    samples: HashMap<u32, VecDeque<(f64, f64)>>,
}

impl Growth {
    /// Adds a sample at `t` seconds (any monotonic origin) and drops samples older than the
    /// window.
    pub fn record(&mut self, service: u32, t: f64, bytes: u64) {
        let q = self.samples.entry(service).or_default();
        q.push_back((t, bytes as f64));
        while q
            .front()
            .is_some_and(|(t0, _)| t - t0 > WINDOW.as_secs_f64())
        {
            q.pop_front();
        }
    }

    /// Forgets services that have no process left.
    pub fn retain(&mut self, live: impl Fn(u32) -> bool) {
        self.samples.retain(|service, _| live(*service));
    }

    /// Bytes per second, or `None` with fewer than three samples.
    pub fn slope(&self, service: u32) -> Option<f64> {
        let q = self.samples.get(&service)?;
        if q.len() < 3 {
            return None;
        }
        let n = q.len() as f64;
        let mean_t = q.iter().map(|(t, _)| t).sum::<f64>() / n;
        let mean_b = q.iter().map(|(_, b)| b).sum::<f64>() / n;
        let (num, den) = q.iter().fold((0.0, 0.0), |(num, den), (t, b)| {
            (
                num + (t - mean_t) * (b - mean_b),
                den + (t - mean_t).powi(2),
            )
        });
        (den > 0.0).then(|| num / den)
    }

    /// Seconds between the first and last sample of a service.
    pub fn span(&self, service: u32) -> f64 {
        self.samples
            .get(&service)
            .map_or(0.0, |q| match (q.front(), q.back()) {
                (Some((a, _)), Some((b, _))) => b - a,
                _ => 0.0,
            })
    }
}

/// Resident bytes of a process from /proc/PID/statm, or `None` if it is gone.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    Some(pages * page)
}

/// Sampled page faults by (service, stack), when the perf event could be attached.
pub struct FaultSampler {
    faults: aya::maps::HashMap<MapData, FaultKey, u64>,
    stacks: StackTraceMap<MapData>,
}

pub struct MemoryCollector {
    /// Off in one-shot commands that do not use the memory signal.
    enabled: bool,
    pub faults: Option<FaultSampler>,
    started: Instant,
    last_sample: Option<Instant>,
    pub resident: BTreeMap<u32, u64>,
    pub growth: Growth,
    /// When each service was last flagged in the log.
    flagged: HashMap<u32, Instant>,
}

impl Default for MemoryCollector {
    fn default() -> Self {
        Self {
            enabled: true,
            faults: None,
            started: Instant::now(),
            last_sample: None,
            resident: BTreeMap::new(),
            growth: Growth::default(),
            flagged: HashMap::new(),
        }
    }
}

impl MemoryCollector {
    /// Whether [`MemoryCollector::sample`] would take a sample now; lets callers skip listing
    /// the targeted processes on every scrape.
    pub fn due(&self) -> bool {
        self.enabled
            && self
                .last_sample
                .is_none_or(|last| last.elapsed() >= SAMPLE_EVERY)
    }

    /// The collector with the page-fault sampler attached on every online CPU. A kernel
    /// without perf events loses only the page-fault part, with a warning.
    /// When `enabled` is false nothing is attached and nothing is sampled.
    pub fn attach(ebpf: &mut Ebpf, enabled: bool) -> Result<Self, LoadError> {
        let mut collector = Self {
            enabled,
            ..Self::default()
        };
        if !enabled {
            return Ok(collector);
        }
        match attach_faults(ebpf) {
            Ok(faults) => collector.faults = Some(faults),
            Err(err) => tracing::warn!(
                "page faults are not sampled: {err}; resident memory still is (`ws1-probe check` lists what this kernel allows)"
            ),
        }
        Ok(collector)
    }

    /// Deletes the page-fault entries of `services` (gone, their counts already read), like
    /// `SyscallCollector::reclaim`. Returns how many were deleted.
    pub fn reclaim(&mut self, services: &std::collections::BTreeSet<u32>) -> usize {
        let Some(f) = self.faults.as_mut() else {
            return 0;
        };
        if services.is_empty() {
            return 0;
        }
        let keys: Vec<FaultKey> = f
            .faults
            .keys()
            .flatten()
            .filter(|k| services.contains(&k.service))
            .collect();
        keys.iter().filter(|k| f.faults.remove(k).is_ok()).count()
    }

    /// Sampled page faults per service, scaled by the sample period (an estimate).
    pub fn faults_by_service(&self) -> BTreeMap<u32, u64> {
        let mut out = BTreeMap::new();
        if let Some(f) = &self.faults {
            for (key, n) in f.faults.iter().flatten() {
                *out.entry(key.service).or_insert(0) += n * FAULT_SAMPLE_PERIOD;
            }
        }
        out
    }

    /// The function where a service faults in the most memory (first frame of its most
    /// sampled stack), symbolized in process `pid`.
    pub fn top_fault_function(&self, service: u32, pid: u32) -> Option<String> {
        let f = self.faults.as_ref()?;
        let (key, _) = f
            .faults
            .iter()
            .flatten()
            .filter(|(k, _)| k.service == service && k.stack_id >= 0)
            .max_by_key(|(_, n)| *n)?;
        let trace = f.stacks.get(&u32::try_from(key.stack_id).ok()?, 0).ok()?;
        let ip = trace.frames().first()?.ip;
        let frame = Symbolizer::new()
            .user_frames(pid, &[ip])
            .into_iter()
            .next()?;
        Some(frame.display())
    }

    /// Samples resident memory per service from `targets` (pid → service), at most every
    /// [`SAMPLE_EVERY`]. Returns the services whose growth should be flagged now.
    pub fn sample(&mut self, targets: &[(u32, u32)]) -> Vec<(u32, f64)> {
        if !self.due() {
            return Vec::new();
        }
        let now = Instant::now();
        self.last_sample = Some(now);
        let mut resident: BTreeMap<u32, u64> = BTreeMap::new();
        for (pid, service) in targets {
            if let Some(bytes) = resident_bytes(*pid) {
                *resident.entry(*service).or_insert(0) += bytes;
            }
        }
        let t = now.duration_since(self.started).as_secs_f64();
        for (service, bytes) in &resident {
            self.growth.record(*service, t, *bytes);
        }
        self.growth.retain(|s| resident.contains_key(&s));
        self.resident = resident;
        let mut flag = Vec::new();
        for service in self.resident.keys() {
            let Some(slope) = self.growth.slope(*service) else {
                continue;
            };
            let recently = self
                .flagged
                .get(service)
                .is_some_and(|at| now.duration_since(*at) < WINDOW);
            if slope >= FLAG_BYTES_PER_SECOND
                && self.growth.span(*service) >= MIN_SPAN.as_secs_f64()
                && !recently
            {
                self.flagged.insert(*service, now);
                flag.push((*service, slope));
            }
        }
        flag
    }
}

/// What the memory signal knows at a scrape, per service id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemorySnapshot {
    /// Resident bytes at the last sample.
    pub resident: BTreeMap<u32, u64>,
    /// Growth slope in bytes per second, where there are enough samples.
    pub growth: BTreeMap<u32, f64>,
    /// Page faults (sampled, scaled by the sample period).
    pub faults: BTreeMap<u32, u64>,
}

impl MemoryCollector {
    /// The resident memory, growth slopes and page faults for the metrics.
    pub fn snapshot(&self) -> MemorySnapshot {
        MemorySnapshot {
            resident: self.resident.clone(),
            growth: self
                .resident
                .keys()
                .filter_map(|s| Some((*s, self.growth.slope(*s)?)))
                .collect(),
            faults: self.faults_by_service(),
        }
    }
}

/// Opens a sampling page-fault perf event on every online CPU with the `page_fault` program.
fn attach_faults(ebpf: &mut Ebpf) -> Result<FaultSampler, LoadError> {
    crate::ebpf::attach_perf_all_cpus(
        ebpf,
        "page_fault",
        SoftwareEvent::PageFaults,
        SamplePolicy::Period(FAULT_SAMPLE_PERIOD),
        "page-faults",
    )?;
    Ok(FaultSampler {
        faults: typed("PAGE_FAULTS", take_map(ebpf, "PAGE_FAULTS")?)?,
        stacks: typed("FAULT_STACKS", take_map(ebpf, "FAULT_STACKS")?)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_linear_growth() {
        let mut g = Growth::default();
        for i in 0..10u32 {
            g.record(1, f64::from(i) * 5.0, 1_000_000 + u64::from(i) * 5_000);
        }
        let s = g.slope(1).unwrap();
        assert!((s - 1_000.0).abs() < 1e-6, "{s}");
        assert_eq!(g.span(1), 45.0);
        assert_eq!(g.slope(2), None);
    }

    #[test]
    fn flat_and_too_few_samples() {
        let mut g = Growth::default();
        g.record(1, 0.0, 100);
        g.record(1, 5.0, 100);
        assert_eq!(g.slope(1), None);
        g.record(1, 10.0, 100);
        assert_eq!(g.slope(1), Some(0.0));
    }

    #[test]
    fn window_drops_old_samples() {
        let mut g = Growth::default();
        g.record(1, 0.0, 0);
        g.record(1, 1.0, 1_000_000);
        g.record(1, 400.0, 1_000_000);
        g.record(1, 401.0, 1_000_000);
        g.record(1, 402.0, 1_000_000);
        // The early jump fell out of the 300 s window.
        assert_eq!(g.slope(1), Some(0.0));
        g.retain(|s| s != 1);
        assert_eq!(g.slope(1), None);
    }

    #[test]
    fn reads_own_resident_memory() {
        let rss = resident_bytes(std::process::id()).unwrap();
        assert!(rss > 1 << 20, "{rss}");
        assert_eq!(resident_bytes(u32::MAX), None);
    }

    #[test]
    fn samples_sum_per_service() {
        let me = std::process::id();
        let mut m = MemoryCollector::default();
        assert!(m.sample(&[(me, 3), (u32::MAX, 3)]).is_empty());
        assert!(m.resident[&3] > 0);
        // Rate-limited: a second call right away does not sample.
        m.resident.clear();
        m.sample(&[(me, 3)]);
        assert!(m.resident.is_empty());
    }
}
