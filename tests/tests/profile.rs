//! The profiler against a workload with a known profile (tests/workloads/burn.c): two functions
//! burning CPU 3:1, built with and without frame pointers, and a function that sleeps.

use std::{path::Path, process::Command, time::Duration};

use ws1_probe_tests::folded::{in_order, parse_folded, truncated_share, user_leaf};
use ws1_probe_tests::{
    Agent, Workload, burn_bin, http_get_bytes, pprof_bin, privileged, run_probe,
};

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ws1-profile-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

/// CPU time a process has used, in seconds (utime + stime from /proc/PID/stat).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("process stat");
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')').expect("stat has a command") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Sample totals of a pprof file as the Go pprof tool reads it: (samples, value of the second
/// sample type).
fn pprof_totals(path: &Path) -> (u64, u64, String) {
    let out = Command::new(pprof_bin())
        .args(["-raw", "-symbolize=none"])
        .arg(path)
        .output()
        .expect("run pprof");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pprof -raw failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples = text
        .split("Samples:\n")
        .nth(1)
        .expect("pprof -raw has a Samples section");
    let (mut count, mut value) = (0, 0);
    for line in samples.lines().skip(1) {
        if line.starts_with("Locations") {
            break;
        }
        let Some((values, _)) = line.split_once(':') else {
            continue;
        };
        let nums: Vec<u64> = values
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        if let [c, v] = nums[..] {
            count += c;
            value += v;
        }
    }
    (count, value, text)
}

/// 3:1 split, names, stacks reaching `main`, no bystander, and pprof totals equal to the
/// folded ones — all from one profile run.
fn cpu_split(frame_pointers: bool) {
    let (comm, bin) = if frame_pointers {
        ("w-burn-fp", burn_bin(true))
    } else {
        ("w-burn-nofp", burn_bin(false))
    };
    let target = Workload::spawn_args(&bin, comm, &[]);
    // A busy process that is not selected: none of its samples may appear.
    let _bystander = Workload::spawn_args(&bin, "w-bystander", &[]);
    let folded_path = temp(&format!("{comm}.folded"));
    let pprof_path = temp(&format!("{comm}.pb.gz"));
    let pid = target.pid.to_string();
    let cpu_before = cpu_seconds(target.pid);
    let out = run_probe(&[
        "profile",
        "--pid",
        &pid,
        "--duration",
        "6s",
        "--frequency",
        "997",
        "-o",
        folded_path.to_str().unwrap(),
        "-o",
        pprof_path.to_str().unwrap(),
    ]);
    let cpu = cpu_seconds(target.pid) - cpu_before;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "profile failed: {stderr}");
    let folded = parse_folded(&std::fs::read_to_string(&folded_path).unwrap());
    let total: u64 = folded.iter().map(|(_, v)| v).sum();
    // Samples count CPU time: 997 per second the process ran, within 10 % (the CPU time was
    // read a little before and after the window).
    let expected = cpu * 997.0;
    assert!(
        (0.85 * expected..=1.05 * expected).contains(&(total as f64)),
        "{total} samples for {cpu:.2} s of CPU (expected ≈ {expected:.0})\n{stderr}"
    );
    for (frames, _) in &folded {
        assert_eq!(frames[0], comm, "a sample of another process: {frames:?}");
    }
    let by_leaf = |name: &str| -> u64 {
        folded
            .iter()
            .filter(|(f, _)| user_leaf(f) == name)
            .map(|(_, v)| v)
            .sum()
    };
    let (three, one) = (by_leaf("ws1_burn_three"), by_leaf("ws1_burn_one"));
    assert!(
        (three + one) * 100 >= total * 95,
        "burn functions have {three}+{one} of {total} samples:\n{}",
        std::fs::read_to_string(&folded_path).unwrap()
    );
    let ratio = three as f64 / one as f64;
    assert!(
        (2.7..=3.3).contains(&ratio),
        "ws1_burn_three:ws1_burn_one = {three}:{one} = {ratio:.2}"
    );
    // Stacks reach main through ws1_run_cpu in (nearly) every burn sample.
    let full: u64 = folded
        .iter()
        .filter(|(f, _)| {
            in_order(f, &["main", "ws1_run_cpu", "ws1_burn_three"])
                || in_order(f, &["main", "ws1_run_cpu", "ws1_burn_one"])
        })
        .map(|(_, v)| v)
        .sum();
    assert!(
        full * 100 >= (three + one) * 98,
        "only {full} of {} burn samples reach main",
        three + one
    );
    let share = truncated_share(&stderr);
    assert!(share < 5.0, "{share}% truncated stacks\n{stderr}");

    // The same run's pprof, read by the Go pprof tool, holds the same totals.
    let (count, cpu_ns, raw) = pprof_totals(&pprof_path);
    assert_eq!(count, total, "pprof vs folded sample totals\n{raw}");
    assert_eq!(cpu_ns, total * (1_000_000_000 / 997), "cpu nanoseconds");
    assert!(raw.contains("ws1_burn_three") && raw.contains("ws1_burn_one"));
    assert!(raw.contains("samples/count cpu/nanoseconds"), "{raw}");
}

#[test]
fn cpu_profile_splits_3_to_1_with_frame_pointers() {
    if !privileged() {
        return;
    }
    cpu_split(true);
}

#[test]
fn cpu_profile_splits_3_to_1_without_frame_pointers() {
    if !privileged() {
        return;
    }
    cpu_split(false);
}

