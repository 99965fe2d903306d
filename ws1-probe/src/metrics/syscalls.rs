//! Syscall families: latency histograms and errors per service and syscall.

use std::collections::BTreeMap;

use prometheus::proto::{MetricFamily, MetricType};

use super::{counter, family, histogram};
use crate::{
    collectors::syscalls::SyscallSnapshot,
    histogram::Histogram,
    names::{errno_label, syscall_label},
};

/// Syscall families. `label` maps a service id to its exported label.
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
}
