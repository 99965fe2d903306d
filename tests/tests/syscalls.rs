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
    // Each sleep's kernel duration lies between the request and the wall time the workload
    // measured around the call. 6 ms and 30 ms sit well inside (5 ms, 10 ms] and (25 ms, 50 ms],
    // so on an idle machine every bucket count below is exact; on a loaded one a late wake-up
    // may move a sleep up, and the measured wall times say exactly how far it may go.
    let mut sleeps: Vec<(u64, u64)> = Vec::new();
    for (ms, n) in [(6u64, 4), (30, 3)] {
        let reply = target.cmd(&format!("nanosleep {ms} {n}"));
        for wall in reply.split_whitespace().skip(1) {
            sleeps.push((ms * 1_000_000, wall.parse().expect("wall time")));
        }
    }
    assert_eq!(sleeps.len(), 7);
    let m = agent.metrics();
    let bucket = |le: &str| {
        m.get(
            &format!("{DURATION}_bucket"),
            &[("service", SERVICE), ("syscall", "nanosleep"), ("le", le)],
        )
        .unwrap_or_else(|| panic!("no nanosleep bucket le={le}\n{}", m.text))
    };
    for (le, bound_ns) in [
        ("0.001", 1_000_000u64),
        ("0.005", 5_000_000),
        ("0.01", 10_000_000),
        ("0.025", 25_000_000),
        ("0.05", 50_000_000),
        ("10", 10_000_000_000),
    ] {
        // Sleeps surely at or below the bound, and sleeps that may be.
        let surely = sleeps.iter().filter(|(_, wall)| *wall <= bound_ns).count() as f64;
        let maybe = sleeps.iter().filter(|(req, _)| *req <= bound_ns).count() as f64;
        let got = bucket(le);
        assert!(
            (surely..=maybe).contains(&got),
            "le={le}: {got} sleeps counted, expected {surely}..={maybe} from {sleeps:?}"
        );
    }
    assert_eq!(bucket("0.001"), 0.0);
    assert_eq!(bucket("0.005"), 0.0, "no sleep is shorter than its request");
    assert_eq!(bucket("+Inf"), 7.0);
    let sum = m.value(
        &format!("{DURATION}_sum"),
        &[("service", SERVICE), ("syscall", "nanosleep")],
    );
    let req: u64 = sleeps.iter().map(|(r, _)| r).sum();
    let wall: u64 = sleeps.iter().map(|(_, w)| w).sum();
    assert!(
        (req as f64 / 1e9..=wall as f64 / 1e9).contains(&sum),
        "sum {sum} s outside [{req}, {wall}] ns"
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