/// Off-CPU mode: a function that sleeps 20 ms per call is where the blocked time is.
fn off_cpu(frame_pointers: bool) {
    let comm = if frame_pointers {
        "w-sleep-fp"
    } else {
        "w-sleep-nofp"
    };
    let target = Workload::spawn_args(&burn_bin(frame_pointers), comm, &["--sleep-ms", "20"]);
    let folded_path = temp(&format!("{comm}.folded"));
    let pid = target.pid.to_string();
    let out = run_probe(&[
        "profile",
        "--pid",
        &pid,
        "--off-cpu",
        "--duration",
        "3s",
        "-o",
        folded_path.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "profile --off-cpu failed: {stderr}");
    let text = std::fs::read_to_string(&folded_path).unwrap();
    let folded = parse_folded(&text);
    let total_us: u64 = folded.iter().map(|(_, v)| v).sum();
    let sleep_us: u64 = folded
        .iter()
        .filter(|(f, _)| user_leaf(f) == "ws1_sleep_here")
        .map(|(_, v)| v)
        .sum();
    // 3 s of 20 ms sleeps; blocks cut by the window's edges are counted in part or not at all.
    assert!(
        (2_500_000..=3_100_000).contains(&sleep_us),
        "{sleep_us} us asleep in ws1_sleep_here of {total_us} us\n{text}\n{stderr}"
    );
    assert!(
        sleep_us * 100 >= total_us * 95,
        "{sleep_us} of {total_us} us\n{text}"
    );
    let reaching: u64 = folded
        .iter()
        .filter(|(f, _)| in_order(f, &["main", "ws1_run_sleep", "ws1_sleep_here"]))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(reaching, sleep_us, "sleep stacks that miss main:\n{text}");
}

#[test]
fn off_cpu_time_is_attributed_to_the_sleeping_function_with_frame_pointers() {
    if !privileged() {
        return;
    }
    off_cpu(true);
}

#[test]
fn off_cpu_time_is_attributed_to_the_sleeping_function_without_frame_pointers() {
    if !privileged() {
        return;
    }
    off_cpu(false);
}

#[test]
fn top_prints_plain_tables_when_not_a_terminal() {
    if !privileged() {
        return;
    }
    let target = Workload::spawn_args(&burn_bin(true), "w-top", &[]);
    let pid = target.pid.to_string();
    let out = run_probe(&["top", "--pid", &pid, "--duration", "3s", "--rows", "5"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tables = stdout.matches("ws1-probe top:").count();
    assert!((2..=4).contains(&tables), "{tables} tables:\n{stdout}");
    assert!(!stdout.contains('\x1b'), "escape codes in plain output");
    // The last table ranks the 3:1 burners first and second by self time.
    let last = stdout.rsplit("ws1-probe top:").next().unwrap();
    let rows: Vec<&str> = last.lines().skip(2).collect();
    assert!(
        rows[0].ends_with("ws1_burn_three") && rows[1].ends_with("ws1_burn_one"),
        "{last}"
    );
}

#[test]
fn agent_serves_pprof_profiles_and_sample_metrics() {
    if !privileged() {
        return;
    }
    let target = Workload::spawn_args(&burn_bin(true), "w-agent-prof", &[]);
    let _bystander = Workload::spawn_args(&burn_bin(true), "w-bystander2", &[]);
    let pid = target.pid.to_string();
    let agent = Agent::start(&["--pid", &pid, "--collectors", "profile"]);
    let cpu_before = cpu_seconds(target.pid);
    let (status, body) = http_get_bytes(
        agent.port,
        "/debug/pprof/profile?seconds=3",
        Duration::from_secs(20),
    )
    .expect("profile request");
    let cpu = cpu_seconds(target.pid) - cpu_before;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(&body[..2], &[0x1f, 0x8b], "gzip body");
    let path = temp("agent.pb.gz");
    std::fs::write(&path, &body).unwrap();
    let (count, cpu_ns, raw) = pprof_totals(&path);
    // 19 samples per second of CPU the process used in the 3 s window (the CPU time was read
    // over a slightly longer interval, so the window's share is a little smaller). At this
    // rate a sample is a coin toss per tick of each CPU: with ~50 expected the spread is ±7
    // (binomial), so the bounds allow about ±3 of that.
    let expected = cpu * 19.0;
    assert!(
        (0.7 * expected - 10.0..=1.1 * expected + 10.0).contains(&(count as f64)),
        "{count} samples for {cpu:.2} s of CPU\n{raw}"
    );
    assert_eq!(cpu_ns, count * (1_000_000_000 / 19));
    assert!(raw.contains("ws1_burn_three"), "{raw}");
    assert!(!raw.contains("w-bystander2"), "{raw}");
    let (bad, _) = http_get_bytes(
        agent.port,
        "/debug/pprof/profile?seconds=0",
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(bad, 400);

    let m = agent.metrics();
    let service = [("service", "w-agent-prof")];
    let samples = m.value("ws1_probe_profile_samples_total", &service);
    assert!(samples >= count as f64, "{samples} < {count}");
    let ratio = m.value("ws1_probe_profile_truncated_stack_ratio", &service);
    assert!(ratio < 0.05, "truncated share {ratio}");
    assert!(
        m.get(
            "ws1_probe_profile_samples_total",
            &[("service", "w-bystander2")]
        )
        .is_none()
    );
    assert!(
        m.get("ws1_probe_profile_symbolization_errors_total", &[])
            .is_some()
    );
    // Only the profiler was asked for.
    assert!(
        m.get("ws1_probe_syscall_duration_seconds_count", &[])
            .is_none()
    );
}
