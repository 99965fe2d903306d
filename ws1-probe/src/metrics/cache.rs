//! `ws1_probe_agent_cache_*`: the size of each of the agent's own caches against its budget, so
//! the memory budget (`--profile-cache-bytes`) can be watched from Prometheus.

use prometheus::proto::{MetricFamily, MetricType};

use crate::{
    metrics::{counter, family, gauge},
    profile::binary::CacheStat,
};

/// One family per measure, one series per cache (`cache` label). Caches bounded otherwise than
/// by bytes (budget 0) have no budget series.
pub fn families(stats: &[CacheStat]) -> Vec<MetricFamily> {
    if stats.is_empty() {
        return Vec::new();
    }
    let series = |f: fn(&CacheStat) -> u64, counts: bool| {
        stats
            .iter()
            .map(|s| {
                let labels = [("cache", s.name)];
                if counts {
                    counter(&labels, f(s) as f64)
                } else {
                    gauge(&labels, f(s) as f64)
                }
            })
            .collect()
    };
    vec![
        family(
            "ws1_probe_agent_cache_bytes",
            "Estimated bytes held by each of the agent's caches.",
            MetricType::GAUGE,
            series(|s| s.bytes, false),
        ),
        family(
            "ws1_probe_agent_cache_entries",
            "Entries in each of the agent's caches.",
            MetricType::GAUGE,
            series(|s| s.entries, false),
        ),
        family(
            "ws1_probe_agent_cache_budget_bytes",
            "Bytes each cache may hold (its share of --profile-cache-bytes); caches bounded otherwise have none.",
            MetricType::GAUGE,
            stats
                .iter()
                .filter(|s| s.budget > 0)
                .map(|s| gauge(&[("cache", s.name)], s.budget as f64))
                .collect(),
        ),
        family(
            "ws1_probe_agent_cache_evictions_total",
            "Entries evicted from each cache to keep it within its budget.",
            MetricType::COUNTER,
            series(|s| s.evictions, true),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_series_per_cache() {
        let stats = [
            CacheStat {
                name: "symbol_frames",
                bytes: 100,
                entries: 3,
                budget: 1000,
                evictions: 2,
            },
            CacheStat {
                name: "kernel_symbols",
                bytes: 50,
                entries: 5,
                budget: 0,
                evictions: 0,
            },
        ];
        let text = crate::metrics::encode(&families(&stats));
        assert!(text.contains("ws1_probe_agent_cache_bytes{cache=\"symbol_frames\"} 100"));
        assert!(text.contains("ws1_probe_agent_cache_entries{cache=\"kernel_symbols\"} 5"));
        assert!(text.contains("ws1_probe_agent_cache_budget_bytes{cache=\"symbol_frames\"} 1000"));
        assert!(!text.contains("ws1_probe_agent_cache_budget_bytes{cache=\"kernel_symbols\"}"));
        assert!(text.contains("ws1_probe_agent_cache_evictions_total{cache=\"symbol_frames\"} 2"));
        assert!(families(&[]).is_empty());
    }
}
