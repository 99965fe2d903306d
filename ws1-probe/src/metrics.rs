//! Prometheus exposition: builds metric families from collector snapshots at scrape time and
//! encodes them with the `prometheus` crate's text encoder.

use std::collections::{BTreeMap, HashMap};

use prometheus::{
    TextEncoder,
    proto::{self, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::{
    collectors::syscalls::SyscallSnapshot,
    histogram::Histogram,
    names::{errno_label, syscall_label},
};

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

/// Syscall families. `label` maps a service id to its exported label.
pub fn syscall_families<'a>(
    snap: &SyscallSnapshot,
    label: impl Fn(u32) -> &'a str,
    bounds_ns: &[u64],
) -> Vec<MetricFamily> {
    let mut hists: BTreeMap<(&str, u32), Histogram> = BTreeMap::new();
    for ((service, nr), h) in &snap.hists {
        hists.entry((label(*service), *nr)).or_default().add(h);
    }
    let mut errors: BTreeMap<(&str, u32, u32), u64> = BTreeMap::new();
    for ((service, nr, errno), n) in &snap.errors {
        *errors.entry((label(*service), *nr, *errno)).or_insert(0) += n;
    }
    let durations = hists
        .iter()
        .map(|((service, nr), h)| {
            histogram(
                &[("service", service), ("syscall", &syscall_label(*nr))],
                h,
                bounds_ns,
            )
        })
        .collect();
    let errors = errors
        .iter()
        .map(|((service, nr, errno), n)| {
            counter(
                &[
                    ("service", service),
                    ("syscall", &syscall_label(*nr)),
                    ("errno", &errno_label(*errno)),
                ],
                *n as f64,
            )
        })
        .collect();
    vec![
        family(
            "ws1_probe_syscall_duration_seconds",
            "Syscall latency from sys_enter to sys_exit, per service and syscall.",
            MetricType::HISTOGRAM,
            durations,
        ),
        family(
            "ws1_probe_syscall_errors_total",
            "Syscalls that returned an error, per service, syscall and errno.",
            MetricType::COUNTER,
            errors,
        ),
    ]
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
    use ws1_probe_common::hist::DEFAULT_EXPORT_BOUNDS_NS;

    #[test]
    fn renders_syscall_histogram_and_errors() {
        let bounds = &DEFAULT_EXPORT_BOUNDS_NS;
        let mut h = Histogram::default();
        h.observe(bounds, 1_000);
        h.observe(bounds, 3_000_000);
        h.observe(bounds, 30_000_000_000);
        let mut snap = SyscallSnapshot::default();
        snap.hists.insert((1, 110), h);
        snap.errors.insert((1, 257, 2), 5);
        let names = ["other", "trading-engine"];
        let text = encode(&syscall_families(&snap, |id| names[id as usize], bounds));
        let want = [
            "# TYPE ws1_probe_syscall_duration_seconds histogram",
            "ws1_probe_syscall_duration_seconds_bucket{service=\"trading-engine\",syscall=\"getppid\",le=\"0.000001\"} 1",
            "ws1_probe_syscall_duration_seconds_bucket{service=\"trading-engine\",syscall=\"getppid\",le=\"0.0025\"} 1",
            "ws1_probe_syscall_duration_seconds_bucket{service=\"trading-engine\",syscall=\"getppid\",le=\"0.005\"} 2",
            "ws1_probe_syscall_duration_seconds_bucket{service=\"trading-engine\",syscall=\"getppid\",le=\"10\"} 2",
            "ws1_probe_syscall_duration_seconds_bucket{service=\"trading-engine\",syscall=\"getppid\",le=\"+Inf\"} 3",
            "ws1_probe_syscall_duration_seconds_sum{service=\"trading-engine\",syscall=\"getppid\"} 30.003001",
            "ws1_probe_syscall_duration_seconds_count{service=\"trading-engine\",syscall=\"getppid\"} 3",
            "# TYPE ws1_probe_syscall_errors_total counter",
            "ws1_probe_syscall_errors_total{service=\"trading-engine\",syscall=\"openat\",errno=\"ENOENT\"} 5",
        ];
        for line in want {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn empty_families_do_not_break_encoding() {
        let text = encode(&syscall_families(
            &SyscallSnapshot::default(),
            |_| "other",
            &DEFAULT_EXPORT_BOUNDS_NS,
        ));
        assert_eq!(text, "");
        let mut families = syscall_families(&SyscallSnapshot::default(), |_| "x", &[1]);
        families.push(family("up", "h", MetricType::GAUGE, vec![gauge(&[], 1.0)]));
        assert_eq!(encode(&families), "# HELP up h\n# TYPE up gauge\nup 1\n");
    }

    #[test]
    fn folded_services_sum_into_other() {
        let bounds = &DEFAULT_EXPORT_BOUNDS_NS;
        let mut snap = SyscallSnapshot::default();
        for id in [1, 2] {
            let mut h = Histogram::default();
            h.observe(bounds, 500);
            snap.hists.insert((id, 0), h);
        }
        let text = encode(&syscall_families(&snap, |_| "other", bounds));
        assert!(text.contains(
            "ws1_probe_syscall_duration_seconds_count{service=\"other\",syscall=\"read\"} 2"
        ));
    }

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
