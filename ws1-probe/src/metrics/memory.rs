//! Memory-signal families: resident memory, its growth slope and page faults per service.

use std::collections::BTreeMap;

use prometheus::proto::{MetricFamily, MetricType};

use super::{counter, family, gauge};
use crate::collectors::memory::MemorySnapshot;

/// `ws1_probe_resident_memory_bytes`, `ws1_probe_memory_growth_bytes_per_second` and
/// `ws1_probe_page_faults_total`. `label` maps a service id to its exported label.
pub fn families<'a>(snap: &MemorySnapshot, label: impl Fn(u32) -> &'a str) -> Vec<MetricFamily> {
    let mut resident: BTreeMap<&str, f64> = BTreeMap::new();
    let mut growth: BTreeMap<&str, f64> = BTreeMap::new();
    for (service, bytes) in &snap.resident {
        *resident.entry(label(*service)).or_insert(0.0) += *bytes as f64;
    }
    for (service, slope) in &snap.growth {
        // Slopes of services folded into one label add up like their memory does.
        *growth.entry(label(*service)).or_insert(0.0) += slope;
    }
    let mut faults: BTreeMap<&str, f64> = BTreeMap::new();
    for (service, n) in &snap.faults {
        *faults.entry(label(*service)).or_insert(0.0) += *n as f64;
    }
    let gauges = |m: BTreeMap<&str, f64>| {
        m.into_iter()
            .map(|(service, v)| gauge(&[("service", service)], v))
            .collect()
    };
    vec![
        family(
            "ws1_probe_resident_memory_bytes",
            "Resident memory of the observed processes, per service (from /proc/PID/statm).",
            MetricType::GAUGE,
            gauges(resident),
        ),
        family(
            "ws1_probe_memory_growth_bytes_per_second",
            "Least-squares slope of resident memory over the last 5 minutes, per service.",
            MetricType::GAUGE,
            gauges(growth),
        ),
        family(
            "ws1_probe_page_faults_total",
            "Page faults of the observed processes, per service (sampled one in 64, scaled).",
            MetricType::COUNTER,
            faults
                .into_iter()
                .map(|(service, n)| counter(&[("service", service)], n))
                .collect(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::encode;

    #[test]
    fn folded_services_add_up() {
        let snap = MemorySnapshot {
            resident: [(1, 100), (2, 50)].into(),
            growth: [(1, 2.5), (2, 0.5)].into(),
            faults: [(2, 64)].into(),
        };
        let text = encode(&families(&snap, |_| "other"));
        for line in [
            "ws1_probe_resident_memory_bytes{service=\"other\"} 150",
            "ws1_probe_memory_growth_bytes_per_second{service=\"other\"} 3",
            "ws1_probe_page_faults_total{service=\"other\"} 64",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
