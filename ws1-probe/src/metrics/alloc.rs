//! Allocation families (precise mode): bytes allocated and freed, mappings, sizes, leak
//! suspects.

use std::collections::BTreeMap;

use prometheus::proto::{MetricFamily, MetricType};
use ws1_probe_common::alloc::{AllocStats, SIZE_BOUNDS};

use super::{counter, family, gauge, label_pair};
use crate::collectors::alloc::Suspect;

/// Allocation metric families (precise mode).
pub fn families<'a>(
    stats: &BTreeMap<u32, AllocStats>,
    suspects: &[Suspect],
    label: impl Fn(u32) -> &'a str,
) -> Vec<MetricFamily> {
    let mut by_label: BTreeMap<&str, AllocStats> = BTreeMap::new();
    for (service, s) in stats {
        by_label
            .entry(label(*service))
            .or_insert(AllocStats::ZERO)
            .add(s);
    }
    let per = |f: &dyn Fn(&AllocStats) -> f64, gauge_kind: bool| {
        by_label
            .iter()
            .map(|(service, s)| {
                if gauge_kind {
                    gauge(&[("service", service)], f(s))
                } else {
                    counter(&[("service", service)], f(s))
                }
            })
            .collect()
    };
    let sizes = by_label
        .iter()
        .map(|(service, s)| {
            let mut h = prometheus::proto::Histogram::default();
            h.set_sample_count(s.allocs);
            h.set_sample_sum(s.alloc_bytes as f64);
            let mut acc = 0;
            let buckets = SIZE_BOUNDS
                .iter()
                .zip(s.size_buckets.iter())
                .map(|(bound, n)| {
                    acc += n;
                    let mut b = prometheus::proto::Bucket::default();
                    b.set_upper_bound(*bound as f64);
                    b.set_cumulative_count(acc);
                    b
                })
                .collect();
            h.set_bucket(buckets);
            let mut m = prometheus::proto::Metric::default();
            m.set_label(vec![label_pair("service", service)]);
            m.set_histogram(h);
            m
        })
        .collect();
    let suspect = |value: &dyn Fn(&Suspect) -> f64| {
        suspects
            .iter()
            .map(|s| {
                gauge(
                    &[
                        ("service", label(s.service)),
                        ("stack_id", &s.stack_id.to_string()),
                        ("function", &s.function),
                    ],
                    value(s),
                )
            })
            .collect()
    };
    vec![
        family(
            "ws1_probe_alloc_bytes_total",
            "Bytes allocated through the malloc family (precise mode).",
            MetricType::COUNTER,
            per(&|s| s.alloc_bytes as f64, false),
        ),
        family(
            "ws1_probe_free_bytes_total",
            "Bytes freed of allocations seen by precise mode.",
            MetricType::COUNTER,
            per(&|s| s.free_bytes as f64, false),
        ),
        family(
            "ws1_probe_alloc_outstanding_bytes",
            "Bytes allocated since precise mode attached and not freed yet.",
            MetricType::GAUGE,
            per(&|s| s.outstanding_bytes() as f64, true),
        ),
        family(
            "ws1_probe_mmap_bytes_total",
            "Anonymous memory mapped with mmap outside the allocator (precise mode).",
            MetricType::COUNTER,
            per(&|s| s.mmap_bytes as f64, false),
        ),
        family(
            "ws1_probe_munmap_bytes_total",
            "Bytes of those mappings unmapped again (precise mode).",
            MetricType::COUNTER,
            per(&|s| s.munmap_bytes as f64, false),
        ),
        family(
            "ws1_probe_brk_bytes_total",
            "Growth of the program break by brk outside the allocator (precise mode).",
            MetricType::COUNTER,
            per(&|s| s.brk_bytes as f64, false),
        ),
        family(
            "ws1_probe_alloc_size_bytes",
            "Sizes of allocations (precise mode).",
            MetricType::HISTOGRAM,
            sizes,
        ),
        family(
            "ws1_probe_leak_suspect_bytes",
            "Bytes outstanding for 30 s or more, by allocation stack (top 10 stacks, growing first).",
            MetricType::GAUGE,
            suspect(&|s| s.bytes as f64),
        ),
        family(
            "ws1_probe_leak_suspect_growth_bytes_per_second",
            "Growth of a leak suspect's outstanding bytes since the previous 30 s refresh.",
            MetricType::GAUGE,
            suspect(&|s| s.growth_bytes_per_second),
        ),
    ]
}
