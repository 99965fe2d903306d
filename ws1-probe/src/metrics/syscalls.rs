//! Syscall families: latency histograms and errors per service and syscall.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use prometheus::proto::{Metric, MetricFamily, MetricType};

use super::{counter, family, histogram};
use crate::{
    collectors::syscalls::SyscallSnapshot,
    histogram::Histogram,
    names::{errno_label, syscall_label},
};

/// How long a new service label shows every syscall before its budget is decided.
pub const BUDGET_GRACE: Duration = Duration::from_secs(60);

/// The series budget of the syscall families. For its first [`BUDGET_GRACE`] a service label
/// shows every syscall; then its `per_service` most called syscalls (over that first minute,
/// so a start-up's mmap/openat burst does not take the slots of what the service does later)
/// keep their own `syscall` label and the rest are summed into `syscall="other"` for good.
/// Syscalls a label first makes later take a free slot or go to `other`. A syscall leaves its
/// own series at most once, so every exported counter stays monotonic (its series stops and
/// `other` grows by what it held). With 21 service labels and the default of 8 this is at most
/// 189 histograms once decided.
#[derive(Clone, Debug)]
pub struct SyscallBudget {
    /// 0: every syscall gets its own series.
    per_service: usize,
    grace: Duration,
    first_seen: HashMap<String, Instant>,
    /// service → syscall → whether it keeps its own series; nested so that a lookup by `&str`
    /// allocates nothing (it runs for every syscall series of every scrape).
    decided: HashMap<String, HashMap<String, bool>>,
    promoted: HashMap<String, usize>,
}

impl SyscallBudget {
    pub fn new(per_service: usize) -> Self {
        Self::with_grace(per_service, BUDGET_GRACE)
    }

    pub fn with_grace(per_service: usize, grace: Duration) -> Self {
        Self {
            per_service,
            grace,
            first_seen: HashMap::new(),
            decided: HashMap::new(),
            promoted: HashMap::new(),
        }
    }

    fn in_grace(&self, service: &str, now: Instant) -> bool {
        self.first_seen
            .get(service)
            .is_none_or(|at| now.duration_since(*at) < self.grace)
    }

    /// Decides the pairs of labels past their grace period, most called first.
    pub fn update(&mut self, calls: &BTreeMap<(String, String), u64>, now: Instant) {
        if self.per_service == 0 {
            return;
        }
        for (service, _) in calls.keys() {
            if !self.first_seen.contains_key(service) {
                self.first_seen.insert(service.clone(), now);
            }
        }
        let mut newcomers: Vec<(&(String, String), u64)> = calls
            .iter()
            .filter(|((service, _), _)| !self.in_grace(service, now))
            .filter(|((service, syscall), _)| {
                !self
                    .decided
                    .get(service)
                    .is_some_and(|m| m.contains_key(syscall))
            })
            .map(|(pair, n)| (pair, *n))
            .collect();
        newcomers.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        for (pair, _) in newcomers {
            let promoted = self.promoted.entry(pair.0.clone()).or_insert(0);
            let keep = *promoted < self.per_service;
            *promoted += usize::from(keep);
            self.decided
                .entry(pair.0.clone())
                .or_default()
                .insert(pair.1.clone(), keep);
        }
    }

    /// Whether `syscall` has its own series under `service` (always, while the label is new).
    pub fn keeps(&self, service: &str, syscall: &str, now: Instant) -> bool {
        self.per_service == 0
            || self
                .decided
                .get(service)
                .and_then(|m| m.get(syscall))
                .copied()
                .unwrap_or_else(|| self.in_grace(service, now))
    }
}

/// Folds the syscall series beyond each service label's budget into `syscall="other"`, in
/// rendered families (so it applies to the labels Prometheus sees, after host mode named them).
pub fn apply_budget(families: &mut [MetricFamily], budget: &mut SyscallBudget) {
    if budget.per_service == 0 {
        return;
    }
    let label = |m: &Metric, name: &str| {
        m.get_label()
            .iter()
            .find(|l| l.name() == name)
            .map(|l| l.value().to_owned())
            .unwrap_or_default()
    };
    let now = Instant::now();
    if let Some(f) = families
        .iter()
        .find(|f| f.name() == "ws1_probe_syscall_duration_seconds")
    {
        let calls: BTreeMap<(String, String), u64> = f
            .get_metric()
            .iter()
            .map(|m| {
                (
                    (label(m, "service"), label(m, "syscall")),
                    m.get_histogram().get_sample_count(),
                )
            })
            .collect();
        budget.update(&calls, now);
    }
    for f in families.iter_mut() {
        let histogram = match f.name() {
            "ws1_probe_syscall_duration_seconds" => true,
            "ws1_probe_syscall_errors_total" => false,
            _ => continue,
        };
        let mut kept = Vec::new();
        // (service, errno) → the `other` sample, in first-seen order.
        let mut folded: BTreeMap<(String, String), Metric> = BTreeMap::new();
        for mut m in f.take_metric().into_iter() {
            let (service, syscall) = (label(&m, "service"), label(&m, "syscall"));
            if budget.keeps(&service, &syscall, now) {
                kept.push(m);
                continue;
            }
            let errno = label(&m, "errno");
            match folded.get_mut(&(service.clone(), errno.clone())) {
                None => {
                    for l in m.mut_label().iter_mut() {
                        if l.name() == "syscall" {
                            l.set_value("other".to_owned());
                        }
                    }
                    folded.insert((service, errno), m);
                }
                Some(acc) if histogram => {
                    let h = m.get_histogram();
                    let mut a = acc.get_histogram().clone();
                    a.set_sample_count(a.get_sample_count() + h.get_sample_count());
                    a.set_sample_sum(a.get_sample_sum() + h.get_sample_sum());
                    let buckets = a
                        .get_bucket()
                        .iter()
                        .zip(h.get_bucket())
                        .map(|(x, y)| {
                            let mut b = x.clone();
                            b.set_cumulative_count(x.cumulative_count() + y.cumulative_count());
                            b
                        })
                        .collect();
                    a.set_bucket(buckets);
                    acc.set_histogram(a);
                }
                Some(acc) => {
                    let mut c = prometheus::proto::Counter::default();
                    c.set_value(acc.get_counter().get_value() + m.get_counter().get_value());
                    acc.set_counter(c);
                }
            }
        }
        kept.extend(folded.into_values());
        f.set_metric(kept);
    }
}

