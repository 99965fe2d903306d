//! Profiler families: samples, truncated stacks and symbolization errors per service, the
//! first three also per runtime of the sampled processes (`runtime`: native, go, python, node,
//! jvm, unknown; see [`crate::profile::runtime`]), so a truncated share says which kind of
//! process loses its stacks.

use std::collections::BTreeMap;

use prometheus::proto::{MetricFamily, MetricType};

use super::{counter, family, gauge};
use crate::profile::{runtime::Runtime, windows::Totals};

/// `ws1_probe_profile_*` families from the per-service and per-runtime sample totals and the
/// symbolizer's error count.
pub fn families<'a>(
    totals: &BTreeMap<(u32, Runtime), Totals>,
    symbolization_errors: u64,
    label: impl Fn(u32) -> &'a str,
) -> Vec<MetricFamily> {
    let mut by_label: BTreeMap<(&str, Runtime), Totals> = BTreeMap::new();
    for ((service, runtime), t) in totals {
        let e = by_label.entry((label(*service), *runtime)).or_default();
        e.samples += t.samples;
        e.truncated += t.truncated;
    }
    let counters = |f: fn(&Totals) -> u64| {
        by_label
            .iter()
            .map(|((s, r), t)| counter(&[("service", s), ("runtime", r.label())], f(t) as f64))
            .collect()
    };
    vec![
        family(
            "ws1_probe_profile_samples_total",
            "On-CPU profile samples of the observed processes, per service and runtime (native, go, python, node, jvm, unknown).",
            MetricType::COUNTER,
            counters(|t| t.samples),
        ),
        family(
            "ws1_probe_profile_truncated_samples_total",
            "Profile samples whose user stack did not reach the process or thread entry (unwinding stopped early), per service and runtime.",
            MetricType::COUNTER,
            counters(|t| t.truncated),
        ),
        family(
            "ws1_probe_profile_truncated_stack_ratio",
            "Share of profile samples with truncated user stacks since start, per service and runtime.",
            MetricType::GAUGE,
            by_label
                .iter()
                .filter(|(_, t)| t.samples > 0)
                .map(|((s, r), t)| {
                    gauge(
                        &[("service", s), ("runtime", r.label())],
                        t.truncated as f64 / t.samples as f64,
                    )
                })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::encode;

    #[test]
    fn totals_per_service_and_runtime() {
        let t = |samples, truncated| Totals { samples, truncated };
        let totals = BTreeMap::from([
            ((1, Runtime::Node), t(400, 4)),
            ((1, Runtime::Native), t(100, 50)),
            // Two ids under one label add up per runtime.
            ((2, Runtime::Go), t(30, 0)),
            ((3, Runtime::Go), t(10, 10)),
            ((3, Runtime::Python), t(0, 0)),
        ]);
        let names = |id: u32| if id == 1 { "web" } else { "other" };
        let text = encode(&families(&totals, 7, names));
        for line in [
            "ws1_probe_profile_samples_total{service=\"web\",runtime=\"node\"} 400",
            "ws1_probe_profile_samples_total{service=\"web\",runtime=\"native\"} 100",
            "ws1_probe_profile_samples_total{service=\"other\",runtime=\"go\"} 40",
            "ws1_probe_profile_truncated_samples_total{service=\"other\",runtime=\"go\"} 10",
            "ws1_probe_profile_truncated_stack_ratio{service=\"web\",runtime=\"node\"} 0.01",
            "ws1_probe_profile_truncated_stack_ratio{service=\"web\",runtime=\"native\"} 0.5",
            "ws1_probe_profile_truncated_stack_ratio{service=\"other\",runtime=\"go\"} 0.25",
            "ws1_probe_profile_symbolization_errors_total 7",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        // No ratio without samples.
        assert!(!text.contains("ratio{service=\"other\",runtime=\"python\"}"));
    }
}
