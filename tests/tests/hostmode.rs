//! Host mode as users run it: label slots follow what is busy now, gone commands give back
//! their slots and their map entries, counters never go backwards, and a full map says so in
//! the log.

use std::time::{Duration, Instant};

use ws1_probe_tests::{Agent, Metrics, Workload, privileged};

const COUNT: &str = "ws1_probe_syscall_duration_seconds_count";

/// What these tests look at is the syscall collector's: the profiler (which reads kallsyms and
/// symbolizes every new process) and the memory sampler only add work to each scrape.
const SYSCALLS_ONLY: &[&str] = &["--collectors", "syscalls"];

fn getppid(m: &Metrics, service: &str) -> Option<f64> {
    m.get(COUNT, &[("service", service), ("syscall", "getppid")])
}

fn hist_drops(m: &Metrics) -> f64 {
    m.value(
        "ws1_probe_events_dropped_total",
        &[("reason", "syscall_hist_map_full")],
    )
}

fn services(m: &Metrics) -> std::collections::BTreeSet<String> {
    m.samples
        .iter()
        .filter(|(n, _, _)| n == COUNT)
        .filter_map(|(_, l, _)| {
            l.iter()
                .find(|(k, _)| k == "service")
                .map(|(_, v)| v.clone())
        })
        .collect()
}

/// Every counter and histogram series present in both scrapes has not gone down.
fn assert_monotonic(before: &Metrics, after: &Metrics) {
    let counters = |m: &Metrics| {
        m.samples
            .iter()
            .filter(|(n, _, _)| {
                n.ends_with("_total")
                    || n.ends_with("_count")
                    || n.ends_with("_bucket")
                    || n.ends_with("_sum")
            })
            .map(|(n, l, v)| ((n.clone(), l.clone()), *v))
            .collect::<std::collections::HashMap<_, _>>()
    };
    let after = counters(after);
    for (series, v) in counters(before) {
        if let Some(now) = after.get(&series) {
            assert!(*now >= v, "{series:?} went from {v} back to {now}");
        }
    }
}

