//! Profiler families: samples, truncated stacks and symbolization errors per service.

use std::collections::BTreeMap;

use prometheus::proto::{MetricFamily, MetricType};

use super::{counter, family, gauge};
use crate::profile::windows::Totals;

/// `ws1_probe_profile_*` families from the per-service sample totals and the symbolizer's
/// error count.
pub fn families<'a>(
    totals: &BTreeMap<u32, Totals>,
    symbolization_errors: u64,
    label: impl Fn(u32) -> &'a str,
) -> Vec<MetricFamily> {
    let mut by_label: BTreeMap<&str, Totals> = BTreeMap::new();
    for (service, t) in totals {
        let e = by_label.entry(label(*service)).or_default();
        e.samples += t.samples;
        e.truncated += t.truncated;
    }
    let counters = |f: fn(&Totals) -> u64| {
        by_label
            .iter()
            .map(|(s, t)| counter(&[("service", s)], f(t) as f64))
            .collect()
    };
    vec![
        family(
            "ws1_probe_profile_samples_total",
            "On-CPU profile samples of the observed processes, per service.",
            MetricType::COUNTER,
            counters(|t| t.samples),
        ),
        family(
            "ws1_probe_profile_truncated_samples_total",
            "Profile samples whose user stack did not reach the process or thread entry (unwinding stopped early), per service.",
            MetricType::COUNTER,
            counters(|t| t.truncated),
        ),
        family(
            "ws1_probe_profile_truncated_stack_ratio",
            "Share of profile samples with truncated user stacks since start, per service.",
            MetricType::GAUGE,
            by_label
                .iter()
                .filter(|(_, t)| t.samples > 0)
                .map(|(s, t)| gauge(&[("service", s)], t.truncated as f64 / t.samples as f64))
                .collect(),
        ),
        family(
            "ws1_probe_profile_symbolization_errors_total",
            "Addresses of profile stacks that no symbol, perf map or kernel symbol could name (kept as build id + offset).",
            MetricType::COUNTER,
            vec![counter(&[], symbolization_errors as f64)],
        ),
    ]
}
