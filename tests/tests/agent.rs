//! Agent lifecycle and bad input: readiness, clean SIGTERM, one-line errors.

use std::time::Duration;

use ws1_probe_tests::{Agent, free_port, http_get, privileged, run_probe};

#[test]
fn ready_serves_metrics_and_stops_cleanly_on_sigterm() {
    if !privileged() {
        return;
    }
    let mut agent = Agent::start(&[]);
    eprintln!("agent ready after {:?}", agent.ready_after);
    assert_eq!(http_get(agent.port, "/healthz").unwrap().0, 200);
    let m = agent.metrics();
    for name in [
        "ws1_probe_agent_cpu_seconds_total",
        "ws1_probe_agent_resident_memory_bytes",
    ] {
        assert!(m.get(name, &[]).is_some(), "{name} missing");
    }
    assert_eq!(
        m.get("ws1_probe_bpf_map_capacity", &[("map", "TARGETS")]),
        Some(32768.0)
    );
    assert!(
        m.get(
            "ws1_probe_bpf_program_runs_total",
            &[("program", "sys_enter")]
        )
        .is_some()
    );
    assert_eq!(
        m.get(
            "ws1_probe_events_dropped_total",
            &[("reason", "syscall_hist_map_full")]
        ),
        Some(0.0)
    );
    let (status, took) = agent.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(2), "took {took:?} to stop");
    // The port is free again.
    assert!(std::net::TcpListener::bind(("127.0.0.1", agent.port)).is_ok());
}

#[test]
fn bpf_stats_flag_reports_program_runs() {
    if !privileged() {
        return;
    }
    let agent = Agent::start(&["--bpf-stats"]);
    std::thread::sleep(Duration::from_millis(200));
    let m = agent.metrics();
    assert_eq!(m.get("ws1_probe_bpf_stats_enabled", &[]), Some(1.0));
    let runs = m.value(
        "ws1_probe_bpf_program_runs_total",
        &[("program", "sys_enter")],
    );
    assert!(runs > 0.0, "sys_enter ran {runs} times");
}

fn one_line_error(args: &[&str]) -> String {
    let out = run_probe(args);
    assert!(!out.status.success(), "{args:?} should fail");
    assert_eq!(out.status.code(), Some(1), "{args:?}: exit code");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one line, got {stderr:?}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    lines[0].to_owned()
}

#[test]
fn bad_input_gets_one_clear_line() {
    if !privileged() {
        return;
    }
    let line = one_line_error(&["agent", "--pid", "4000000"]);
    assert!(line.contains("no process with pid 4000000"), "{line}");
    let line = one_line_error(&["syscalls", "--comm", "a(b"]);
    assert!(line.contains("invalid --comm regex"), "{line}");
    let line = one_line_error(&["syscalls", "--cgroup", "/no/such/cgroup"]);
    assert!(line.contains("cgroup /no/such/cgroup not found"), "{line}");

    let cfg = std::env::temp_dir().join(format!("ws1-bad-{}.toml", std::process::id()));
    std::fs::write(
        &cfg,
        "[[service]]\nname = \"risk\"\nmatch = { comn = \"x\" }\n",
    )
    .unwrap();
    let line = one_line_error(&["agent", "--config", cfg.to_str().unwrap()]);
    assert!(
        line.contains(&format!("{}:3:", cfg.display())) && line.contains("unknown field `comn`"),
        "{line}"
    );
    std::fs::remove_file(&cfg).unwrap();

    // Port in use: held by this test.
    let port = free_port();
    let _held = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let line = one_line_error(&["agent", "--listen", &format!("127.0.0.1:{port}")]);
    assert!(line.contains("address already in use"), "{line}");
}

#[test]
fn missing_capabilities_are_named() {
    if !privileged() {
        return;
    }
    // Drop to nobody with no capabilities.
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(ws1_probe_tests::probe_bin())
        .args(["syscalls", "--duration", "1s"])
        .output()
        .expect("setpriv (util-linux) runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.trim().starts_with("error: ") && stderr.contains("missing CAP_BPF and CAP_PERFMON"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
