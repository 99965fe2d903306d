//! Block I/O families: request latency and completed bytes per service, device and operation.

use std::collections::BTreeMap;

use prometheus::proto::{MetricFamily, MetricType};
use ws1_probe_common::block::op_label;

use super::{counter, family, histogram};
use crate::{collectors::block::BlockSnapshot, histogram::Histogram};

/// Name of the latency family (the `health` command reads it).
pub const DURATION: &str = "ws1_probe_block_io_duration_seconds";
/// Name of the bytes family.
pub const BYTES: &str = "ws1_probe_block_io_bytes_total";

/// `ws1_probe_block_io_duration_seconds{service,device,op}` and
/// `ws1_probe_block_io_bytes_total{service,device,op}`. `label` maps a service id to its
/// exported label; series of ids that share a label are summed.
pub fn families<'a>(
    snap: &BlockSnapshot,
    label: impl Fn(u32) -> &'a str,
    bounds_ns: &[u64],
) -> Vec<MetricFamily> {
    let mut hists: BTreeMap<(&str, &str, u32), Histogram> = BTreeMap::new();
    let mut bytes: BTreeMap<(&str, &str, u32), u64> = BTreeMap::new();
    for ((service, device, op), s) in &snap.series {
        let key = (label(*service), device.as_str(), *op);
        if s.latency.count > 0 {
            hists.entry(key).or_default().add(&s.latency);
        }
        *bytes.entry(key).or_insert(0) += s.bytes;
    }
    let durations = hists
        .iter()
        .map(|((service, device, op), h)| {
            histogram(
                &[
                    ("service", service),
                    ("device", device),
                    ("op", op_label(*op)),
                ],
                h,
                bounds_ns,
            )
        })
        .collect();
    let bytes = bytes
        .iter()
        .map(|((service, device, op), n)| {
            counter(
                &[
                    ("service", service),
                    ("device", device),
                    ("op", op_label(*op)),
                ],
                *n as f64,
            )
        })
        .collect();
    vec![
        family(
            DURATION,
            "Block I/O request latency from the request's creation in the submitting process (block_io_start) to its completion: scheduler queueing plus device time, per service, whole-disk device and operation (read, write, flush, discard).",
            MetricType::HISTOGRAM,
            durations,
        ),
        family(
            BYTES,
            "Bytes of completed block I/O requests, per service, whole-disk device and operation.",
            MetricType::COUNTER,
            bytes,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{collectors::block::BlockStats, metrics::encode};
    use ws1_probe_common::{
        block::{OP_FLUSH, OP_WRITE},
        hist::DEFAULT_EXPORT_BOUNDS_NS,
    };

    #[test]
    fn services_sharing_a_label_add_up() {
        let bounds = DEFAULT_EXPORT_BOUNDS_NS.to_vec();
        let stats = |ns: &[u64], bytes| {
            let mut latency = Histogram::default();
            for v in ns {
                latency.observe(&bounds, *v);
            }
            BlockStats { latency, bytes }
        };
        let snap = BlockSnapshot {
            series: [
                (
                    (1, "vda".to_owned(), OP_WRITE),
                    stats(&[40_000, 60_000], 8192),
                ),
                ((2, "vda".to_owned(), OP_WRITE), stats(&[2_000_000], 4096)),
                ((1, "vda".to_owned(), OP_FLUSH), stats(&[90_000], 0)),
            ]
            .into(),
        };
        let text = encode(&families(&snap, |_| "db", &bounds));
        for line in [
            "ws1_probe_block_io_duration_seconds_count{service=\"db\",device=\"vda\",op=\"write\"} 3",
            "ws1_probe_block_io_duration_seconds_bucket{service=\"db\",device=\"vda\",op=\"write\",le=\"0.00005\"} 1",
            "ws1_probe_block_io_duration_seconds_bucket{service=\"db\",device=\"vda\",op=\"write\",le=\"0.0025\"} 3",
            "ws1_probe_block_io_duration_seconds_count{service=\"db\",device=\"vda\",op=\"flush\"} 1",
            "ws1_probe_block_io_bytes_total{service=\"db\",device=\"vda\",op=\"write\"} 12288",
            "ws1_probe_block_io_bytes_total{service=\"db\",device=\"vda\",op=\"flush\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