/// Syscall families. `label` maps a service id to its exported label. The series budget is
/// applied to the result with [`apply_budget`].
pub fn families<'a>(
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
            "Syscall latency from sys_enter to sys_exit, per service and syscall (syscalls beyond the series budget as syscall=\"other\").",
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

#[cfg(test)]
mod tests {
    use prometheus::proto::MetricType;
    use ws1_probe_common::hist::DEFAULT_EXPORT_BOUNDS_NS;

    use super::*;
    use crate::metrics::{encode, gauge};

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
        let text = encode(&families(&snap, |id| names[id as usize], bounds));
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
        let text = encode(&families(
            &SyscallSnapshot::default(),
            |_| "other",
            &DEFAULT_EXPORT_BOUNDS_NS,
        ));
        assert_eq!(text, "");
        let mut families = families(&SyscallSnapshot::default(), |_| "x", &[1]);
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
        let text = encode(&families(&snap, |_| "other", bounds));
        assert!(text.contains(
            "ws1_probe_syscall_duration_seconds_count{service=\"other\",syscall=\"read\"} 2"
        ));
    }

    /// Renders `snap` under one label and applies `budget`.
    fn budgeted(snap: &SyscallSnapshot, budget: &mut SyscallBudget) -> String {
        let mut f = families(snap, |_| "api", &DEFAULT_EXPORT_BOUNDS_NS);
        apply_budget(&mut f, budget);
        encode(&f)
    }

    #[test]
    fn syscalls_beyond_the_budget_sum_into_other_and_decisions_stick() {
        let bounds = &DEFAULT_EXPORT_BOUNDS_NS;
        let snap_of = |calls: &[(u32, u64)]| {
            let mut snap = SyscallSnapshot::default();
            for (nr, n) in calls {
                let mut h = Histogram::default();
                for _ in 0..*n {
                    h.observe(bounds, 500);
                }
                snap.hists.insert((1, *nr), h);
            }
            snap.errors.insert((1, 2, 2), 4);
            snap.errors.insert((1, 3, 2), 1);
            snap
        };
        let mut budget = SyscallBudget::with_grace(2, Duration::ZERO);
        // read (0) 30, write (1) 20, open (2) 10, close (3) 5: open and close go to `other`.
        let text = budgeted(&snap_of(&[(0, 30), (1, 20), (2, 10), (3, 5)]), &mut budget);
        let count = |text: &str, syscall: &str| {
            let prefix = format!(
                "ws1_probe_syscall_duration_seconds_count{{service=\"api\",syscall=\"{syscall}\"}} "
            );
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix)?.parse::<u64>().ok())
        };
        assert_eq!(count(&text, "read"), Some(30));
        assert_eq!(count(&text, "write"), Some(20));
        assert_eq!(count(&text, "other"), Some(15));
        assert_eq!(count(&text, "open"), None);
        assert!(text.contains(
            "ws1_probe_syscall_duration_seconds_bucket{service=\"api\",syscall=\"other\",le=\"0.000001\"} 15"
        ));
        assert!(text.contains(
            "ws1_probe_syscall_errors_total{service=\"api\",syscall=\"other\",errno=\"ENOENT\"} 5"
        ));
        // open becomes the busiest: it stays in `other`, which only grows.
        let text = budgeted(&snap_of(&[(0, 31), (1, 21), (2, 500), (3, 5)]), &mut budget);
        assert_eq!(count(&text, "other"), Some(505));
        assert_eq!(count(&text, "read"), Some(31));
        // Unlimited: every syscall has its own series.
        let text = budgeted(&snap_of(&[(0, 1), (2, 1)]), &mut SyscallBudget::new(0));
        assert_eq!(count(&text, "open"), Some(1));
    }

    #[test]
    fn a_new_label_shows_every_syscall_until_its_budget_is_decided() {
        let mut budget = SyscallBudget::with_grace(1, Duration::from_secs(60));
        let t0 = Instant::now();
        let pair = |s: &str| ("api".to_owned(), s.to_owned());
        let calls: BTreeMap<(String, String), u64> =
            [(pair("mmap"), 100), (pair("read"), 5)].into();
        budget.update(&calls, t0);
        assert!(budget.keeps("api", "mmap", t0) && budget.keeps("api", "read", t0));
        // Read became the busiest over the first minute: it keeps the one slot.
        let calls: BTreeMap<(String, String), u64> =
            [(pair("mmap"), 100), (pair("read"), 5000)].into();
        let later = t0 + Duration::from_secs(61);
        budget.update(&calls, later);
        assert!(budget.keeps("api", "read", later));
        assert!(!budget.keeps("api", "mmap", later));
        // A syscall first made after the decision finds no free slot.
        budget.update(&[(pair("write"), 1)].into(), later);
        assert!(!budget.keeps("api", "write", later));
    }
}
