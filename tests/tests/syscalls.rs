//! Syscall-latency collector against the real kernel, with a workload whose syscalls we control.

use ws1_probe_tests::{Agent, Metrics, Workload, privileged, run_probe};

const DURATION: &str = "ws1_probe_syscall_duration_seconds";

fn count(m: &Metrics, service: &str, syscall: &str) -> f64 {
    m.value(
        &format!("{DURATION}_count"),
        &[("service", service), ("syscall", syscall)],
    )
}

#[test]
fn exact_counts_and_errors_for_target_only() {
    if !privileged() {
        return;
    }
    const SERVICE: &str = "w-exact";
    let mut target = Workload::spawn(SERVICE);
    let mut bystander = Workload::spawn(SERVICE);
    let agent = Agent::start(&["--pid", &target.pid.to_string()]);

    // The bystander runs the same binary (same comm) at the same time and must not be counted.
    bystander.cmd("getppid 777");
    target.cmd("getppid 1000");
    assert_eq!(target.cmd("openat-missing 37"), "ok 37");
    bystander.cmd("openat-missing 11");
    target.cmd("getppid 234");

    let m = agent.metrics();
    assert_eq!(count(&m, SERVICE, "getppid"), 1234.0, "exact getppid count");
    assert_eq!(count(&m, SERVICE, "openat"), 37.0, "exact openat count");
    assert_eq!(
        m.get(
            "ws1_probe_syscall_errors_total",
            &[
                ("service", SERVICE),
                ("syscall", "openat"),
                ("errno", "ENOENT")
            ]
        ),
        Some(37.0)
    );
    assert_eq!(
        m.get(
            "ws1_probe_syscall_errors_total",
            &[("service", SERVICE), ("syscall", "getppid")]
        ),
        None,
        "getppid never fails"
    );
    // Only the target is in the kernel's target map.
    assert_eq!(
        m.value("ws1_probe_targeted_processes", &[("service", SERVICE)]),
        1.0
    );
    let sum = m.value(
        &format!("{DURATION}_sum"),
        &[("service", SERVICE), ("syscall", "getppid")],
    );
    assert!(sum > 0.0 && sum < 1234.0 * 0.001, "getppid sum {sum} s");
    let inf = m.value(
        &format!("{DURATION}_bucket"),
        &[("service", SERVICE), ("syscall", "getppid"), ("le", "+Inf")],
    );
    assert_eq!(inf, 1234.0, "+Inf bucket equals count");
}

#[test]
fn sleeps_land_in_their_le_buckets() {
    if !privileged() {
        return;
    }
    const SERVICE: &str = "w-sleep";
    let mut target = Workload::spawn(SERVICE);
    let agent = Agent::start(&["--pid", &target.pid.to_string()]);
    // 6 ms sleeps fall in (5 ms, 10 ms]; 30 ms sleeps in (25 ms, 50 ms]. Both sit well inside
    // their buckets, so timer slack (50 µs) and wake-up delay on a busy machine do not move them.
    target.cmd("nanosleep 6 4");
    target.cmd("nanosleep 30 3");
    let m = agent.metrics();
    let bucket = |le: &str| {
        m.get(
            &format!("{DURATION}_bucket"),
            &[("service", SERVICE), ("syscall", "nanosleep"), ("le", le)],
        )
        .unwrap_or_else(|| panic!("no nanosleep bucket le={le}\n{}", m.text))
    };
    assert_eq!(bucket("0.001"), 0.0);
    assert_eq!(bucket("0.005"), 0.0);
    assert_eq!(bucket("0.01"), 4.0);
    assert_eq!(bucket("0.025"), 4.0);
    assert_eq!(bucket("0.05"), 7.0);
    assert_eq!(bucket("10"), 7.0);
    assert_eq!(bucket("+Inf"), 7.0);
    let sum = m.value(
        &format!("{DURATION}_sum"),
        &[("service", SERVICE), ("syscall", "nanosleep")],
    );
    assert!(
        (0.114..0.15).contains(&sum),
        "sum of 4×6 ms + 3×30 ms = {sum} s"
    );
}

#[test]
fn cli_table_and_json_hold_exact_counts() {
    if !privileged() {
        return;
    }
    let mut target = Workload::spawn("w-cli");
    let pid = target.pid.to_string();
    let cli = std::thread::spawn(move || {
        run_probe(&["syscalls", "--pid", &pid, "--duration", "3s", "--json"])
    });
    // The CLI needs a moment to load; the workload's own syscalls before that are not counted,
    // so wait until the collector is attached, then run the exact workload.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    target.cmd("getppid 4321");
    target.cmd("openat-missing 5");
    let out = cli.join().expect("cli thread");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "syscalls failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |name: &str| {
        let key = format!("\"syscall\":\"{name}\"");
        let start = stdout
            .find(&key)
            .unwrap_or_else(|| panic!("no {name} row in {stdout}"));
        let obj = &stdout[stdout[..start].rfind('{').unwrap_or(0)..];
        obj[..obj.find('}').unwrap_or(obj.len())].to_owned()
    };
    assert!(
        row("getppid").contains("\"count\":4321"),
        "{}",
        row("getppid")
    );
    let openat = row("openat");
    assert!(
        openat.contains("\"count\":5") && openat.contains("\"errors\":5"),
        "{openat}"
    );
}
