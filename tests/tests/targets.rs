//! Process targeting: forks are followed, exits clean the kernel map, execs are re-evaluated,
//! and the whole host is observed when no selector is given.

use ws1_probe_tests::{Agent, Metrics, Workload, privileged};

fn getppid(m: &Metrics, service: &str) -> f64 {
    m.value(
        "ws1_probe_syscall_duration_seconds_count",
        &[("service", service), ("syscall", "getppid")],
    )
}

fn targeted(m: &Metrics, service: &str) -> f64 {
    m.value("ws1_probe_targeted_processes", &[("service", service)])
}

fn targets_map_entries(m: &Metrics) -> f64 {
    m.value("ws1_probe_bpf_map_entries", &[("map", "TARGETS")])
}

/// In-flight syscall entries: one per live targeted thread that made a syscall.
fn start_map_entries(m: &Metrics) -> f64 {
    m.value("ws1_probe_bpf_map_entries", &[("map", "SYSCALL_START")])
}

#[test]
fn forked_child_is_followed_and_its_exit_removes_the_entry() {
    if !privileged() {
        return;
    }
    const S: &str = "w-fork";
    let mut parent = Workload::spawn(S);
    let agent = Agent::start(&["--pid", &parent.pid.to_string()]);
    let m = agent.metrics();
    assert_eq!(targets_map_entries(&m), 1.0, "only the --pid target");

    // The child makes 250 getppid calls and stays alive until released.
    let reply = parent.cmd("fork-hold 250");
    let child: u32 = reply
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("child pid");
    assert_ne!(child, parent.pid);
    let m = agent.metrics();
    assert_eq!(getppid(&m, S), 250.0, "the child's calls are counted");
    assert_eq!(targeted(&m, S), 2.0, "parent and child");
    assert_eq!(targets_map_entries(&m), 2.0);
    assert_eq!(start_map_entries(&m), 2.0, "one thread each");

    parent.cmd("release");
    let m = agent.metrics();
    assert_eq!(targeted(&m, S), 1.0, "the child's exit removed its entry");
    assert_eq!(targets_map_entries(&m), 1.0);
    assert_eq!(
        start_map_entries(&m),
        1.0,
        "the child's thread entry is gone too"
    );
    assert_eq!(getppid(&m, S), 250.0);

    drop(parent);
    let m = agent.wait_for("the parent's entry to go", |m| {
        targets_map_entries(m) == 0.0
    });
    assert_eq!(targeted(&m, S), 0.0);
}

#[test]
fn exec_of_a_matching_command_is_targeted() {
    if !privileged() {
        return;
    }
    // Neither the test process nor anything running matches; the workloads start afterwards,
    // so they are found through their exec, not the start-up scan.
    const S: &str = "w-exec";
    let agent = Agent::start(&["--comm", "^w-exec$"]);
    assert_eq!(targeted(&agent.metrics(), S), 0.0);

    let mut first = Workload::spawn(S);
    agent.wait_for("the first exec to be targeted", |m| targeted(m, S) == 1.0);
    first.cmd("getppid 300");
    // The second exec of the same name is decided in the kernel from the cached decision.
    let mut second = Workload::spawn(S);
    agent.wait_for("the second exec to be targeted", |m| targeted(m, S) == 2.0);
    second.cmd("getppid 33");
    assert_eq!(getppid(&agent.metrics(), S), 333.0);

    drop(first);
    drop(second);
    let m = agent.wait_for("exits to clean up", |m| targets_map_entries(m) == 0.0);
    assert_eq!(targeted(&m, S), 0.0);
}

#[test]
fn no_selector_observes_the_host_by_command_name() {
    if !privileged() {
        return;
    }
    const S: &str = "w-host";
    let mut w = Workload::spawn(S);
    let agent = Agent::start(&[]);
    w.cmd("getppid 321");
    let m = agent.metrics();
    assert_eq!(getppid(&m, S), 321.0);
    // Other commands are seen too, and the label set stays bounded (20 names, kernel, other).
    let services: std::collections::BTreeSet<&str> = m
        .samples
        .iter()
        .filter(|(n, _, _)| n == "ws1_probe_syscall_duration_seconds_count")
        .filter_map(|(_, l, _)| {
            l.iter()
                .find(|(k, _)| k == "service")
                .map(|(_, v)| v.as_str())
        })
        .collect();
    assert!(services.len() >= 2, "{services:?}");
    assert!(services.len() <= 22, "{services:?}");
}
