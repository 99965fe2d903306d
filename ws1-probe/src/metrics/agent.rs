//! The agent's own metrics: CPU, memory, BPF program cost, map fill, drops, targets, build
//! information and the standard `process_*` metrics.

use std::{collections::BTreeMap, time::Duration};

use prometheus::{
    core::Collector,
    proto::{MetricFamily, MetricType},
};

use super::{counter, family, gauge};
use crate::collectors::MapUsage;

/// What the probe knows about itself at a scrape; built by [`crate::probe::Probe`].
#[derive(Clone, Debug, Default)]
pub struct AgentStats {
    pub bpf_stats_enabled: bool,
    /// Name, run time and run count of each attached program.
    pub programs: Vec<(String, Duration, u64)>,
    pub maps: Vec<MapUsage>,
    /// Drop counters by reason label.
    pub drops: Vec<(&'static str, u64)>,
}

/// CPU seconds (user + system) and resident bytes of this process, from /proc/self/stat.
pub fn own_usage() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised comm; utime and stime are fields 14 and 15, rss is 24.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let rss_pages: u64 = fields.get(21)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    Some(((utime + stime) as f64 / ticks, rss_pages * page))
}

/// `targeted` is the number of observed processes per service id.
pub fn families<'a>(
    stats: &AgentStats,
    targeted: &BTreeMap<u32, u64>,
    label: &dyn Fn(u32) -> &'a str,
) -> Vec<MetricFamily> {
    let mut out = Vec::new();
    if let Some((cpu, rss)) = own_usage() {
        out.push(family(
            "ws1_probe_agent_cpu_seconds_total",
            "CPU time used by the agent (user + system).",
            MetricType::COUNTER,
            vec![counter(&[], cpu)],
        ));
        out.push(family(
            "ws1_probe_agent_resident_memory_bytes",
            "Resident memory of the agent.",
            MetricType::GAUGE,
            vec![gauge(&[], rss as f64)],
        ));
    }
    out.push(family(
        "ws1_probe_build_info",
        "Version and build of the running agent; always 1.",
        MetricType::GAUGE,
        vec![gauge(
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                (
                    "commit",
                    option_env!("WS1_PROBE_COMMIT").unwrap_or("unknown"),
                ),
            ],
            1.0,
        )],
    ));
    out.extend(process_families());
    out.push(family(
        "ws1_probe_bpf_stats_enabled",
        "1 when kernel BPF run-time statistics are on (agent --bpf-stats); program run metrics are 0 otherwise.",
        MetricType::GAUGE,
        vec![gauge(&[], f64::from(u8::from(stats.bpf_stats_enabled)))],
    ));
    out.push(family(
        "ws1_probe_bpf_program_run_seconds_total",
        "Time the kernel spent running each BPF program.",
        MetricType::COUNTER,
        stats
            .programs
            .iter()
            .map(|(name, time, _)| counter(&[("program", name)], time.as_secs_f64()))
            .collect(),
    ));
    out.push(family(
        "ws1_probe_bpf_program_runs_total",
        "Times each BPF program ran.",
        MetricType::COUNTER,
        stats
            .programs
            .iter()
            .map(|(name, _, runs)| counter(&[("program", name)], *runs as f64))
            .collect(),
    ));
    let usage = &stats.maps;
    out.push(family(
        "ws1_probe_bpf_map_entries",
        "Entries in use in each BPF map.",
        MetricType::GAUGE,
        usage
            .iter()
            .map(|u| gauge(&[("map", u.map)], u.entries as f64))
            .collect(),
    ));
    out.push(family(
        "ws1_probe_bpf_map_capacity",
        "Maximum entries of each BPF map.",
        MetricType::GAUGE,
        usage
            .iter()
            .map(|u| gauge(&[("map", u.map)], u.capacity as f64))
            .collect(),
    ));
    out.push(family(
        "ws1_probe_events_dropped_total",
        "Events the kernel programs could not record, by reason.",
        MetricType::COUNTER,
        stats
            .drops
            .iter()
            .map(|(reason, n)| counter(&[("reason", reason)], *n as f64))
            .collect(),
    ));
    out.push(family(
        "ws1_probe_untrusted_input_refused_total",
        "Files controlled by observed processes (perf maps, binaries) the agent refused to read, by kind and reason; each refusal is logged once per file.",
        MetricType::COUNTER,
        crate::untrusted::refused_counts()
            .iter()
            .map(|(kind, reason, n)| counter(&[("kind", kind), ("reason", reason)], *n as f64))
            .collect(),
    ));
    let mut by_label: BTreeMap<&str, u64> = BTreeMap::new();
    for (id, n) in targeted {
        *by_label.entry(label(*id)).or_insert(0) += n;
    }
    out.push(family(
        "ws1_probe_targeted_processes",
        "Processes currently observed, per service.",
        MetricType::GAUGE,
        by_label
            .iter()
            .map(|(service, n)| gauge(&[("service", service)], *n as f64))
            .collect(),
    ));
    out
}

/// The standard `process_*` metrics of this process (CPU, memory, file descriptors, start
/// time), from the `prometheus` crate's process collector, which reads procfs.
pub fn process_families() -> Vec<MetricFamily> {
    prometheus::process_collector::ProcessCollector::for_self().collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    #[test]
    fn own_usage_reads_this_process() {
        let (cpu, rss) = super::own_usage().unwrap();
        assert!(cpu >= 0.0);
        // A test binary is resident for at least a megabyte.
        assert!(rss > 1 << 20, "rss {rss}");
    }

    #[test]
    fn process_metrics_and_build_info_are_exported() {
        let text = crate::metrics::encode(&super::families(
            &super::AgentStats::default(),
            &BTreeMap::new(),
            &|_| "x",
        ));
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
            "ws1_probe_build_info{version=\"",
            "ws1_probe_untrusted_input_refused_total{kind=\"perf_map\",reason=\"symlink\"} ",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "no {name} in\n{text}"
            );
        }
    }
}
