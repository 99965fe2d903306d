//! Allocation tracing (precise mode) against a workload that leaks known blocks from known
//! functions through malloc, calloc, realloc and posix_memalign.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
};

use serde_json::Value;
use ws1_probe_tests::{Workload, allocload_bin, privileged, probe_bin};

const K: u64 = 7;
const S: u64 = 1024;

/// Starts `ws1-probe leaks` on `pid` and returns once its probes are attached.
fn start_leaks(pid: u32, duration: &str) -> Child {
    let pid = pid.to_string();
    start_precise(&[
        "leaks",
        "--pid",
        &pid,
        "--duration",
        duration,
        "--min-age",
        "0s",
        "--json",
        "--top",
        "50",
    ])
}

/// Starts a precise-mode command (`leaks`, `allocs`) and returns once its probes are attached.
fn start_precise(args: &[&str]) -> Child {
    let mut child = Command::new(probe_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ws1-probe");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.starts_with("collecting allocations") => break,
            Some(Ok(line)) => eprintln!("ws1-probe: {line}"),
            _ => panic!("ws1-probe {args:?} exited before attaching"),
        }
    }
    // Keep draining stderr so the CLI never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    child
}

fn finish(child: Child) -> Value {
    let out = child.wait_with_output().expect("wait for ws1-probe leaks");
    assert!(out.status.success(), "leaks failed: {}", out.status);
    serde_json::from_slice(&out.stdout).expect("leaks prints JSON")
}

/// Leak groups whose first frame is in `function`.
fn at<'a>(report: &'a Value, function: &str) -> Vec<&'a Value> {
    report["leaks"]
        .as_array()
        .expect("leaks array")
        .iter()
        .filter(|g| {
            g["stack"][0]["function"]
                .as_str()
                .is_some_and(|f| f.ends_with(function))
        })
        .collect()
}

#[test]
fn leaks_are_reported_exactly_at_their_call_sites() {
    if !privileged() {
        return;
    }
    let mut w = Workload::spawn_program(&allocload_bin(), "w-leak");
    let leaks = start_leaks(w.pid, "3s");
    for how in ["malloc", "calloc", "realloc", "memalign"] {
        w.cmd(&format!("leak-{how} {K} {S}"));
    }
    w.cmd(&format!("balanced 500 {S}"));
    let report = finish(leaks);
    for function in [
        "leak_with_malloc",
        "leak_with_calloc",
        "leak_with_realloc",
        "leak_with_memalign",
    ] {
        let groups = at(&report, function);
        assert_eq!(groups.len(), 1, "{function}: {report}");
        assert_eq!(groups[0]["bytes"], K * S, "{function}: {}", groups[0]);
        assert_eq!(groups[0]["count"], K, "{function}: {}", groups[0]);
    }
    assert!(at(&report, "balanced_churn").is_empty(), "{report}");
    // Nothing else is outstanding: the workload allocates nothing else after start-up.
    assert_eq!(report["outstanding_blocks"], 4 * K, "{report}");
    let stats = &report["stats"]["w-leak"];
    assert_eq!(stats["failed"], 0, "{report}");
    // The workload still works under tracing.
    w.cmd("leak-malloc 1 8");
}

#[test]
fn freeing_everything_reports_no_leak() {
    if !privileged() {
        return;
    }
    let mut w = Workload::spawn_program(&allocload_bin(), "w-noleak");
    let leaks = start_leaks(w.pid, "2s");
    w.cmd(&format!("leak-malloc {K} {S}"));
    w.cmd(&format!("leak-memalign {K} {S}"));
    w.cmd(&format!("balanced 200 {S}"));
    w.cmd("free-leaks");
    let report = finish(leaks);
    assert_eq!(report["leaks"], serde_json::json!([]), "{report}");
    assert_eq!(report["outstanding_blocks"], 0, "{report}");
    let stats = &report["stats"]["w-noleak"];
    assert_eq!(stats["allocs"], stats["frees"], "{report}");
    assert_eq!(stats["alloc_bytes"], stats["free_bytes"], "{report}");
    assert_eq!(stats["alloc_bytes"], (2 * K + 200) * S, "{report}");
}

