//! The scheduler probe: process starts and exits by reason, crash log lines, and run-queue
//! latency, against `ws1-schedload` (tests/src/bin/ws1-schedload.rs).

use std::time::Duration;

use ws1_probe_tests::{Agent, Metrics, Workload, privileged, schedload_bin};

const EXITS: &str = "ws1_probe_process_exits_total";
const STARTS: &str = "ws1_probe_process_starts_total";
const RUNQ: &str = "ws1_probe_runqueue_latency_seconds";

fn exits(m: &Metrics, service: &str, reason: &str) -> f64 {
    m.value(EXITS, &[("service", service), ("reason", reason)])
}

#[test]
fn starts_and_exits_are_counted_by_reason_and_a_crash_is_logged_once() {
    if !privileged() {
        return;
    }
    const SERVICE: &str = "w-lifecycle";
    let mut w = Workload::spawn_program(&schedload_bin(), SERVICE);
    let agent = Agent::start_logged(&["--pid", &w.pid.to_string()]);
    let m = agent.metrics();
    assert_eq!(m.value(STARTS, &[("service", SERVICE)]), 0.0, "{}", m.text);
    for reason in ["ok", "error", "signal"] {
        assert_eq!(exits(&m, SERVICE, reason), 0.0, "{reason} before any child");
    }

    w.cmd("children ok 5");
    w.cmd("children error 3");
    let crashed = w.cmd("children segv 1");
    let pid: u32 = crashed
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("pid of the crashed child");

    // Every child was reaped before its command replied, so its exit has been counted.
    let m = agent.metrics();
    assert_eq!(m.value(STARTS, &[("service", SERVICE)]), 9.0, "{}", m.text);
    assert_eq!(exits(&m, SERVICE, "ok"), 5.0);
    assert_eq!(exits(&m, SERVICE, "error"), 3.0);
    assert_eq!(exits(&m, SERVICE, "signal"), 1.0);

    let expected = format!("service {SERVICE}: process {pid} ({SERVICE}) killed by SIGSEGV");
    let lines = agent.wait_for_log(&expected, Duration::from_secs(10));
    // Later scrapes and ticks do not log it again.
    std::thread::sleep(Duration::from_millis(5_500));
    let _ = agent.metrics();
    assert_eq!(agent.log_lines(&expected).len(), 1, "{lines:?}");
    assert_eq!(agent.log_lines("killed by").len(), 1, "only the one crash");

    // Dropping the workload kills it with SIGKILL: a second signal exit, no new ok or error.
    drop(w);
    let m = agent.wait_for("the workload's own exit", |m| {
        exits(m, SERVICE, "signal") == 2.0
    });
    assert_eq!(exits(&m, SERVICE, "ok"), 5.0);
    assert_eq!(exits(&m, SERVICE, "error"), 3.0);
    agent.wait_for_log("killed by SIGKILL", Duration::from_secs(10));
}

#[test]
fn threads_contending_for_one_cpu_wait_in_the_run_queue() {
    if !privileged() {
        return;
    }
    const SERVICE: &str = "w-runq";
    let mut w = Workload::spawn_program(&schedload_bin(), SERVICE);
    let agent = Agent::start(&["--pid", &w.pid.to_string()]);
    // Four threads spinning on one CPU for 2 s: each waits while the others run their slices
    // (milliseconds each), so waits above 1 ms are certain.
    w.cmd("contend 4 2000");
    let m = agent.metrics();
    let count = m
        .get(&format!("{RUNQ}_count"), &[("service", SERVICE)])
        .unwrap_or_else(|| panic!("no run-queue histogram for {SERVICE}:\n{}", m.text));
    let upto_1ms = m.value(
        &format!("{RUNQ}_bucket"),
        &[("service", SERVICE), ("le", "0.001")],
    );
    assert!(
        count - upto_1ms >= 1.0,
        "{count} waits, {upto_1ms} of them at most 1 ms: none above"
    );
    // The four threads were woken (created) and preempted: at least one wait each.
    assert!(count >= 4.0, "{count} waits");
    let inf = m.value(
        &format!("{RUNQ}_bucket"),
        &[("service", SERVICE), ("le", "+Inf")],
    );
    assert_eq!(inf, count, "+Inf bucket holds every wait");
}

#[test]
fn collectors_without_sched_still_count_exits_but_no_waits() {
    if !privileged() {
        return;
    }
    const SERVICE: &str = "w-nosched";
    let mut w = Workload::spawn_program(&schedload_bin(), SERVICE);
    let agent = Agent::start(&["--pid", &w.pid.to_string(), "--collectors", "syscalls"]);
    w.cmd("children error 2");
    w.cmd("contend 2 300");
    let m = agent.metrics();
    assert_eq!(exits(&m, SERVICE, "error"), 2.0);
    assert_eq!(m.value(STARTS, &[("service", SERVICE)]), 2.0);
    assert!(
        m.get(&format!("{RUNQ}_count"), &[("service", SERVICE)])
            .is_none(),
        "run-queue programs are off"
    );
}

/// Sum of a family's samples with `labels`, over every service label.
fn total(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| *v)
        .sum()
}

#[test]
fn host_mode_counts_exits_and_waits_and_names_the_crashed_command() {
    if !privileged() {
        return;
    }
    const SERVICE: &str = "w-hostsched";
    let mut w = Workload::spawn_program(&schedload_bin(), SERVICE);
    let agent = Agent::start_logged(&["--collectors", "sched"]);
    let before = agent.metrics();
    w.cmd("children error 3");
    let crashed = w.cmd("children segv 1");
    let pid = crashed.split_whitespace().nth(1).expect("pid of the child");
    w.cmd("contend 3 500");
    let after = agent.metrics();
    // Other processes of the host may exit meanwhile, so the totals grow by at least ours.
    let grew = |reason: &str| {
        total(&after, EXITS, &[("reason", reason)]) - total(&before, EXITS, &[("reason", reason)])
    };
    assert!(grew("error") >= 3.0, "{}", after.text);
    assert!(grew("signal") >= 1.0);
    assert!(total(&after, STARTS, &[]) - total(&before, STARTS, &[]) >= 4.0);
    assert!(total(&after, &format!("{RUNQ}_count"), &[]) > 0.0);
    // The crash line names the command (host mode's service names are command names).
    let expected = format!("service {SERVICE}: process {pid} ({SERVICE}) killed by SIGSEGV");
    agent.wait_for_log(&expected, Duration::from_secs(10));
    // Counters never go backwards across host mode's label updates.
    for (name, labels, v) in &before.samples {
        if name.starts_with("ws1_probe_process_") || name.starts_with(RUNQ) {
            let now = after
                .samples
                .iter()
                .find(|(n, l, _)| n == name && l == labels);
            if let Some((_, _, now)) = now {
                assert!(now >= v, "{name} {labels:?} went from {v} back to {now}");
            }
        }
    }
}
