//! Prometheus exposition: one file per probe turns its collector's snapshot into metric
//! families at scrape time (mirroring `report/`, which turns them into terminal output);
//! `agent.rs` holds the agent's own metrics. This file has the sample builders and the
//! encoder.

use std::collections::{BTreeMap, HashMap};

use prometheus::{
    TextEncoder,
    proto::{self, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::histogram::Histogram;

pub mod agent;
pub mod alloc;
pub mod block;
pub mod cache;
pub mod host;
pub mod memory;
pub mod net;
pub mod profile;
pub mod resources;
pub mod sched;
pub mod syscalls;

/// How many command-name labels host mode exports before folding the rest into `other`.
pub const HOST_LABEL_LIMIT: usize = 20;

/// Caps the `service` label's cardinality when services are command names.
///
/// Each service id is decided once, at the first scrape that sees it: the most active newcomers
/// take the free slots, the rest are exported as `other` for good. Deciding once keeps every
/// exported counter monotonic (a series never loses its past to another label).
#[derive(Clone, Debug)]
pub struct LabelCap {
    limit: usize,
    promoted: usize,
    decided: HashMap<u32, bool>,
}

impl LabelCap {
    /// `pinned` ids (configured services) always keep their own label and use no slot.
    pub fn new(limit: usize, pinned: impl IntoIterator<Item = u32>) -> Self {
        Self {
            limit,
            promoted: 0,
            decided: pinned.into_iter().map(|id| (id, true)).collect(),
        }
    }

    /// Decides newcomers, most active first.
    pub fn update(&mut self, activity: &BTreeMap<u32, u64>) {
        let mut newcomers: Vec<(u32, u64)> = activity
            .iter()
            .filter(|(id, _)| !self.decided.contains_key(id))
            .map(|(id, n)| (*id, *n))
            .collect();
        newcomers.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (id, _) in newcomers {
            let promote = id != 0 && self.promoted < self.limit;
            if promote {
                self.promoted += 1;
            }
            self.decided.insert(id, promote);
        }
    }

    /// Gives an undecided `id` its own label for good (a service configured by a reload); it
    /// uses no slot. An id already exported as `other` stays there: moving its past counts out
    /// would make `other` go backwards.
    pub fn pin(&mut self, id: u32) {
        self.decided.entry(id).or_insert(true);
    }

    /// Whether `id` is exported under its own name.
    pub fn keeps(&self, id: u32) -> bool {
        self.decided.get(&id).copied().unwrap_or(false)
    }
}

pub fn label_pair(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_owned());
    l.set_value(value.to_owned());
    l
}

fn metric(labels: &[(&str, &str)]) -> Metric {
    let mut m = Metric::default();
    m.set_label(labels.iter().map(|(k, v)| label_pair(k, v)).collect());
    m
}

/// A counter sample.
pub fn counter(labels: &[(&str, &str)], value: f64) -> Metric {
    let mut m = metric(labels);
    let mut c = proto::Counter::default();
    c.set_value(value);
    m.set_counter(c);
    m
}

/// A gauge sample.
pub fn gauge(labels: &[(&str, &str)], value: f64) -> Metric {
    let mut m = metric(labels);
    let mut g = proto::Gauge::default();
    g.set_value(value);
    m.set_gauge(g);
    m
}

/// A histogram sample in seconds with the exact kernel-counted `le` buckets.
pub fn histogram(labels: &[(&str, &str)], h: &Histogram, bounds_ns: &[u64]) -> Metric {
    scaled_histogram(labels, h, bounds_ns, 1e9)
}

/// A histogram sample whose values are reported divided by `unit` (1e9 turns nanoseconds into
/// seconds; 1.0 keeps bytes as bytes), with the exact kernel-counted `le` buckets.
pub fn scaled_histogram(
    labels: &[(&str, &str)],
    h: &Histogram,
    bounds_ns: &[u64],
    unit: f64,
) -> Metric {
    let mut m = metric(labels);
    let mut ph = proto::Histogram::default();
    ph.set_sample_count(h.count);
    ph.set_sample_sum(h.sum_ns as f64 / unit);
    let cumulative = h.cumulative(bounds_ns);
    let buckets = bounds_ns
        .iter()
        .zip(&cumulative)
        .map(|(bound, count)| {
            let mut b = proto::Bucket::default();
            b.set_upper_bound(*bound as f64 / unit);
            b.set_cumulative_count(*count);
            b
        })
        .collect();
    ph.set_bucket(buckets);
    m.set_histogram(ph);
    m
}

/// A metric family. Families without samples are left out by [`encode`] (the text encoder
/// rejects them).
pub fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_owned());
    f.set_help(help.to_owned());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

/// Encodes families in the Prometheus text format (version 0.0.4).
pub fn encode(families: &[MetricFamily]) -> String {
    let mut out = String::new();
    let non_empty: Vec<MetricFamily> = families
        .iter()
        .filter(|f| !f.get_metric().is_empty())
        .cloned()
        .collect();
    if let Err(err) = TextEncoder::new().encode_utf8(&non_empty, &mut out) {
        tracing::error!("cannot encode metrics: {err}");
    }
    out
}

/// Content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_cap_is_sticky_and_bounded() {
        let mut cap = LabelCap::new(2, [7]);
        let activity: BTreeMap<u32, u64> = [(1, 10), (2, 30), (3, 20), (0, 99)].into();
        cap.update(&activity);
        assert!(cap.keeps(7), "pinned");
        assert!(cap.keeps(2) && cap.keeps(3), "two most active");
        assert!(!cap.keeps(1) && !cap.keeps(0));
        // A later, busier newcomer cannot take a slot back: series stay monotonic.
        cap.update(&[(4, 1_000)].into());
        assert!(!cap.keeps(4));
        assert!(cap.keeps(2));
    }
}