#[test]
fn an_exited_process_is_cleaned_out() {
    if !privileged() {
        return;
    }
    let mut w = Workload::spawn_program(&allocload_bin(), "w-exit");
    let leaks = start_leaks(w.pid, "2s");
    w.cmd(&format!("leak-calloc {K} {S}"));
    w.cmd("exit");
    let _ = w.child.wait();
    let report = finish(leaks);
    assert_eq!(report["exited_blocks_removed"], K, "{report}");
    assert_eq!(report["outstanding_blocks"], 0, "{report}");
    assert_eq!(report["leaks"], serde_json::json!([]), "{report}");
}

#[test]
fn leaks_without_a_selector_is_refused() {
    if !privileged() {
        return;
    }
    let out = ws1_probe_tests::run_probe(&["leaks", "--duration", "1s"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: precise allocation tracing needs a selector"),
        "{stderr}"
    );
}

#[test]
fn allocs_reports_rate_sizes_and_top_stacks() {
    if !privileged() {
        return;
    }
    let mut w = Workload::spawn_program(&allocload_bin(), "w-allocs");
    let pid = w.pid.to_string();
    let child = start_precise(&["allocs", "--pid", &pid, "--duration", "2s", "--json"]);
    w.cmd("balanced 500 64");
    w.cmd(&format!("leak-malloc {K} {S}"));
    let report = finish(child);
    let stack = |function: &str| -> Vec<&Value> {
        report["top_stacks"]
            .as_array()
            .expect("top_stacks")
            .iter()
            .filter(|s| {
                s["stack"][0]["function"]
                    .as_str()
                    .is_some_and(|f| f.ends_with(function))
            })
            .collect()
    };
    let churn = stack("balanced_churn");
    assert_eq!(churn.len(), 1, "{report}");
    assert_eq!(
        (churn[0]["count"].as_u64(), churn[0]["bytes"].as_u64()),
        (Some(500), Some(500 * 64))
    );
    let leak = stack("leak_with_malloc");
    assert_eq!(
        (leak[0]["count"].as_u64(), leak[0]["bytes"].as_u64()),
        (Some(K), Some(K * S))
    );
    // Sizes land in their `le` buckets: 64 B in "<= 64 B", 1 KiB in "<= 1.0 KiB".
    let calls = |size: &str| {
        report["sizes"]
            .as_array()
            .expect("sizes")
            .iter()
            .find(|r| r["size"] == size)
            .and_then(|r| r["calls"].as_u64())
    };
    assert_eq!(calls("<= 64 B"), Some(500), "{report}");
    assert_eq!(calls("<= 1.0 KiB"), Some(K), "{report}");
    assert_eq!(report["allocs"].as_u64(), Some(500 + K), "{report}");
    assert_eq!(report["frees"].as_u64(), Some(500), "{report}");
}

#[test]
fn agent_precise_mode_exports_allocation_metrics() {
    if !privileged() {
        return;
    }
    let mut w = Workload::spawn_program(&allocload_bin(), "w-aprecise");
    let agent = ws1_probe_tests::Agent::start(&["--pid", &w.pid.to_string(), "--precise-alloc"]);
    w.cmd(&format!("leak-malloc {K} {S}"));
    w.cmd("balanced 100 64");
    let m = agent.metrics();
    let service = [("service", "w-aprecise")];
    assert_eq!(
        m.get("ws1_probe_alloc_bytes_total", &service),
        Some((K * S + 100 * 64) as f64)
    );
    assert_eq!(
        m.get("ws1_probe_free_bytes_total", &service),
        Some((100 * 64) as f64)
    );
    assert_eq!(
        m.get("ws1_probe_alloc_outstanding_bytes", &service),
        Some((K * S) as f64)
    );
    let bucket = |le: &str| {
        m.get(
            "ws1_probe_alloc_size_bytes_bucket",
            &[("service", "w-aprecise"), ("le", le)],
        )
    };
    assert_eq!(bucket("64"), Some(100.0));
    assert_eq!(bucket("1024"), Some(100.0 + K as f64));
    assert_eq!(bucket("+Inf"), Some(100.0 + K as f64));
}

#[test]
fn agent_precise_mode_follows_new_processes() {
    if !privileged() {
        return;
    }
    let agent = ws1_probe_tests::Agent::start(&["--comm", "^w-apnew$", "--precise-alloc"]);
    // Started after the agent: found through its exec, traced from the agent's next tick (5 s).
    let mut w = Workload::spawn_program(&allocload_bin(), "w-apnew");
    let service = [("service", "w-apnew")];
    let started = std::time::Instant::now();
    let before = loop {
        w.cmd("leak-malloc 1 8");
        let m = agent.metrics();
        if let Some(out) = m.get("ws1_probe_alloc_outstanding_bytes", &service) {
            break out;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "new process not traced after 20 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    w.cmd(&format!("leak-malloc {K} {S}"));
    let after = agent
        .metrics()
        .get("ws1_probe_alloc_outstanding_bytes", &service)
        .expect("outstanding bytes");
    assert_eq!(after - before, (K * S) as f64);
}

#[test]
fn a_custom_allocator_is_traced_by_binary_and_prefix() {
    if !privileged() {
        return;
    }
    let mut w = Workload::spawn_program(&allocload_bin(), "w-custom");
    let pid = w.pid.to_string();
    let child = start_precise(&[
        "leaks",
        "--pid",
        &pid,
        "--duration",
        "2s",
        "--min-age",
        "0s",
        "--json",
        "--alloc-lib",
        "exe",
        "--alloc-prefix",
        "ws1_",
    ]);
    w.cmd(&format!("leak-custom {K} {S}"));
    w.cmd("churn-custom 50 64");
    // libc's malloc is not traced in this mode.
    w.cmd(&format!("leak-malloc {K} {S}"));
    let report = finish(child);
    let groups = at(&report, "leak_with_custom");
    assert_eq!(groups.len(), 1, "{report}");
    assert_eq!(
        (groups[0]["bytes"].as_u64(), groups[0]["count"].as_u64()),
        (Some(K * S), Some(K))
    );
    assert!(at(&report, "leak_with_malloc").is_empty(), "{report}");
    assert!(at(&report, "churn_custom").is_empty(), "{report}");
    assert_eq!(report["stats"]["w-custom"]["frees"], 50, "{report}");
}

#[test]
fn mmap_munmap_and_brk_outside_the_allocator_are_counted() {
    if !privileged() {
        return;
    }
    const PAGE: u64 = 4096;
    let mut w = Workload::spawn_program(&allocload_bin(), "w-mmap");
    let leaks = start_leaks(w.pid, "2s");
    w.cmd(&format!("mmap-leak 3 {}", 16 * PAGE));
    w.cmd(&format!("mmap-churn 5 {}", 4 * PAGE));
    w.cmd(&format!("brk-grow {}", 8 * PAGE));
    // A large malloc is served by mmap inside the allocator: counted once, as a block.
    w.cmd("leak-malloc 1 1048576");
    let report = finish(leaks);
    let stats = &report["stats"]["w-mmap"];
    assert_eq!(
        stats["mmap_bytes"].as_u64(),
        Some(3 * 16 * PAGE + 5 * 4 * PAGE),
        "{report}"
    );
    assert_eq!(
        stats["munmap_bytes"].as_u64(),
        Some(5 * 4 * PAGE),
        "{report}"
    );
    assert_eq!(stats["brk_bytes"].as_u64(), Some(8 * PAGE), "{report}");
    assert_eq!(report["mapped_regions"].as_u64(), Some(3), "{report}");
    assert_eq!(
        report["mapped_bytes"].as_u64(),
        Some(3 * 16 * PAGE),
        "{report}"
    );
    assert_eq!(stats["alloc_bytes"].as_u64(), Some(1048576), "{report}");
}