#[test]
fn a_busy_process_gets_its_own_label_after_150_short_lived_commands() {
    if !privileged() {
        return;
    }
    let agent = Agent::start_logged(SYSCALLS_ONLY);
    let first = agent.metrics();
    assert_eq!(
        first.get("ws1_probe_bpf_map_capacity", &[("map", "SYSCALL_HIST")]),
        Some(4096.0)
    );
    // 150 distinct commands, each with 40 syscall numbers of its own, alive together: 6000
    // (service, syscall) pairs, more than SYSCALL_HIST holds.
    let mut once = Vec::new();
    for i in 0..150 {
        let mut w = Workload::spawn(&format!("hm-once-{i:03}"));
        assert_eq!(w.cmd("enosys 40"), "ok 40");
        once.push(w);
    }
    let full = agent.metrics();
    assert!(hist_drops(&full) > 0.0, "SYSCALL_HIST filled up");
    assert_monotonic(&first, &full);
    drop(once);

    // The loss is in the log, with the flag that raises the limit.
    let warned = agent.wait_for_log("map SYSCALL_HIST is full", Duration::from_secs(30));
    assert!(
        warned[0].contains("(4096 entries)")
            && warned[0].contains("raise it with --map-entries SYSCALL_HIST=8192"),
        "{warned:?}"
    );

    // A process that becomes busy afterwards gets its own label: the gone commands gave back
    // their slots and their map entries.
    let mut busy = Workload::spawn("hm-busy");
    let started = Instant::now();
    let mut prev = agent.metrics();
    loop {
        busy.cmd("getppid 20000");
        let m = agent.metrics();
        assert_monotonic(&prev, &m);
        prev = m;
        if getppid(&prev, "hm-busy").is_some() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "hm-busy has no label after 90 s; labels: {:?}",
            services(&prev)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("hm-busy labelled after {:?}", started.elapsed());
    // The gone commands' entries (up to the whole map) are reclaimed.
    let m = agent.wait_for("the gone commands' map entries to be reclaimed", |m| {
        m.value("ws1_probe_bpf_map_entries", &[("map", "SYSCALL_HIST")]) < 2048.0
    });
    assert_monotonic(&prev, &m);
    prev = m;

    // From now on its syscalls are counted exactly under its own label.
    let before = getppid(&prev, "hm-busy").unwrap_or_default();
    busy.cmd("getppid 12345");
    let m = agent.metrics();
    assert_monotonic(&prev, &m);
    assert_eq!(getppid(&m, "hm-busy"), Some(before + 12345.0));
    busy.cmd("getppid 1000");
    let later = agent.metrics();
    assert_monotonic(&m, &later);
    assert_eq!(getppid(&later, "hm-busy"), Some(before + 13345.0));

    // The short-lived commands hold no label.
    let m = agent.wait_for("the gone commands' labels to retire", |m| {
        !services(m).iter().any(|s| s.starts_with("hm-once-"))
    });
    assert_monotonic(&later, &m);
    assert!(services(&m).len() <= 22, "{:?}", services(&m));
}

#[test]
fn a_full_map_logs_one_warning_per_interval_naming_the_flag() {
    if !privileged() {
        return;
    }
    const S: &str = "hm-full";
    let mut w = Workload::spawn(S);
    let agent = Agent::start_logged(&[
        "--pid",
        &w.pid.to_string(),
        "--map-entries",
        "SYSCALL_HIST=16",
    ]);
    let m = agent.metrics();
    assert_eq!(
        m.get("ws1_probe_bpf_map_capacity", &[("map", "SYSCALL_HIST")]),
        Some(16.0)
    );
    // Its read, write and getppid pairs first (the read it was blocked in when the agent
    // started is not timed; the next one is).
    assert_eq!(w.cmd("getppid 1"), "ok");
    // Then 40 pairs of its own: 13 fill the map, 27 calls are dropped.
    assert_eq!(w.cmd("enosys 40"), "ok 40");
    let m = agent.metrics();
    assert_eq!(
        m.value("ws1_probe_bpf_map_entries", &[("map", "SYSCALL_HIST")]),
        16.0
    );
    let dropped = hist_drops(&m);
    assert_eq!(dropped, 27.0);
    // Once full, every call of a new pair is dropped, and counted.
    assert_eq!(w.cmd("enosys 10 2000"), "ok 10");
    assert_eq!(hist_drops(&agent.metrics()), dropped + 10.0);

    let warned = agent.wait_for_log("map SYSCALL_HIST is full", Duration::from_secs(30));
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(
        warned[0].contains("(16 entries)")
            && warned[0].contains("syscalls of new (service, syscall) pairs were not counted")
            && warned[0].contains("raise it with --map-entries SYSCALL_HIST=32"),
        "{warned:?}"
    );
    // More drops within the minute: no second warning (the agent checks every 5 s; give it
    // three checks).
    assert_eq!(w.cmd("enosys 10 3000"), "ok 10");
    std::thread::sleep(Duration::from_secs(15));
    assert_eq!(agent.log_lines("map SYSCALL_HIST is full").len(), 1);
    // Pairs that have their entry are still counted exactly.
    let d0 = hist_drops(&agent.metrics());
    w.cmd("getppid 77");
    let m = agent.metrics();
    assert_eq!(getppid(&m, S), Some(78.0));
    assert_eq!(hist_drops(&m), d0);
}

#[test]
fn kernel_threads_share_one_label() {
    if !privileged() {
        return;
    }
    let agent = Agent::start(SYSCALLS_ONLY);
    let m = agent.metrics();
    let kernel = m.value("ws1_probe_targeted_processes", &[("service", "kernel")]);
    assert!(
        kernel >= 1.0,
        "kernel threads are observed as service=\"kernel\""
    );
    for (name, labels, _) in &m.samples {
        for (k, v) in labels {
            assert!(
                !(k == "service" && (v.starts_with("kworker") || v == "kthreadd")),
                "{name} has service={v}"
            );
        }
    }
}

#[test]
fn an_idle_label_retires_and_continues_where_it_stopped() {
    if !privileged() {
        return;
    }
    const S: &str = "hm-idle";
    let mut w = Workload::spawn(S);
    let agent = Agent::start(&["--collectors", "syscalls", "--label-idle-retire", "2s"]);
    w.cmd("getppid 4000");
    let m = agent.wait_for("hm-idle to get a label", |m| getppid(m, S).is_some());
    let before = getppid(&m, S).unwrap_or_default();
    // Alive but idle (blocked reading its stdin): after 2 s its series are no longer exported.
    let started = Instant::now();
    let mut prev = m;
    loop {
        let m = agent.metrics();
        assert_monotonic(&prev, &m);
        prev = m;
        if getppid(&prev, S).is_none() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "hm-idle still labelled after 20 s idle"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "retired too early"
    );
    // Busy again: there are free slots, so it is labelled at once, and its series continue
    // where they stopped rather than starting again at 0.
    w.cmd("getppid 500");
    let m = agent.metrics();
    assert_monotonic(&prev, &m);
    assert_eq!(getppid(&m, S), Some(before + 500.0));
}
