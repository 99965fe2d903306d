//! Scheduler families: process starts and exits by reason, and run-queue latency, per service.

use std::collections::BTreeMap;

use prometheus::proto::{MetricFamily, MetricType};

use super::{counter, family, histogram};
use crate::{collectors::sched::SchedSnapshot, histogram::Histogram};

pub const RUNQUEUE: &str = "ws1_probe_runqueue_latency_seconds";
pub const EXITS: &str = "ws1_probe_process_exits_total";
pub const STARTS: &str = "ws1_probe_process_starts_total";

/// `ws1_probe_process_starts_total{service}`, `ws1_probe_process_exits_total{service,reason}`
/// and `ws1_probe_runqueue_latency_seconds{service}`. `label` maps a service id to its
/// exported label; ids that share a label are summed.
pub fn families<'a>(
    snap: &SchedSnapshot,
    label: impl Fn(u32) -> &'a str,
    bounds_ns: &[u64],
) -> Vec<MetricFamily> {
    let mut starts: BTreeMap<&str, u64> = BTreeMap::new();
    let mut exits: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for ((service, event), n) in &snap.events {
        match event.reason() {
            None => *starts.entry(label(*service)).or_insert(0) += n,
            Some(reason) => *exits.entry((label(*service), reason)).or_insert(0) += n,
        }
    }
    let mut runq: BTreeMap<&str, Histogram> = BTreeMap::new();
    for (service, h) in &snap.runqueue {
        runq.entry(label(*service)).or_default().add(h);
    }
    vec![
        family(
            STARTS,
            "Processes (thread groups) started in a service since the agent started: forks of its processes and execs that moved a process into it.",
            MetricType::COUNTER,
            starts
                .into_iter()
                .map(|(service, n)| counter(&[("service", service)], n as f64))
                .collect(),
        ),
        family(
            EXITS,
            "Processes (thread groups) of a service that ended, by reason: ok (exit status 0), error (non-zero exit status), signal (killed by a signal).",
            MetricType::COUNTER,
            exits
                .into_iter()
                .map(|((service, reason), n)| {
                    counter(&[("service", service), ("reason", reason)], n as f64)
                })
                .collect(),
        ),
        family(
            RUNQUEUE,
            "Time threads of a service spent runnable but not running: from wakeup or preemption until switched in.",
            MetricType::HISTOGRAM,
            runq.iter()
                .map(|(service, h)| histogram(&[("service", service)], h, bounds_ns))
                .collect(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use ws1_probe_common::sched::ProcEvent;

    use super::*;
    use crate::metrics::encode;

    #[test]
    fn exits_by_reason_and_merged_labels() {
        let mut snap = SchedSnapshot::default();
        snap.events.insert((1, ProcEvent::Start), 5);
        snap.events.insert((1, ProcEvent::ExitOk), 2);
        snap.events.insert((1, ProcEvent::ExitSignal), 1);
        snap.events.insert((2, ProcEvent::ExitError), 3);
        snap.events.insert((3, ProcEvent::ExitError), 4);
        let label = |id: u32| if id == 1 { "engine" } else { "other" };
        let text = encode(&families(&snap, label, &[1_000]));
        assert!(text.contains("ws1_probe_process_starts_total{service=\"engine\"} 5"));
        assert!(text.contains("ws1_probe_process_exits_total{service=\"engine\",reason=\"ok\"} 2"));
        assert!(
            text.contains("ws1_probe_process_exits_total{service=\"engine\",reason=\"signal\"} 1")
        );
        assert!(
            text.contains("ws1_probe_process_exits_total{service=\"other\",reason=\"error\"} 7"),
            "{text}"
        );
        assert!(!text.contains(RUNQUEUE), "no histogram without waits");
    }
}
